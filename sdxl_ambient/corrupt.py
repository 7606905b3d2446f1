"""``sdxl-ambient corrupt``: turn images into a shareable noisy-latent dataset.

A data owner runs this once; the folder it writes holds only the observations
y = sqrt(abar_n) z + sqrt(1 - abar_n) eps (never the clean latents or the images), the
text embeddings and the captions. Training reads it directly with
``--train_data_dir OUT``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from sdxl_ambient.cache import ENCODE_BATCH_SIZE, SHARD_SIZE, build_cache
from sdxl_ambient.config import (
    add_data_arguments,
    add_device_argument,
    add_model_arguments,
    add_noise_arguments,
    data_config,
    data_source,
)
from sdxl_ambient.data import load_training_images


def add_arguments(parser) -> None:
    add_model_arguments(parser, required=True)
    add_data_arguments(parser)
    add_noise_arguments(parser, required=True)
    parser.add_argument("--output_dir", required=True, help="Folder for the noisy-latent dataset (an interrupted run is completed).")
    parser.add_argument("--batch_size", type=int, default=ENCODE_BATCH_SIZE, help="Encoding batch size.")
    parser.add_argument("--shard_size", type=int, default=SHARD_SIZE, help="Examples per safetensors shard.")
    add_device_argument(parser)


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
    from sdxl_ambient.models import load_components, resolve_device

    images = load_training_images(data_source(args), data_config(args))  # every image checked before the model is loaded
    components = load_components(args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant,
                                 pretrained_vae_model_name_or_path=args.pretrained_vae_model_name_or_path)
    cache = build_cache(args.output_dir, images, components, args.ambient_timestep, noise_seed=args.noise_seed,
                        shareable=True, batch_size=args.batch_size, shard_size=args.shard_size,
                        device=resolve_device(args.device))
    print(summary(cache, images))
    return 0
