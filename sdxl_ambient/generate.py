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
from sdxl_ambient.models import lora_file
from sdxl_ambient.objectives import check_ambient_timestep
from sdxl_ambient.outputs import OutputFolder
from sdxl_ambient.pipelines import load_pipeline, trained_timestep
from sdxl_ambient.sampling import generate_images

SETTINGS = "generate.json"


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


def image_names(count: int) -> list[str]:
    return [f"{i:05d}.png" for i in range(count)]


def output_folder(path, count: int) -> OutputFolder:
    """The output folder and what ``generate`` writes there: the numbered PNGs, the grid, the captions, the settings."""
    return OutputFolder(path, command="generate", writes=[*image_names(count), "grid.png", METADATA_FILES[0], SETTINGS])


def write_images(output_dir: Path, images: list, captions: list[str]) -> list[str]:
    """Numbered PNGs, ``grid.png`` and ``metadata.jsonl``; returns the file names."""
    output_dir.mkdir(parents=True, exist_ok=True)
    names = image_names(len(images))
    for name, image in zip(names, images):
        image.save(output_dir / name)
    image_grid(images, cols=min(len(images), max(1, math.ceil(math.sqrt(len(images)))))).save(output_dir / "grid.png")
    with open(output_dir / METADATA_FILES[0], "w", encoding="utf-8") as f:
        for name, caption in zip(names, captions):
            f.write(json.dumps({"file_name": name, "text": caption}) + "\n")
    return names


def add_arguments(parser) -> None:
    from sdxl_ambient.config import add_model_arguments, add_output_folder_arguments, add_sampling_arguments

    add_model_arguments(parser, required=True)
    parser.add_argument("--lora_path", default=None, help="LoRA folder or .safetensors file")
    parser.add_argument("--lora_scale", type=float, default=1.0)
    parser.add_argument("--prompt", action="append", help="a prompt (repeat the flag for several)")
    parser.add_argument("--prompts_file", default=None, help="text file, one prompt per line")
    parser.add_argument("--num_images_per_prompt", type=int, default=1)
    parser.add_argument("--ambient_timestep", type=int, default=None,
                        help="t_n the model was trained at: sample truncated there, jumping to x0 from t_n + jump_margin "
                             "(0: full sampling). Default: the t_n in the training_settings.json beside the LoRA (or in "
                             "the fine-tune's folder), else 0.")
    add_output_folder_arguments(parser)
    add_sampling_arguments(parser)


def run(args) -> int:
    from sdxl_ambient.config import check_sampling_flags, model_paths

    check_sampling_flags(args)
    if args.ambient_timestep is not None:
        check_ambient_timestep(args.ambient_timestep)
    prompts = read_prompts(args.prompt, args.prompts_file)
    out = Path(args.output_dir)
    folder = output_folder(out, len(prompts) * args.num_images_per_prompt)
    inputs = [*model_paths(args), ("--lora_path", args.lora_path), ("--prompts_file", args.prompts_file)]
    with folder.checked_and_locked(inputs, args.overwrite_output_dir):  # before anything is loaded
        t_n = args.ambient_timestep
        if t_n is None:  # the model's own training level, as its training_settings.json records it
            t_n = trained_timestep(args.pretrained_model_name_or_path, args.lora_path) or 0
            print(f"sampling {'truncated at the trained t_n = ' + str(t_n) if t_n else 'to t = 0'} "
                  "(--ambient_timestep overrides it)")
        if args.lora_path:
            lora_file(args.lora_path)  # before the pipeline loads (load_pipeline checks the model's files first)
        pipe = load_pipeline(args.pretrained_model_name_or_path, lora_path=args.lora_path,
                             vae_path=args.pretrained_vae_model_name_or_path, revision=args.revision, variant=args.variant,
                             scheduler=args.scheduler, device=args.device, dtype=args.dtype, lora_scale=args.lora_scale)
        images, captions = generate_images(
            pipe, prompts, num_images_per_prompt=args.num_images_per_prompt, batch_size=args.batch_size, seed=args.seed,
            resolution=args.resolution, ambient_timestep=t_n, jump_margin=args.jump_margin,
            num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
            negative_prompt=args.negative_prompt,
        )
        folder.start(clear=folder.own())
        names = write_images(out, images, captions)
        settings = {k: v for k, v in vars(args).items() if k != "func"}
        settings.update(ambient_timestep=t_n, scheduler_class=type(pipe.scheduler).__name__, images=names)
        (out / SETTINGS).write_text(json.dumps(settings, indent=2, default=str))
    print(f"wrote {len(names)} images and grid.png to {out}")
    return 0
