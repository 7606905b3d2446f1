"""``sdxl-ambient corrupt``: turn images into a shareable noisy-latent dataset.

A data owner runs this once; the folder it writes holds only the observations
y = sqrt(abar_n) z + sqrt(1 - abar_n) eps (never the clean latents or the images), the
text embeddings and the captions. Training reads it directly with
``--train_data_dir OUT``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import secrets

import torch

from sdxl_ambient.cache import ENCODE_BATCH_SIZE, SHARD_SIZE, build_cache
from sdxl_ambient.data import load_training_images

def add_arguments(parser) -> None:
    a = parser.add_argument
    a("--pretrained_model_name_or_path", required=True, help="SDXL pipeline: Hub id or local folder.")
    a("--pretrained_vae_model_name_or_path", default=None, help="A separate VAE (e.g. madebyollin/sdxl-vae-fp16-fix).")
    a("--revision", default=None)
    a("--variant", default=None)
    a("--train_data_dir", default=None, help="Image folder with metadata.jsonl (or .txt captions beside the images).")
    a("--dataset_name", default=None, help="A Hub dataset (or a folder load_from_disk reads).")
    a("--dataset_config_name", default=None)
    a("--image_column", default="image")
    a("--caption_column", default="text")
    a("--max_train_samples", type=int, default=None)
    a("--ambient_timestep", type=int, required=True, help="t_n: the noise level to corrupt to (0 = clean latents).")
    a("--resolution", type=int, default=1024)
    a("--center_crop", action="store_true")
    a("--random_flip", action="store_true")
    a("--enable_bucket", action="store_true", help="Aspect-ratio bucketing (kohya's flag).")
    a("--min_bucket_reso", type=int, default=512)
    a("--max_bucket_reso", type=int, default=2048)
    a("--bucket_reso_steps", type=int, default=64)
    a("--skip_broken_images", action="store_true", help="Skip unreadable images (each is reported) instead of stopping.")
    a("--allow_empty_captions", action="store_true")
    a("--seed", type=str, default=None,
      help="Seeds the fixed noise, the VAE sample and the crops/flips. Default: a fresh secret seed that is never "
           "stored. Whoever knows the seed can remove the noise: give one only to be able to rebuild, and keep it private.")
    a("--output_dir", required=True, help="Folder for the noisy-latent dataset (an interrupted run is completed).")
    a("--batch_size", type=int, default=ENCODE_BATCH_SIZE, help="Encoding batch size.")
    a("--shard_size", type=int, default=SHARD_SIZE, help="Examples per safetensors shard.")
    a("--device", default=None, help="Where to encode (default: cuda if available, else cpu).")


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def summary(cache, images) -> str:
    m = cache.manifest
    buckets = Counter(f"{h * 8}x{w * 8}" for h, w in cache.latent_shapes())
    abar = m["observation_abar"]
    lines = [
        f"noisy-latent dataset written to {cache.cache_dir}",
        f"  examples:  {len(cache)} from {m['data']['origin']} ({len(m['shards'])} shard(s), {_folder_size(cache.cache_dir) / 2**20:.1f} MiB)",
        f"  noise:     t_n = {cache.ambient_timestep}, y = {abar ** 0.5:.4f} z + {(1 - abar) ** 0.5:.4f} eps",
        "  sizes:     " + ", ".join(f"{k} (h x w) x{n}" for k, n in sorted(buckets.items())),
    ]
    if images.skipped:
        lines.append(f"  skipped {len(images.skipped)} broken image(s): {', '.join(images.skipped)}")
    if images.upscaled:
        lines.append(f"  upscaled {len(images.upscaled)} small image(s): {', '.join(images.upscaled)}")
    lines.append(f"  train on it with: sdxl-ambient train --train_data_dir {cache.cache_dir} --ambient_timestep {cache.ambient_timestep} ...")
    return "\n".join(lines)


def run(args) -> int:
    if not args.train_data_dir and not args.dataset_name:
        raise ValueError("give --train_data_dir or --dataset_name")
    if args.seed is None:
        args.seed = secrets.token_hex(16)  # 128 bits, printed nowhere, stored only as a digest
    images = load_training_images(args)  # every image checked before the model is loaded
    from sdxl_ambient.models import load_components

    components = load_components(args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant,
                                 pretrained_vae_model_name_or_path=args.pretrained_vae_model_name_or_path)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cache = build_cache(args.output_dir, images, components, args.ambient_timestep,
                        batch_size=args.batch_size, shard_size=args.shard_size, device=device)
    print(summary(cache, images))
    return 0
