"""Names of the files and folders the toolkit reads and writes, in one place."""

from __future__ import annotations

import os
from pathlib import Path

# LoRA weights: diffusers' format (``pipe.load_lora_weights(folder)``) and the kohya / ComfyUI copy.
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"
LORA_FILES = (LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME)

# The sub-folders of an SDXL diffusers pipeline (those that hold weights first), and a diffusers model's weights file.
SDXL_WEIGHT_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
SDXL_PARTS = (*SDXL_WEIGHT_PARTS, "tokenizer", "tokenizer_2", "scheduler")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
MODEL_INDEX = "model_index.json"
PIPELINE_TMP_PREFIX = ".tmp-pipeline-"  # a full fine-tune's pipeline while it is written, beside its place

# A training run's output folder.
SETTINGS_FILE = "training_settings.json"
MODEL_CARD = "README.md"
LATENT_CACHE_DIR = "latent_cache"
SAMPLES_DIR = "samples"
VALIDATION_DIR = "validation"
EMA_DIR, EMA_STATE = "unet_ema", "ema_state.json"

# An image folder's captions (diffusers' imagefolder layout).
METADATA_FILES = ("metadata.jsonl", "metadata.csv")

# In every output folder: what sdxl-ambient commands wrote there, and the lock of the command running there.
OUTPUT_RECORD = ".sdxl-ambient.json"
LOCK_FILE = ".sdxl-ambient.lock"


def public_name(name_or_path: str | None) -> str | None:
    """A Hub id as given; a local path reduced to its last component (no absolute paths in shared files)."""
    if name_or_path is None:
        return None
    if os.path.isabs(name_or_path) or os.path.exists(name_or_path):
        return Path(name_or_path).resolve().name
    return name_or_path
