"""A tiny SDXL-shaped pipeline with random weights, built offline.

Same component classes, conditioning and latent geometry as SDXL-base (two CLIP text
encoders, the second with a projection, text_time added conditioning, a 4-block VAE so
latents are 1/8 of the image), a few hundred thousand parameters in all. The demo and
the tests train on it on a CPU with no network.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from sdxl_ambient.files import MODEL_INDEX

SDXL_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def write_tokenizer_files(directory: str | os.PathLike) -> Path:
    """Write a byte-level CLIP vocabulary (every byte, alone and word-final) and an empty merge list.

    Load it with ``CLIPTokenizer.from_pretrained(directory, model_max_length=77)``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, "do_lower_case": True}))
    (directory / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
    }))
    return directory


TINY_TEXT_DIM, TINY_POOLED_DIM, TINY_TIME_DIM = 32, 32, 8


def tiny_unet_config() -> dict:
    """The tiny UNet's config: SDXL-base's block types and text_time conditioning, 1M parameters."""
    return dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 1),
        cross_attention_dim=2 * TINY_TEXT_DIM,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TINY_TIME_DIM,
        projection_class_embeddings_input_dim=6 * TINY_TIME_DIM + TINY_POOLED_DIM,
        norm_num_groups=8,
    )


def build_tiny_pipeline(seed: int = 0, workdir: str | os.PathLike | None = None):
    """A ``StableDiffusionXLPipeline`` with tiny random components (deterministic in ``seed``)."""

    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    text_dim = TINY_TEXT_DIM
    unet = UNet2DConditionModel(**tiny_unet_config())
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.13025,
    )
    common = dict(
        hidden_size=text_dim, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=77, vocab_size=2 * 256 + 2, bos_token_id=512, eos_token_id=513, pad_token_id=513,
        hidden_act="gelu", projection_dim=TINY_POOLED_DIM,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(**common))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**common))
    tok_dir = write_tokenizer_files(Path(workdir or tempfile.mkdtemp(prefix="tiny_tok_")) / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)
    tokenizer_2 = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)
    scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
    )


def save_tiny_pipeline(path: str | os.PathLike, seed: int = 0) -> Path:
    """Build the tiny pipeline and save it as a diffusers folder (safetensors weights)."""
    path = Path(path)
    if (path / MODEL_INDEX).exists():
        return path
    with tempfile.TemporaryDirectory(prefix="tiny_tok_") as scratch:  # nothing written beside the pipeline folder
        pipe = build_tiny_pipeline(seed, workdir=scratch)
        pipe.save_pretrained(path, safe_serialization=True)
    return path


def save_tiny_dinov2(path: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny random DINOv2 (transformers' Dinov2Model, 224 px input) saved as safetensors: an
    offline stand-in for facebook/dinov2-* that exercises the memorisation and quality code."""
    from transformers import Dinov2Config, Dinov2Model

    path = Path(path)
    if not (path / "config.json").exists():
        torch.manual_seed(seed)
        config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                              image_size=224, patch_size=16)
        Dinov2Model(config).save_pretrained(path, safe_serialization=True)
    return path


def add_arguments(parser) -> None:
    parser.add_argument("output_dir", help="a new or empty folder to write the diffusers pipeline to")
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    """Write the pipeline into a new or empty folder, under the folder's lock; any folder that holds
    something (an earlier pipeline included) is refused, so nothing there is replaced."""
    from sdxl_ambient.errors import UserError
    from sdxl_ambient.files import SDXL_PARTS
    from sdxl_ambient.outputs import OutputFolder

    path = Path(args.output_dir)
    if path.exists() and not path.is_dir():
        raise UserError(f"make-tiny OUTPUT_DIR {path} is a file: give a new or empty folder")
    folder = OutputFolder(path, command="make-tiny", writes=(MODEL_INDEX, *SDXL_PARTS), flag="make-tiny OUTPUT_DIR")
    with folder.locked():
        if folder.entries():
            raise UserError(f"make-tiny OUTPUT_DIR {path} already holds {', '.join(folder.entries()[:5])}: give a new "
                            "or empty folder (nothing there is replaced)")
        save_tiny_pipeline(path, seed=args.seed)
    print(f"tiny SDXL-shaped pipeline written to {path}")
    return 0
