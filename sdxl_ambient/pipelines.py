"""An SDXL pipeline for sampling: a base model or full fine-tune, a LoRA fused in, any diffusers
scheduler by name. Used by ``generate``, ``memorization`` and the demo."""

from __future__ import annotations

import json
from pathlib import Path

from sdxl_ambient.errors import UserError
from sdxl_ambient.files import SETTINGS_FILE
from sdxl_ambient.models import check_pipeline_files, lora_file, resolve_device, resolve_dtype, vae_source


def trained_timestep(model_path: str | None, lora_path: str | None = None) -> int | None:
    """The t_n a model was trained at, from the training_settings.json beside its LoRA (or in its
    full fine-tune's folder): the lowest level of its data ("resolved"); None when there is none."""
    candidates = []
    if lora_path:
        folder = Path(lora_path)
        candidates.append(folder if folder.is_dir() else folder.parent)
    elif model_path and Path(model_path).is_dir():
        candidates.append(Path(model_path))
    for folder in candidates:
        settings = folder / SETTINGS_FILE
        if settings.is_file():
            try:
                resolved = json.loads(settings.read_text()).get("resolved", {})
            except (json.JSONDecodeError, AttributeError):
                raise UserError(f"{settings} is not a training settings file (not valid JSON)") from None
            if isinstance(resolved.get("ambient_timestep"), int):
                return resolved["ambient_timestep"]
    return None


def load_pipeline(pretrained_model_name_or_path: str, *, lora_path: str | None = None, vae_path: str | None = None,
                  revision: str | None = None, variant: str | None = None, scheduler: str | None = None,
                  device: str | None = None, dtype: str = "auto", lora_scale: float = 1.0):
    """A ``StableDiffusionXLPipeline`` (safetensors weights only) with an optional LoRA fused in at
    ``lora_scale`` and an optional scheduler class (any diffusers scheduler, made from the model's
    scheduler config)."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    check_pipeline_files(pretrained_model_name_or_path, revision, variant)  # as training checks it, before loading
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    kwargs = dict(torch_dtype=torch_dtype, use_safetensors=True, revision=revision, variant=variant)
    if vae_path:
        kwargs["vae"] = AutoencoderKL.from_pretrained(**vae_source(vae_path), torch_dtype=torch_dtype, use_safetensors=True)
    try:
        pipe = StableDiffusionXLPipeline.from_pretrained(pretrained_model_name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        raise UserError(f"--pretrained_model_name_or_path {pretrained_model_name_or_path!r}: {err}") from None
    if lora_path:
        load_lora(pipe, lora_path)
        pipe.fuse_lora(lora_scale=lora_scale)
        pipe.unload_lora_weights()
    if scheduler:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dev)


def load_lora(pipe, lora_path: str) -> None:
    """Load a LoRA (a folder or .safetensors file, :func:`models.lora_file`) into ``pipe``, unfused."""
    from safetensors.torch import load_file

    pipe.load_lora_weights(load_file(str(lora_file(lora_path))), use_safetensors=True)


def make_scheduler(name: str, config):
    """A diffusers scheduler class by name, from ``config``."""
    import diffusers
    from diffusers import SchedulerMixin

    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        names = sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and not n.startswith("_"))
        raise UserError(f"--scheduler {name!r} is not a diffusers scheduler; one of: {', '.join(names)}")
    return cls.from_config(config)
