"""Sampling from SDXL models trained with the ambient objectives.

Plain functions of a ``StableDiffusionXLPipeline`` (a LoRA loaded or a full fine-tune) and a
timestep schedule, in the spirit of k-diffusion's ``sampling.py``; and, at the end, samplers of a
denoiser callable ``denoiser(x_t, t) -> E[x0 | x_t]`` (``ddim_denoise``, ``handoff_denoiser``).

Full sampling is the pipeline's own call with any diffusers scheduler. Truncated sampling
runs the same denoising loop down to the training noise level t_n and finishes with one
Tweedie jump

    x0 = E[x0 | x_t] = (x_t - sqrt(1 - abar_t) eps(x_t, t)) / sqrt(abar_t)     (epsilon models)

from the last inference timestep t >= t_n + ``jump_margin`` (classifier-free guidance applied
to the model output first), then decodes x0 with the VAE.

Jump timestep. A model trained only on data at t_n sees its x0 error in the ambient loss scaled
by (1 - lam), lam = s2_n / s2_t with s2 = (1 - abar) / abar (``objectives.predict_observation``):
at t = t_n the factor is 0 and there is no training signal at all, so the jump is taken from
a little above t_n. ``DEFAULT_JUMP_MARGIN`` and the measurements behind it (the 2-D toy and real
digits, with this factor along SDXL's schedule) are in docs/image_results.md ("Jump margin").

Hand-off. A fine-tune trained only above t_n can instead finish below t_n + margin with the model
it started from (``handoff_denoiser``; for a LoRA, the adapter switched off).

The noise attack (``ddim_reconstruct``) starts from x_t at an exact training timestep and
denoises with deterministic DDIM on integer timesteps; its one-step case is the Tweedie jump.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from sdxl_ambient.errors import UserError
from sdxl_ambient.images import center_crop_resize, open_image
from sdxl_ambient.objectives import Denoiser, add_noise, model_output_from_x0, x0_from_model_output

# Training timesteps above t_n at which truncated sampling takes its final Tweedie jump
# (measured in docs/image_results.md, "Jump margin").
DEFAULT_JUMP_MARGIN = 25
DEFAULT_GUIDANCE_SCALE = 5.0  # diffusers' SDXL default


def abar_at_timestep(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """abar at (possibly fractional) timesteps: the table's value at integers, and log(sigma)
    interpolated linearly between them otherwise (sigma = sqrt((1 - abar) / abar)), which is how
    Karras-sigma schedulers map sigmas to the fractional timesteps they give the UNet."""
    table = alphas_cumprod.double().to(timesteps.device)
    t = timesteps.double().clamp(0, len(table) - 1)
    lo = t.floor().long()
    hi = (lo + 1).clamp(max=len(table) - 1)
    w = t - lo
    log_s2 = torch.log((1 - table) / table)  # 2 log(sigma)
    return 1.0 / (1.0 + torch.exp((1 - w) * log_s2[lo] + w * log_s2[hi]))


def tweedie_jump(model_output, sample, timestep, alphas_cumprod, prediction_type="epsilon"):
    """E[x0 | x_t] from the model output at ``timestep`` (scalar or (B,), integer or fractional).

    ``sample`` is the variance-preserving x_t the UNet saw, i.e. after the scheduler's
    ``scale_model_input``. This is ``objectives.x0_from_model_output`` with abar taken from
    ``abar_at_timestep``."""
    b = sample.shape[0]
    t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(b)
    abar = abar_at_timestep(alphas_cumprod, t).to(torch.float32)
    # One table entry per sample, indexed by the sample's position.
    return x0_from_model_output(model_output, sample, torch.arange(b, device=sample.device), abar, prediction_type)


def truncated_timesteps(scheduler, num_inference_steps: int, stop_timestep: int,
                        jump_margin: int = DEFAULT_JUMP_MARGIN, device=None) -> torch.Tensor:
    """The inference timesteps truncated sampling evaluates the model at.

    Sets the scheduler's timesteps for ``num_inference_steps`` and keeps those >= stop_timestep
    + jump_margin. The model runs at every kept timestep; the scheduler steps from each but the
    last, and the Tweedie jump to x0 is taken from the last."""
    if stop_timestep <= 0:
        raise ValueError(f"truncated sampling needs stop_timestep > 0 (the training noise level t_n), got {stop_timestep}")
    scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = scheduler.timesteps
    keep = int((timesteps >= stop_timestep + jump_margin).sum())
    if keep == 0:
        raise UserError(
            f"no inference timestep is >= t_n + jump_margin = {stop_timestep + jump_margin} "
            f"(the first is {float(timesteps[0]):g}); lower --jump_margin or --ambient_timestep"
        )
    if not bool((timesteps[:keep] >= stop_timestep + jump_margin).all()):
        raise ValueError(f"{type(scheduler).__name__} timesteps are not decreasing; truncated sampling needs them to be")
    return timesteps[:keep]


def can_truncate(scheduler, num_inference_steps: int, stop_timestep: int, jump_margin: int = DEFAULT_JUMP_MARGIN) -> bool:
    """Whether ``num_inference_steps`` of this scheduler reach an inference timestep >= t_n + jump_margin."""
    scheduler.set_timesteps(num_inference_steps)
    return bool((scheduler.timesteps >= stop_timestep + jump_margin).any())


@dataclass
class Conditioning:
    """Text and micro-conditioning for a batch; with guidance the unconditional half comes first."""

    prompt_embeds: torch.Tensor
    text_embeds: torch.Tensor
    time_ids: torch.Tensor
    guidance_scale: float

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0


def encode_conditioning(pipe, prompts: Sequence[str], *, guidance_scale: float, height: int, width: int,
                        negative_prompt: str | Sequence[str] | None = None, num_images_per_prompt: int = 1) -> Conditioning:
    """SDXL's conditioning as the pipeline builds it: both text encoders, pooled embeddings and
    the (original size, crop (0, 0), target size) time ids."""
    guided = guidance_scale > 1.0
    pe, npe, pooled, npooled = pipe.encode_prompt(
        prompt=list(prompts), device=pipe._execution_device, num_images_per_prompt=num_images_per_prompt,
        do_classifier_free_guidance=guided, negative_prompt=negative_prompt,
    )
    return embedded_conditioning(pipe, pe, pooled, npe, npooled, guidance_scale=guidance_scale, height=height, width=width)


def embedded_conditioning(pipe, prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds=None,
                          negative_pooled_prompt_embeds=None, *, guidance_scale: float, height: int, width: int) -> Conditioning:
    """:class:`Conditioning` from prompt embeddings already encoded (e.g. ``pipe.encode_prompt``'s four
    outputs), with the (original size, crop (0, 0), target size) time ids."""
    device = pipe._execution_device
    pe, pooled = prompt_embeds.to(device), pooled_prompt_embeds.to(device)
    time_ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=pe.dtype,
                                      text_encoder_projection_dim=int(pooled.shape[-1])).to(device)
    time_ids = time_ids.repeat(pe.shape[0], 1)
    if guidance_scale > 1.0:
        pe = torch.cat([negative_prompt_embeds.to(device, pe.dtype), pe])
        pooled = torch.cat([negative_pooled_prompt_embeds.to(device, pooled.dtype), pooled])
        time_ids = torch.cat([time_ids, time_ids])
    return Conditioning(pe, pooled, time_ids, float(guidance_scale))


def guided_output(pipe, cond: Conditioning, model_input: torch.Tensor, timestep) -> torch.Tensor:
    """The UNet's output at ``timestep`` with classifier-free guidance applied:
    out = out_uncond + w (out_cond - out_uncond)."""
    x = torch.cat([model_input, model_input]) if cond.guided else model_input
    out = pipe.unet(
        x, timestep, encoder_hidden_states=cond.prompt_embeds,
        added_cond_kwargs={"text_embeds": cond.text_embeds, "time_ids": cond.time_ids}, return_dict=False,
    )[0]
    if not cond.guided:
        return out
    uncond, text = out.chunk(2)
    return uncond + cond.guidance_scale * (text - uncond)


def _vae_latent_stats(vae, like: torch.Tensor):
    """(mean, std) of the VAE's latents when its config has them, else None."""
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is None or std is None:
        return None
    shape = (1, -1, 1, 1)
    return (torch.tensor(mean).view(shape).to(like.device, like.dtype), torch.tensor(std).view(shape).to(like.device, like.dtype))


@contextmanager
def _vae_upcast(vae):
    """Run the VAE in float32 when it is float16 and its config asks for upcasting (SDXL's VAE
    overflows in float16), as the pipeline does; yields the dtype it runs in."""
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    try:
        yield vae.dtype
    finally:
        if upcast:
            vae.to(torch.float16)


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor) -> list:
    """PIL images from scaled latents z (the UNet's space): VAE-decode z / scaling_factor."""
    vae = pipe.vae
    with _vae_upcast(vae) as dtype:
        z = latents.to(vae.device, dtype)
        stats = _vae_latent_stats(vae, z)
        z = z * stats[1] / vae.config.scaling_factor + stats[0] if stats else z / vae.config.scaling_factor
        image = vae.decode(z, return_dict=False)[0]
    return pipe.image_processor.postprocess(image.float(), output_type="pil")


@torch.no_grad()
def encode_images(pipe, images: Sequence, resolution: int) -> torch.Tensor:
    """Scaled latents z = scaling_factor * mode(VAE encoder) of images (paths, bytes or PIL images,
    read as training reads them: :func:`images.open_image`), center-cropped to a ``resolution`` square."""
    vae = pipe.vae
    pixels = pipe.image_processor.preprocess([center_crop_resize(open_image(im), resolution) for im in images])
    with _vae_upcast(vae) as dtype:
        z = vae.encode(pixels.to(vae.device, dtype)).latent_dist.mode().float()
    stats = _vae_latent_stats(vae, z)
    z = (z - stats[0]) * vae.config.scaling_factor / stats[1] if stats else z * vae.config.scaling_factor
    return z.to(pipe.unet.dtype)


def _vp_scheduler(pipe):
    """The pipeline's scheduler, which must be a DDPM-family one (with alphas_cumprod: its model
    input is the variance-preserving x_t the Tweedie jump needs)."""
    if not hasattr(pipe.scheduler, "alphas_cumprod"):
        raise ValueError(f"truncated sampling needs a DDPM-family scheduler with alphas_cumprod, not {type(pipe.scheduler).__name__}")
    return pipe.scheduler


@torch.no_grad()
def truncated_denoise(pipe, cond: Conditioning, latents: torch.Tensor, timesteps: torch.Tensor, generator=None) -> torch.Tensor:
    """Run ``pipe.scheduler`` over ``timesteps`` (from ``truncated_timesteps``) and return the
    Tweedie jump E[x0 | x_t] from the guided model output at the last of them."""
    scheduler = _vp_scheduler(pipe)
    extra = pipe.prepare_extra_step_kwargs(generator, 0.0)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    prediction_type = scheduler.config.prediction_type
    for i, t in enumerate(timesteps):
        model_input = scheduler.scale_model_input(latents, t)
        out = guided_output(pipe, cond, model_input, t)
        if i == len(timesteps) - 1:
            return tweedie_jump(out.float(), model_input.float(), t, scheduler.alphas_cumprod, prediction_type)
        latents = scheduler.step(out, t, latents, **extra, return_dict=False)[0]
    raise ValueError("truncated_denoise needs at least one timestep")


@torch.no_grad()
def sample(pipe, prompts: Sequence[str], *, ambient_timestep: int = 0, jump_margin: int = DEFAULT_JUMP_MARGIN,
           num_inference_steps: int = 30, guidance_scale: float = DEFAULT_GUIDANCE_SCALE, generator=None, height: int | None = None,
           width: int | None = None, negative_prompt=None, num_images_per_prompt: int = 1) -> list:
    """PIL images for ``prompts``.

    ambient_timestep = 0: the pipeline's own full sampling with its scheduler.
    ambient_timestep = t_n > 0: denoise down to the last inference timestep >= t_n + jump_margin
    and decode the Tweedie jump E[x0 | x_t] from there (``truncated_timesteps``)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    height = height or pipe.default_sample_size * pipe.vae_scale_factor
    width = width or pipe.default_sample_size * pipe.vae_scale_factor
    if ambient_timestep == 0:
        return pipe(prompt=prompts, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale, generator=generator, height=height, width=width,
                    num_images_per_prompt=num_images_per_prompt).images
    cond = encode_conditioning(pipe, prompts, guidance_scale=guidance_scale, height=height, width=width,
                               negative_prompt=negative_prompt, num_images_per_prompt=num_images_per_prompt)
    return sample_truncated(pipe, cond, ambient_timestep=ambient_timestep, jump_margin=jump_margin,
                            num_inference_steps=num_inference_steps, generator=generator, height=height, width=width)


@torch.no_grad()
def sample_truncated(pipe, cond: Conditioning, *, ambient_timestep: int, jump_margin: int = DEFAULT_JUMP_MARGIN,
                     num_inference_steps: int = 30, generator=None, height: int, width: int) -> list:
    """PIL images for a conditioning: denoise down to the last inference timestep >= t_n + jump_margin
    and decode the Tweedie jump E[x0 | x_t] from there."""
    device = pipe._execution_device
    batch = cond.prompt_embeds.shape[0] // (2 if cond.guided else 1)
    timesteps = truncated_timesteps(_vp_scheduler(pipe), num_inference_steps, ambient_timestep, jump_margin, device)
    latents = pipe.prepare_latents(batch, pipe.unet.config.in_channels, height, width, cond.prompt_embeds.dtype, device,
                                   generator)
    x0 = truncated_denoise(pipe, cond, latents, timesteps, generator)
    return decode_latents(pipe, x0)


def generate_images(pipe, prompts: list[str], *, num_images_per_prompt: int = 1, batch_size: int = 4, seed: int = 0,
                    resolution: int | None = None, **sample_kwargs) -> tuple[list, list[str]]:
    """Images and their prompts, ``batch_size`` prompts at a time, from one generator seeded once
    (``sample``'s keyword arguments pass through)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    images, captions = [], []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        images += sample(pipe, chunk, generator=generator, height=resolution, width=resolution,
                         num_images_per_prompt=num_images_per_prompt, **sample_kwargs)
        captions += [p for p in chunk for _ in range(num_images_per_prompt)]
    return images, captions


def noise_to(latents: torch.Tensor, timestep: int, noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) z + sqrt(1 - abar_t) noise at one integer timestep for the whole batch."""
    t = torch.full((latents.shape[0],), int(timestep), dtype=torch.long, device=latents.device)
    return add_noise(latents, t, noise, alphas_cumprod)


# ----------------------------------------------------------------------------- samplers of a denoiser


def sampling_timesteps(num_steps: int, stop: int = 0, start: int = 999) -> torch.Tensor:
    """Integer timesteps evenly spaced from ``start`` down to ``stop``, both included
    (``num_steps`` intervals, repeats removed)."""
    if num_steps < 1 or not 0 <= stop <= start:
        raise ValueError(f"need num_steps >= 1 and 0 <= stop <= start, got {num_steps}, {stop}, {start}")
    return torch.linspace(start, stop, num_steps + 1).round().long().unique_consecutive()


@torch.no_grad()
def ddim_denoise(denoiser: Denoiser, x: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM from ``x`` at timesteps[0] through the decreasing integer ``timesteps``;
    returns the denoiser's E[x0 | x_t] at the last of them.

    ``denoiser(x, t)`` -> E[x0 | x_t] with t of shape (B,). Between timesteps,
    x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps with x0 and eps read from the denoiser at t.
    Ending at timestep 0 is full sampling; ending at t_n + margin is truncated sampling with its
    final Tweedie jump."""
    if len(timesteps) < 1:
        raise ValueError("ddim_denoise needs at least one timestep")
    alphas_cumprod = alphas_cumprod.to(x.device)
    x = x.float()
    for i, t in enumerate(timesteps):
        tb = t.to(x.device).repeat(x.shape[0])
        x0 = denoiser(x, tb).float()
        if i == len(timesteps) - 1:
            return x0
        eps = model_output_from_x0(x0, x, tb, alphas_cumprod, "epsilon")
        a = alphas_cumprod[timesteps[i + 1]].float()
        x = a.sqrt() * x0 + (1 - a).sqrt() * eps
    raise AssertionError("unreachable")


def handoff_denoiser(model: Denoiser, base: Denoiser, below: int) -> Denoiser:
    """``model`` at timesteps t >= ``below``, ``base`` at t < ``below``: a fine-tune that was never
    trained below its noise level hands the last steps to the model it started from (for a LoRA,
    the base is the same network with the adapter switched off)."""
    def denoiser(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        low = t < below
        if bool(low.all()):
            return base(x, t)
        if not bool(low.any()):
            return model(x, t)
        return torch.where(low.reshape(-1, *([1] * (x.ndim - 1))), base(x, t), model(x, t))

    return denoiser


def ddim_timesteps(timestep: int, num_steps: int) -> torch.Tensor:
    """``num_steps`` integer timesteps evenly spaced from ``timestep`` down to (not including) 0."""
    if num_steps < 1 or timestep < 1:
        raise ValueError(f"need num_steps >= 1 and timestep >= 1, got {num_steps}, {timestep}")
    return torch.linspace(timestep, 0, num_steps + 1)[:-1].round().long().unique_consecutive()


@torch.no_grad()
def ddim_reconstruct(pipe, cond: Conditioning, x_t: torch.Tensor, timestep: int, num_steps: int) -> torch.Tensor:
    """Deterministic DDIM from x_t at the exact training ``timestep`` to x0 (scaled latents).

    ``ddim_denoise`` over ``ddim_timesteps`` with E[x0 | x_t] from the guided model output; the
    last x0 is returned. With ``num_steps`` = 1 this is the one-step Tweedie reconstruction."""
    alphas_cumprod = pipe.scheduler.alphas_cumprod.to(x_t.device)
    prediction_type = pipe.scheduler.config.prediction_type

    def denoiser(x, tb):
        out = guided_output(pipe, cond, x.to(pipe.unet.dtype), tb[0]).float()
        return x0_from_model_output(out, x, tb, alphas_cumprod, prediction_type)

    return ddim_denoise(denoiser, x_t, ddim_timesteps(timestep, num_steps).to(x_t.device), alphas_cumprod)
