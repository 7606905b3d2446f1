"""``sdxl-ambient corrupt``: turn images into a shareable noisy-latent dataset.

A data owner runs this once; the folder it writes holds only the observations
y = sqrt(abar_n) z + sqrt(1 - abar_n) eps (never the clean latents or the images), the
text embeddings and the captions. Training reads it directly with
``--train_data_dir OUT`` (or as one of ``--data_sources``).

Several levels in one dataset: an ``ambient_timestep`` column in ``metadata.jsonl`` gives an
image its own t_n, and ``--data_sources`` gives each source its own; ``--ambient_timestep`` is
the level of the images that have none. Every image needs a level.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from sdxl_ambient.cache import (
    ENCODE_BATCH_SIZE,
    SHARD_SIZE,
    CacheSettings,
    build_cache,
    cache_folder,
    check_cache_dir,
    planned_settings,
)
from sdxl_ambient.config import (
    add_data_arguments,
    add_device_argument,
    add_model_arguments,
    add_noise_arguments,
    at_least,
    data_config,
    data_sources,
    input_paths,
)
from sdxl_ambient.data import load_training_images
from sdxl_ambient.errors import UserError
from sdxl_ambient.objectives import check_ambient_timestep
from sdxl_ambient.outputs import check_apart


def add_arguments(parser) -> None:
    add_model_arguments(parser, required=True)
    add_data_arguments(parser)
    add_noise_arguments(parser)
    parser.add_argument("--output_dir", required=True,
                        help="A new folder for the noisy-latent dataset, apart from the images (an interrupted run is "
                             "completed by the same command).")
    parser.add_argument("--batch_size", type=int, default=ENCODE_BATCH_SIZE, help="Encoding batch size.")
    parser.add_argument("--shard_size", type=int, default=SHARD_SIZE, help="Examples per safetensors shard.")
    add_device_argument(parser)


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def summary(cache, images, alphas_cumprod) -> str:
    m = cache.manifest
    buckets = Counter(f"{h * 8}x{w * 8}" for h, w in cache.latent_shapes())
    lines = [
        f"noisy-latent dataset written to {cache.cache_dir}",
        f"  examples:  {len(cache)} from {m['data']['origin']} ({len(m['shards'])} shard(s), {_folder_size(cache.cache_dir) / 2**20:.1f} MiB)",
    ]
    counts = Counter(cache.ambient_timesteps)
    for level in sorted(counts):
        abar = float(alphas_cumprod[level]) if level > 0 else 1.0
        lines.append(f"  noise:     t_n = {level}, y = {abar ** 0.5:.4f} z + {(1 - abar) ** 0.5:.4f} eps ({counts[level]} examples)")
    if counts.get(0):
        lines.append(f"  warning:   {counts[0]} example(s) at t_n = 0 are clean: their latents decode to the images")
    lines.append("  sizes:     " + ", ".join(f"{k} (h x w) x{n}" for k, n in sorted(buckets.items())))
    if images.skipped:
        lines.append(f"  skipped {len(images.skipped)} broken image(s): {', '.join(images.skipped)}")
    if images.upscaled:
        lines.append(f"  upscaled {len(images.upscaled)} small image(s): {', '.join(images.upscaled)}")
    level = f" --ambient_timestep {cache.ambient_timestep}" if len(counts) == 1 else ""
    lines.append(f"  train on it with: sdxl-ambient train --train_data_dir {cache.cache_dir}{level} ...")
    return "\n".join(lines)


def run(args) -> int:
    from sdxl_ambient.models import check_pipeline_files, load_components, resolve_device

    at_least(args, 1, "batch_size", "shard_size")
    if args.ambient_timestep is not None:
        check_ambient_timestep(args.ambient_timestep)
    sources = data_sources(args)
    repeated = [s.label for s in sources if s.repeats != 1]
    if repeated:
        raise UserError(f"--data_sources: repeats (of {', '.join(repeated)}) is a training setting: give it to the source "
                        "that trains on this dataset")
    check_apart("--output_dir", args.output_dir, input_paths(args))
    output = cache_folder(args.output_dir, "--output_dir", command="corrupt")
    with output.locked():
        output.check_foreign(overwrite=False, overwrite_flag=None)  # only an unfinished (or finished) dataset of its own
        check_pipeline_files(args.pretrained_model_name_or_path, args.revision, args.variant)
        images = load_training_images(list(sources), data_config(args))  # every image checked before the model is loaded
        unleveled = [r.name for r in images.records if r.ambient_timestep is None]
        if args.ambient_timestep is None and unleveled:
            raise UserError(f"--ambient_timestep is required for the {len(unleveled)} image(s) without a level of their own "
                            f"(e.g. {unleveled[0]}): give it, or an ambient_timestep column / per-source ambient_timestep")
        made_with = planned_settings(data_config(args), args.pretrained_model_name_or_path,
                                     args.pretrained_vae_model_name_or_path, args.revision, args.variant, args.shard_size)
        check_cache_dir(CacheSettings(Path(args.output_dir), args.ambient_timestep, args.noise_seed), made_with, images)
        components = load_components(args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant,
                                     pretrained_vae_model_name_or_path=args.pretrained_vae_model_name_or_path,
                                     load_unet=False)  # encoding needs no UNet
        default = 0 if args.ambient_timestep is None else args.ambient_timestep  # only used when every image has its own
        cache = build_cache(args.output_dir, images, components, default, noise_seed=args.noise_seed,
                            shareable=True, batch_size=args.batch_size, shard_size=args.shard_size,
                            device=resolve_device(args.device))
    print(summary(cache, images, components.noise_scheduler.alphas_cumprod))
    return 0
