"""Validation images during training: sampled with the model being trained, sent to the trackers, saved as a grid.

The prompts are encoded once at start-up, so the text encoders need not stay on the device
(when the text encoders train, the trainer encodes them again before each validation).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from sdxl_ambient.files import SAMPLES_DIR, VALIDATION_DIR
from sdxl_ambient.images import image_grid

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValidationSettings:
    """What to sample during training and how often."""

    prompt: str
    num_images: int = 4
    every_steps: int = 500
    inference_steps: int = 25
    resolution: int = 1024


def _pipeline(components, unet, with_text_encoders: bool = False):
    """An SDXL pipeline over the training components (Euler sampling); the text encoders only when
    prompts are to be encoded, since sampling gets the embeddings."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=components.vae, unet=unet, tokenizer=components.tokenizer, tokenizer_2=components.tokenizer_2,
        text_encoder=components.text_encoder if with_text_encoders else None,
        text_encoder_2=components.text_encoder_2 if with_text_encoders else None,
        scheduler=EulerDiscreteScheduler.from_config(components.noise_scheduler.config))


@torch.no_grad()
def encode_prompts(components, settings: ValidationSettings) -> dict:
    """The validation prompt's embeddings (and the negative, empty prompt's)."""
    pipe = _pipeline(components, components.unet, with_text_encoders=True)
    pe, neg, pooled, neg_pooled = pipe.encode_prompt(settings.prompt, device=components.text_encoder.device,
                                                     num_images_per_prompt=1, do_classifier_free_guidance=True)
    return {"prompt_embeds": pe, "negative_prompt_embeds": neg,
            "pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": neg_pooled}


@torch.no_grad()
def sample_images(components, settings: ValidationSettings, prompts: dict, accelerator, weight_dtype, seed: int,
                  ambient_timestep: int = 0):
    """``settings.num_images`` images of the validation prompt with the UNet being trained: for data
    at t_n > 0 truncated, with the Tweedie jump from t_n + DEFAULT_JUMP_MARGIN (as ``generate`` samples
    an ambient model; why: docs/image_results.md), else the pipeline's full sampling."""
    from sdxl_ambient.sampling import (
        DEFAULT_GUIDANCE_SCALE,
        DEFAULT_JUMP_MARGIN,
        can_truncate,
        embedded_conditioning,
        sample_truncated,
    )

    unet_module = accelerator.unwrap_model(components.unet)
    was_training = unet_module.training
    unet_module.eval()
    pipe = _pipeline(components, unet_module)
    pipe.set_progress_bar_config(disable=True)
    device = accelerator.device
    generator = torch.Generator(device=device).manual_seed(seed)
    embeds = {k: v.to(device=device, dtype=weight_dtype) for k, v in prompts.items()}
    images = []
    size = dict(height=settings.resolution, width=settings.resolution)
    if ambient_timestep > 0 and not can_truncate(pipe.scheduler, settings.inference_steps, ambient_timestep):
        logger.warning("--validation_inference_steps %d gives no inference step at or above t_n + jump margin = %d: "
                       "validation images are sampled to t = 0", settings.inference_steps, ambient_timestep + DEFAULT_JUMP_MARGIN)
        ambient_timestep = 0
    with accelerator.autocast():
        for _ in range(settings.num_images):
            if ambient_timestep > 0:
                cond = embedded_conditioning(pipe, embeds["prompt_embeds"], embeds["pooled_prompt_embeds"],
                                             embeds["negative_prompt_embeds"], embeds["negative_pooled_prompt_embeds"],
                                             guidance_scale=DEFAULT_GUIDANCE_SCALE, **size)
                images += sample_truncated(pipe, cond, ambient_timestep=ambient_timestep,
                                           num_inference_steps=settings.inference_steps, generator=generator, **size)
            else:
                images += pipe(**embeds, num_inference_steps=settings.inference_steps, generator=generator,
                               guidance_scale=DEFAULT_GUIDANCE_SCALE, **size).images
    if was_training:
        unet_module.train()
    return images


def log_validation(components, settings: ValidationSettings, prompts, accelerator, weight_dtype, seed: int,
                   step: int, output_dir, ambient_timestep: int = 0) -> Path:
    """Sample the validation images, log them to every tracker and save ``validation/step-N.png``."""
    import numpy as np

    images = sample_images(components, settings, prompts, accelerator, weight_dtype, seed, ambient_timestep)
    out = Path(output_dir) / VALIDATION_DIR / f"step-{step:06d}.png"
    if accelerator.is_main_process:
        out.parent.mkdir(parents=True, exist_ok=True)
        image_grid(images, cols=min(len(images), 4)).save(out)
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_images("validation", np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({"validation": [wandb.Image(im, caption=settings.prompt) for im in images]}, step=step)
    logger.info("validation images for step %d in %s", step, out)
    return out


def final_images(components, settings: ValidationSettings, prompts, accelerator, weight_dtype, seed: int,
                 output_dir, ambient_timestep: int = 0) -> list[Path]:
    """Sample images with the final weights into OUTPUT_DIR/samples for the model card."""
    images = sample_images(components, settings, prompts, accelerator, weight_dtype, seed, ambient_timestep)
    folder = Path(output_dir) / SAMPLES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        paths.append(folder / f"sample_{i}.png")
        im.save(paths[-1])
    return paths
