"""``sdxl-ambient generate``: sample images from a base SDXL model with a LoRA, or from a full fine-tune.

Writes numbered PNGs, ``grid.png``, ``metadata.jsonl`` (file_name, text: the image folder format
training reads, so the output can be scored by ``sdxl-ambient quality``) and ``generate.json``
with the settings. ``--ambient_timestep t_n`` samples truncated at the training noise level
(see ``sdxl_ambient.sampling``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from sdxl_ambient.errors import UserError
from sdxl_ambient.files import METADATA_FILES
from sdxl_ambient.images import image_grid
from sdxl_ambient.pipelines import load_pipeline
from sdxl_ambient.sampling import generate_images


def read_prompts(prompt: list[str] | None, prompts_file: str | None) -> list[str]:
    """Prompts from --prompt (repeatable) and/or --prompts_file (one per line, blank lines skipped)."""
    prompts = list(prompt or [])
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise UserError(f"--prompts_file {path}: no such file")
        prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise UserError("give at least one --prompt or a non-empty --prompts_file")
    return prompts


def write_images(output_dir: Path, images: list, captions: list[str]) -> list[str]:
    """Numbered PNGs, ``grid.png`` and ``metadata.jsonl``; returns the file names."""
    output_dir.mkdir(parents=True, exist_ok=True)
    names = [f"{i:05d}.png" for i in range(len(images))]
    for name, image in zip(names, images):
        image.save(output_dir / name)
    image_grid(images, cols=min(len(images), max(1, math.ceil(math.sqrt(len(images)))))).save(output_dir / "grid.png")
    with open(output_dir / METADATA_FILES[0], "w", encoding="utf-8") as f:
        for name, caption in zip(names, captions):
            f.write(json.dumps({"file_name": name, "text": caption}) + "\n")
    return names


def add_arguments(parser) -> None:
    from sdxl_ambient.config import add_model_arguments, add_sampling_arguments

    add_model_arguments(parser, required=True)
    parser.add_argument("--lora_path", default=None, help="LoRA folder or .safetensors file")
    parser.add_argument("--lora_scale", type=float, default=1.0)
    parser.add_argument("--prompt", action="append", help="a prompt (repeat the flag for several)")
    parser.add_argument("--prompts_file", default=None, help="text file, one prompt per line")
    parser.add_argument("--num_images_per_prompt", type=int, default=1)
    parser.add_argument("--ambient_timestep", type=int, default=0,
                        help="t_n the model was trained at: sample truncated there (0: full sampling)")
    parser.add_argument("--output_dir", required=True)
    add_sampling_arguments(parser)


def run(args) -> int:
    prompts = read_prompts(args.prompt, args.prompts_file)
    pipe = load_pipeline(args.pretrained_model_name_or_path, lora_path=args.lora_path,
                         vae_path=args.pretrained_vae_model_name_or_path, revision=args.revision, variant=args.variant,
                         scheduler=args.scheduler, device=args.device, dtype=args.dtype, lora_scale=args.lora_scale)
    images, captions = generate_images(
        pipe, prompts, num_images_per_prompt=args.num_images_per_prompt, batch_size=args.batch_size, seed=args.seed,
        resolution=args.resolution, ambient_timestep=args.ambient_timestep, jump_margin=args.jump_margin,
        num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt,
    )
    out = Path(args.output_dir)
    names = write_images(out, images, captions)
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    settings.update(scheduler_class=type(pipe.scheduler).__name__, images=names)
    (out / "generate.json").write_text(json.dumps(settings, indent=2, default=str))
    print(f"wrote {len(names)} images and grid.png to {out}")
    return 0
