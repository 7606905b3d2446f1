"""An SDXL pipeline for sampling: a base model or full fine-tune, a LoRA fused in, any diffusers
scheduler by name. Used by ``generate``, ``memorization`` and the demo."""

from __future__ import annotations

import contextlib
from pathlib import Path

from sdxl_ambient.errors import UserError, first_line
from sdxl_ambient.hub import read_settings
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
        resolved = read_settings(folder).get("resolved")
        if isinstance(resolved, dict) and isinstance(resolved.get("ambient_timestep"), int):
            return resolved["ambient_timestep"]
    return None


def load_pipeline(pretrained_model_name_or_path: str, *, lora_path: str | None = None, vae_path: str | None = None,
                  revision: str | None = None, variant: str | None = None, scheduler: str | None = None,
                  device: str | None = None, dtype: str = "auto", lora_scale: float = 1.0, lora_flag: str = "--lora_path"):
    """A ``StableDiffusionXLPipeline`` (safetensors weights only) with an optional LoRA fused in at
    ``lora_scale`` and an optional scheduler class (any diffusers scheduler, made from the model's
    scheduler config). ``lora_flag`` names the LoRA in errors."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    check_pipeline_files(pretrained_model_name_or_path, revision, variant)  # as training checks it, before loading
    lora = read_lora(lora_path, lora_flag) if lora_path else None  # a damaged file is named before the model loads
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
        load_lora(pipe, *lora, model=pretrained_model_name_or_path, flag=lora_flag)
        pipe.fuse_lora(lora_scale=lora_scale)
        pipe.unload_lora_weights()
    if scheduler:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dev)


def load_lora(pipe, path: Path, state: dict, *, model: str, flag: str = "--lora_path") -> None:
    """Load a LoRA's tensors (from :func:`read_lora`) into ``pipe``; weights that do not fit the
    model (a LoRA of another model), or none that do, are one line naming the file."""
    before = _lora_layer_count(pipe)
    try:
        with _quiet_diffusers():  # it logs the whole error (one line per weight) before raising it
            pipe.load_lora_weights(state, use_safetensors=True)
    except Exception as err:  # keys or shapes of another model
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = next((line for line in lines if line.startswith("size mismatch")), lines[0] if lines else "")
        raise UserError(f"{flag} {path} does not fit the model {model} ({type(err).__name__}: {detail[:300]}): "
                        "give a LoRA trained on this base model") from None
    if _lora_layer_count(pipe) == before:
        raise UserError(f"{flag} {path} holds no LoRA weights for the model {model}: give a LoRA trained on "
                        "this base model")


def read_lora(lora_path, flag: str = "--lora_path"):
    """The LoRA file and its tensors (safetensors only); a file that cannot be read (truncated,
    damaged, not safetensors) is one line naming it. Cheap: call it before any model loads."""
    from safetensors.torch import load_file

    path = lora_file(lora_path, flag)
    try:
        return path, load_file(str(path))
    except Exception as err:  # the safetensors reader's error: truncated, damaged, not a safetensors file
        raise UserError(f"{flag} {path} cannot be read ({type(err).__name__}: {first_line(err)}): the file is "
                        "damaged or truncated; copy or save it again") from None


@contextlib.contextmanager
def _quiet_diffusers():
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def _lora_layer_count(pipe) -> int:
    """The LoRA layers loaded into the pipeline's UNet and text encoders."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    parts = (getattr(pipe, name, None) for name in ("unet", "text_encoder", "text_encoder_2"))
    return sum(isinstance(m, BaseTunerLayer) and bool(m.active_adapters) for part in parts if part is not None
               for m in part.modules())


def make_scheduler(name: str, config):
    """A diffusers scheduler class by name, from ``config``."""
    import diffusers
    from diffusers import SchedulerMixin

    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        names = sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and not n.startswith("_"))
        raise UserError(f"--scheduler {name!r} is not a diffusers scheduler; one of: {', '.join(names)}")
    return cls.from_config(config)
