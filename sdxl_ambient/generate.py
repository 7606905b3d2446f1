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

import torch

from sdxl_ambient.sampling import DEFAULT_JUMP_MARGIN, sample

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def resolve_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: float16 on a GPU, float32 on the CPU."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def lora_file(path: str | Path) -> Path:
    """The LoRA safetensors file: ``path`` itself, or in a folder its ``pytorch_lora_weights.safetensors``
    (or its only ``.safetensors`` file)."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"--lora_path {path}: only .safetensors LoRA files are loaded")
        return path
    if path.is_dir():
        if (path / LORA_WEIGHT_NAME).is_file():
            return path / LORA_WEIGHT_NAME
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        raise ValueError(f"--lora_path {path}: expected {LORA_WEIGHT_NAME} or exactly one .safetensors file, found {len(found)}")
    raise ValueError(f"--lora_path {path}: no such file or folder")


def load_pipeline(pretrained_model_name_or_path: str, *, lora_path: str | None = None, vae_path: str | None = None,
                  revision: str | None = None, variant: str | None = None, scheduler: str | None = None,
                  device: str | None = None, dtype: str = "auto", lora_scale: float = 1.0):
    """A ``StableDiffusionXLPipeline`` (safetensors weights only) with an optional LoRA fused in at
    ``lora_scale`` and an optional scheduler class (any diffusers scheduler, made from the model's
    scheduler config)."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline
    from safetensors.torch import load_file

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    kwargs = dict(torch_dtype=torch_dtype, use_safetensors=True, revision=revision, variant=variant)
    if vae_path:
        kwargs["vae"] = AutoencoderKL.from_pretrained(vae_path, torch_dtype=torch_dtype, use_safetensors=True)
    try:
        pipe = StableDiffusionXLPipeline.from_pretrained(pretrained_model_name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(f"--pretrained_model_name_or_path {pretrained_model_name_or_path!r}: {err}") from err
    if lora_path:
        pipe.load_lora_weights(load_file(str(lora_file(lora_path))))
        pipe.fuse_lora(lora_scale=lora_scale)
        pipe.unload_lora_weights()
    if scheduler:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dev)


def make_scheduler(name: str, config):
    """A diffusers scheduler class by name, from ``config``."""
    import diffusers
    from diffusers import SchedulerMixin

    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        names = sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and not n.startswith("_"))
        raise ValueError(f"--scheduler {name!r} is not a diffusers scheduler; one of: {', '.join(names)}")
    return cls.from_config(config)


def read_prompts(prompt: list[str] | None, prompts_file: str | None) -> list[str]:
    """Prompts from --prompt (repeatable) and/or --prompts_file (one per line, blank lines skipped)."""
    prompts = list(prompt or [])
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise ValueError(f"--prompts_file {path}: no such file")
        prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError("give at least one --prompt or a non-empty --prompts_file")
    return prompts


def generate_images(pipe, prompts: list[str], *, num_images_per_prompt: int = 1, batch_size: int = 4, seed: int = 0,
                    resolution: int | None = None, **sample_kwargs) -> tuple[list, list[str]]:
    """Images and their prompts, ``batch_size`` prompts at a time, from one generator seeded once."""
    generator = torch.Generator("cpu").manual_seed(seed)
    images, captions = [], []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        images += sample(pipe, chunk, generator=generator, height=resolution, width=resolution,
                         num_images_per_prompt=num_images_per_prompt, **sample_kwargs)
        captions += [p for p in chunk for _ in range(num_images_per_prompt)]
    return images, captions


def write_images(output_dir: Path, images: list, captions: list[str]) -> list[str]:
    """Numbered PNGs, ``grid.png`` and ``metadata.jsonl``; returns the file names."""
    from sdxl_ambient.evaluation.report import image_grid

    output_dir.mkdir(parents=True, exist_ok=True)
    names = [f"{i:05d}.png" for i in range(len(images))]
    for name, image in zip(names, images):
        image.save(output_dir / name)
    image_grid(images, cols=min(len(images), max(1, math.ceil(math.sqrt(len(images)))))).save(output_dir / "grid.png")
    with open(output_dir / "metadata.jsonl", "w", encoding="utf-8") as f:
        for name, caption in zip(names, captions):
            f.write(json.dumps({"file_name": name, "text": caption}) + "\n")
    return names


def add_model_arguments(parser) -> None:
    """Flags that pick the model and how it samples (shared with ``sdxl-ambient memorization``)."""
    parser.add_argument("--num_inference_steps", type=int, default=30)
    parser.add_argument("--guidance_scale", type=float, default=5.0)
    parser.add_argument("--resolution", type=int, default=1024, help="height and width of the images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scheduler", default=None, help="a diffusers scheduler class name, e.g. DPMSolverMultistepScheduler")
    parser.add_argument("--jump_margin", type=int, default=DEFAULT_JUMP_MARGIN,
                        help="truncated sampling jumps to x0 from the last step >= ambient_timestep + jump_margin")
    parser.add_argument("--negative_prompt", default=None)
    parser.add_argument("--batch_size", type=int, default=4, help="prompts per sampling call")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: float16 on a GPU, float32 on the CPU")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--variant", default=None)
    parser.add_argument("--pretrained_vae_model_name_or_path", default=None)


def add_arguments(parser) -> None:
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="base SDXL model (or a full fine-tune)")
    parser.add_argument("--lora_path", default=None, help="LoRA folder or .safetensors file")
    parser.add_argument("--lora_scale", type=float, default=1.0)
    parser.add_argument("--prompt", action="append", help="a prompt (repeat the flag for several)")
    parser.add_argument("--prompts_file", default=None, help="text file, one prompt per line")
    parser.add_argument("--num_images_per_prompt", type=int, default=1)
    parser.add_argument("--ambient_timestep", type=int, default=0,
                        help="t_n the model was trained at: sample truncated there (0: full sampling)")
    parser.add_argument("--output_dir", required=True)
    add_model_arguments(parser)


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
