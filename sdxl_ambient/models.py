"""Loading SDXL, LoRA / full set-up, saving (diffusers + kohya/ComfyUI) and accelerate checkpoint hooks."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sdxl_ambient.durable import atomic_write, fsync_dir, fsync_tree
from sdxl_ambient.errors import UserError
from sdxl_ambient.files import (
    DIFFUSERS_WEIGHTS,
    EMA_DIR,
    EMA_STATE,
    KOHYA_WEIGHT_NAME,
    LORA_WEIGHT_NAME,
    MODEL_INDEX,
    PIPELINE_TMP_PREFIX,
    SDXL_PARTS,
    SDXL_WEIGHT_PARTS,
    public_name,
)
from sdxl_ambient.lora_formats import diffusers_to_kohya, text_encoder_module_path

UNET_ATTENTION_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
TEXT_ENCODER_ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
SDXL_PIPELINE_CLASSES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class SDXLComponents:
    tokenizer: Any
    tokenizer_2: Any
    text_encoder: Any
    text_encoder_2: Any
    vae: Any
    unet: Any
    noise_scheduler: Any
    model_id: str
    vae_id: str | None = None
    revision: str | None = None  # of model_id (a Hub id), as loaded
    variant: str | None = None


# ----------------------------------------------------------------------------- devices


def resolve_device(device: str | None) -> torch.device:
    """``--device``, default cuda when there is one, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``--dtype``: ``auto`` is float16 on a GPU, float32 on the CPU."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


# ----------------------------------------------------------------------------- loading


def _looks_local(name: str) -> bool:
    """A path the user meant as a folder: absolute, ./ ../ ~, or more than one '/' (Hub ids are owner/name)."""
    return name.startswith((".", "/", "~", "\\")) or name.count("/") > 1 or (len(name) > 1 and name[1] == ":")


def _read_model_index(name: str, revision: str | None, flag: str = "--pretrained_model_name_or_path") -> dict:
    from diffusers import DiffusionPipeline

    local = Path(name).expanduser()
    if local.exists() or _looks_local(name):
        if not local.is_dir():
            raise UserError(f"{flag} {name}: no such folder")
        if not (local / MODEL_INDEX).is_file():
            raise UserError(f"{flag} {name}: no {MODEL_INDEX}, not a diffusers pipeline folder")
    try:
        index = DiffusionPipeline.load_config(str(local) if local.is_dir() else name, revision=revision)
    except Exception as exc:  # Hub id that cannot be resolved (offline, typo, gated)
        raise UserError(f"{flag} {name}: cannot read {MODEL_INDEX} ({type(exc).__name__}: {exc})") from None
    cls = index.get("_class_name")
    if cls not in SDXL_PIPELINE_CLASSES:
        raise UserError(f"{flag} {name}: a {cls} pipeline, not Stable Diffusion XL (StableDiffusionXLPipeline)")
    missing = [part for part in SDXL_PARTS if not index.get(part) or index[part][0] is None]
    if missing:
        raise UserError(f"{flag} {name}: not an SDXL base pipeline, missing {', '.join(missing)}")
    if local.is_dir():
        absent = [part for part in SDXL_PARTS if not (local / part).is_dir()]
        if absent:
            raise UserError(f"{flag} {name}: missing sub-folder(s) {', '.join(absent)}")
    return index


def check_pipeline_files(name: str, revision: str | None = None, variant: str | None = None,
                         flag: str = "--pretrained_model_name_or_path") -> None:
    """An SDXL pipeline, checked without loading it: its model_index.json, its sub-folders and, for a
    local folder, safetensors weights (of ``variant``, if given) in each part that has weights.
    Errors name ``flag`` (the one that gave ``name``)."""
    _read_model_index(name, revision, flag)
    local = Path(name).expanduser()
    if not local.is_dir():
        return
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    for part in SDXL_WEIGHT_PARTS:
        if not any(p.name.endswith((suffix, suffix + ".index.json")) for p in (local / part).iterdir()):
            what = f"{variant} safetensors weights" if variant else "safetensors weights"
            raise UserError(f"{flag} {name}: {part}/ holds no {what} (*{suffix}); "
                            "only safetensors are loaded")


_CONTENT_SUFFIXES = (".json", ".txt")  # configs, tokenizer vocabularies: read whole (small)
_TOP_LEVEL = (MODEL_INDEX, "config.json")  # a pipeline's index, or a single model's config (a VAE folder)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json")


def _sampled_digest(path: Path, blocks: int = 8, block: int = 1 << 16) -> str:
    """sha256 of ``blocks`` evenly spaced 64 KiB blocks of a file (the first and last among them; a
    small file whole): two fine-tunes of one architecture, whose weight files have the same size,
    differ here, for a few seeks rather than a pass over gigabytes."""
    size, h = path.stat().st_size, hashlib.sha256()
    with open(path, "rb") as f:
        if size <= blocks * block:
            h.update(f.read())
        else:
            for i in range(blocks):
                f.seek((size - block) * i // (blocks - 1))
                h.update(f.read(block))
    return h.hexdigest()


def _files_digest(folder: Path) -> str:
    """A digest of what makes the model in ``folder`` that costs no pass over its weights: the contents
    of its ``model_index.json`` / ``config.json`` and of each SDXL part's config and tokenizer files,
    and the names, sizes and sampled blocks (:func:`_sampled_digest`) of the weight files (top level
    and in each part)."""
    entries = []

    def add(path: Path) -> None:
        rel = path.relative_to(folder).as_posix()
        if path.name.endswith(_CONTENT_SUFFIXES):
            entries.append([rel, hashlib.sha256(path.read_bytes()).hexdigest()])
        else:
            entries.append([rel, path.stat().st_size, _sampled_digest(path)])

    for path in sorted(folder.iterdir()):
        if path.is_file() and (path.name in _TOP_LEVEL or path.name.endswith(_WEIGHT_SUFFIXES)):
            add(path)
    for part in SDXL_PARTS:
        if (folder / part).is_dir():
            for path in sorted((folder / part).iterdir()):
                if path.is_file() and not path.name.startswith("."):
                    add(path)
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def model_identity(name_or_path: str | None, revision: str | None = None, variant: str | None = None) -> str | None:
    """Which model ``name_or_path`` is, as a run's fingerprint and a latent cache's manifest record it
    (never a local path): a local folder by its name and :func:`_files_digest` (another model in a
    folder of the same name differs; a moved folder is the same), a Hub id with ``revision``, both with
    ``variant``. None stays None."""
    if name_or_path is None:
        return None
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        identity = f"{public_name(str(local))} (files sha256 {_files_digest(local)[:16]})"
    else:
        identity = public_name(name_or_path) + (f"@{revision}" if revision else "")
    return identity + (f" variant {variant}" if variant else "")


def vae_source(vae_path: str) -> dict:
    """from_pretrained arguments for --pretrained_vae_model_name_or_path (a VAE folder, a pipeline folder, or a Hub id)."""
    flag = "--pretrained_vae_model_name_or_path"
    local = Path(vae_path).expanduser()
    if local.exists() or _looks_local(vae_path):
        if not local.is_dir():
            raise UserError(f"{flag} {vae_path}: no such folder")
        if (local / "config.json").is_file():
            return {"pretrained_model_name_or_path": str(local)}
        if (local / "vae" / "config.json").is_file():
            return {"pretrained_model_name_or_path": str(local), "subfolder": "vae"}
        raise UserError(f"{flag} {vae_path}: no config.json (nor vae/config.json), not a diffusers AutoencoderKL")
    return {"pretrained_model_name_or_path": vae_path}


def _dtype_key(library: str) -> str:
    """from_pretrained's precision argument: ``dtype`` from transformers 4.56 and diffusers 0.42, which
    deprecate ``torch_dtype``; ``torch_dtype`` before."""
    from importlib.metadata import version

    from packaging.version import Version

    since = {"transformers": "4.56", "diffusers": "0.42"}[library]
    return "dtype" if Version(version(library)) >= Version(since) else "torch_dtype"


def freeze(*models) -> None:
    for model in models:
        if model is not None:
            model.requires_grad_(False)


def load_components(
    pretrained_model_name_or_path: str,
    revision: str | None = None,
    variant: str | None = None,
    pretrained_vae_model_name_or_path: str | None = None,
    freeze_all: bool = True,
    unet_dtype: torch.dtype | None = None,
    text_encoder_dtype: torch.dtype | None = None,
    load_unet: bool = True,
) -> SDXLComponents:
    """Load every SDXL part from a diffusers folder or Hub id (safetensors only, no remote code).

    The training scheduler is a ``DDPMScheduler`` built from the model's scheduler config.

    ``unet_dtype`` / ``text_encoder_dtype``: load those parts directly in this precision (the
    training precision of frozen weights: a LoRA's base UNet, the text encoders). Left None,
    diffusers makes the UNet float32 whatever its files hold (twice the memory at load; the
    real-size figures are in BENCHMARKS.md). A full fine-tune keeps None (fp32 masters).
    ``load_unet=False`` leaves ``unet`` None, for jobs that only encode (``corrupt``)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    name = pretrained_model_name_or_path
    check_pipeline_files(name, revision, variant)
    if Path(name).expanduser().is_dir():
        name = str(Path(name).expanduser())
    common = dict(revision=revision)
    weights = dict(common, variant=variant, use_safetensors=True)
    te_weights = {**weights, **({_dtype_key("transformers"): text_encoder_dtype} if text_encoder_dtype else {})}
    unet_weights = {**weights, **({_dtype_key("diffusers"): unet_dtype} if unet_dtype else {})}
    vae_id = pretrained_vae_model_name_or_path
    vae_kwargs = {**vae_source(vae_id), "use_safetensors": True} if vae_id else \
        {"pretrained_model_name_or_path": name, "subfolder": "vae", **weights}
    components = SDXLComponents(
        tokenizer=AutoTokenizer.from_pretrained(name, subfolder="tokenizer", use_fast=False, **common),
        tokenizer_2=AutoTokenizer.from_pretrained(name, subfolder="tokenizer_2", use_fast=False, **common),
        text_encoder=CLIPTextModel.from_pretrained(name, subfolder="text_encoder", **te_weights),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(name, subfolder="text_encoder_2", **te_weights),
        vae=AutoencoderKL.from_pretrained(**vae_kwargs),
        unet=UNet2DConditionModel.from_pretrained(name, subfolder="unet", **unet_weights) if load_unet else None,
        noise_scheduler=DDPMScheduler.from_pretrained(name, subfolder="scheduler", **common),
        model_id=pretrained_model_name_or_path,
        vae_id=vae_id,
        revision=revision,
        variant=variant,
    )
    if freeze_all:
        freeze(components.vae, components.text_encoder, components.text_encoder_2, components.unet)
    return components


# ----------------------------------------------------------------------------- LoRA set-up


def _add_lora(model, rank: int, alpha: float | None, dropout: float, target_modules: Iterable[str],
              use_dora: bool = False) -> list[torch.nn.Parameter]:
    from peft import LoraConfig

    config = LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        lora_dropout=dropout,
        init_lora_weights="gaussian",
        target_modules=list(target_modules),
        use_dora=use_dora,
    )
    model.add_adapter(config)
    return [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]


def add_unet_lora(unet, rank: int, alpha: float | None = None, dropout: float = 0.0,
                  target_modules: Iterable[str] = UNET_ATTENTION_TARGETS, use_dora: bool = False) -> list[torch.nn.Parameter]:
    """Add a peft LoRA adapter to the UNet attention projections; returns its trainable parameters.

    ``W' = W + (alpha / rank) B A``; alpha defaults to rank (scale 1), as in diffusers' scripts. With
    ``use_dora`` it is peft's DoRA: ``W' = m / ||W + (alpha / rank) B A||_row * (W + (alpha / rank) B A)``,
    the magnitude m trained too."""
    return _add_lora(unet, rank, alpha, dropout, target_modules, use_dora)


def add_text_encoder_lora(text_encoder, rank: int, alpha: float | None = None,
                          target_modules: Iterable[str] = TEXT_ENCODER_ATTENTION_TARGETS,
                          use_dora: bool = False) -> list[torch.nn.Parameter]:
    """Add a peft LoRA (or DoRA) adapter to a CLIP text encoder's attention projections; returns its parameters."""
    return _add_lora(text_encoder, rank, alpha, 0.0, target_modules, use_dora)


def cast_training_params(models, dtype: torch.dtype = torch.float32) -> None:
    """Upcast the trainable parameters (LoRA or full) to ``dtype``, e.g. fp32 masters under fp16 autocast."""
    from diffusers.training_utils import cast_training_params as _cast

    models = [m for m in (models if isinstance(models, (list, tuple)) else [models]) if m is not None]
    _cast(models, dtype=dtype)


# ----------------------------------------------------------------------------- LoRA save / load


def _lora_alpha(model) -> float:
    return float(model.peft_config["default"].lora_alpha)


def _diffusers_lora_layers(model, component: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors keyed ``<module>.lora_A.weight`` / ``.lora_B.weight`` (peft spelling).

    ``load_lora_weights`` reads this spelling as is. diffusers' ``convert_state_dict_to_diffusers`` only
    renames attention projections (``to_q.lora.down``) and leaves other targets as ``lora_A``; diffusers'
    loader then decides the format from the first key and silently drops the rest, so we do not use it."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    if component != "unet":  # diffusers' text-encoder loader finds a DoRA magnitude only under its parameter name
        state = {text_encoder_module_path(k) + (".weight" if k.endswith(".lora_magnitude_vector") else ""): v
                 for k, v in state.items()}
    return {k: v.detach().contiguous() for k, v in state.items()}


def _dora_base_weights(model, component: str) -> dict[str, torch.Tensor]:
    """``"<component>.<module path>"`` -> base weight of each DoRA layer (the kohya copy's ``dora_scale`` needs it)."""
    out = {}
    for name, module in model.named_modules():
        if getattr(module, "lora_magnitude_vector", None):  # a peft LoRA layer with a DoRA magnitude
            path = name if component == "unet" else text_encoder_module_path(name)
            out[f"{component}.{path}"] = module.get_base_layer().weight.detach()
    return out


def save_lora(output_dir, unet=None, text_encoder=None, text_encoder_2=None,
              metadata: Mapping[str, str] | None = None) -> list[Path]:
    """Write ``pytorch_lora_weights.safetensors`` (diffusers) and ``pytorch_lora_weights_kohya.safetensors``,
    each atomically (:func:`durable.atomic_write`), the kohya copy first: a file there is always whole,
    and the diffusers file is there only once both are.

    The diffusers file carries the peft configs (rank, alpha, targets) as diffusers' adapter metadata,
    so ``pipe.load_lora_weights(output_dir)`` rebuilds the same scale. ``metadata`` (strings) goes into the
    kohya file's header next to kohya's ``ss_*`` keys."""
    from diffusers import StableDiffusionXLPipeline

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    models = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    models = {k: m for k, m in models.items() if m is not None}
    if not models:
        raise ValueError("save_lora needs at least one model with a LoRA adapter")
    first = next(iter(models.values())).peft_config["default"]
    layers = {k: _diffusers_lora_layers(m, k) for k, m in models.items()}
    configs = {k: m.peft_config["default"].to_dict() for k, m in models.items()}
    prefixed = {f"{k}.{name}": t for k, layer in layers.items() for name, t in layer.items()}
    unet_config = unet.config if unet is not None else None
    base_weights = {key: w for k, m in models.items() for key, w in _dora_base_weights(m, k).items()}
    kohya = diffusers_to_kohya(prefixed, {k: _lora_alpha(m) for k, m in models.items()}, unet_config=unet_config,
                               base_weights=base_weights)
    header = {
        "ss_network_module": "lycoris.kohya" if base_weights else "networks.lora",
        "ss_network_dim": str(first.r),
        "ss_network_alpha": str(float(first.lora_alpha)),
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_network_train_unet_only": str(text_encoder is None and text_encoder_2 is None),
        **({"ss_network_args": json.dumps({"algo": "lora", "dora_wd": "True", "wd_on_out": "True"})} if base_weights else {}),
        **{str(k): str(v) for k, v in (metadata or {}).items()},
    }
    atomic_write(output_dir / KOHYA_WEIGHT_NAME, lambda tmp: save_file(kohya, str(tmp), metadata=header))
    atomic_write(output_dir / LORA_WEIGHT_NAME, lambda tmp: StableDiffusionXLPipeline.save_lora_weights(
        tmp.parent,
        unet_lora_layers=layers.get("unet"),
        text_encoder_lora_layers=layers.get("text_encoder"),
        text_encoder_2_lora_layers=layers.get("text_encoder_2"),
        unet_lora_adapter_metadata=configs.get("unet"),
        text_encoder_lora_adapter_metadata=configs.get("text_encoder"),
        text_encoder_2_lora_adapter_metadata=configs.get("text_encoder_2"),
        weight_name=tmp.name,
    ))
    return [output_dir / LORA_WEIGHT_NAME, output_dir / KOHYA_WEIGHT_NAME]


def lora_file(path, flag: str = "--lora_path") -> Path:
    """The LoRA safetensors file: ``path`` itself, or in a folder its ``pytorch_lora_weights.safetensors``
    (or its only ``.safetensors`` file)."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise UserError(f"{flag} {path}: only .safetensors LoRA files are loaded")
        return path
    if path.is_dir():
        if (path / LORA_WEIGHT_NAME).is_file():
            return path / LORA_WEIGHT_NAME
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        raise UserError(f"{flag} {path}: expected {LORA_WEIGHT_NAME} or exactly one .safetensors file, found {len(found)}")
    raise UserError(f"{flag} {path}: no such file or folder")


def _set_lora(model, state: dict[str, torch.Tensor], component: str, path: Path) -> None:
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    from peft import set_peft_model_state_dict

    if not all(".lora_A." in k or ".lora_B." in k or ".lora_magnitude_vector" in k for k in state):  # older spellings
        state = convert_unet_state_dict_to_peft(state) if component == "unet" else convert_state_dict_to_peft(state)
    if component != "unet":
        if not hasattr(model, "text_model"):  # flattened CLIPTextModel (transformers 5)
            state = {k.removeprefix("text_model."): v for k, v in state.items()}
    result = set_peft_model_state_dict(model, state, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise UserError(f"{path}: {component} LoRA keys that match no adapter layer: {unexpected[:3]}")
    expected = {n for n, _ in model.named_parameters() if ".lora_" in n}
    loaded = {k.removesuffix(".weight") + ".default.weight" for k in state}
    if expected - loaded:
        raise UserError(f"{path}: {component} adapter layers missing from the file: {sorted(expected - loaded)[:3]}")


def load_lora_into(unet, text_encoder, text_encoder_2, lora_path) -> None:
    """Load our diffusers-format LoRA file (or a folder holding it) into peft-wrapped models, exactly."""
    path = Path(lora_path) / LORA_WEIGHT_NAME if Path(lora_path).is_dir() else Path(lora_path)
    state = load_file(str(path))
    models = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    for component, model in models.items():
        part = {k[len(component) + 1:]: v for k, v in state.items() if k.startswith(f"{component}.")}
        if model is None and part:
            raise UserError(f"{path} has {component} LoRA weights but no {component} adapter to load them into "
                             "(resume with the same --train_text_encoder setting)")
        if model is not None:
            if not part:
                raise UserError(f"{path} has no {component} LoRA weights")
            _set_lora(model, part, component, path)


# ----------------------------------------------------------------------------- full pipeline


def merged_copy(model):
    """A copy of ``model`` with its LoRA adapters merged into the base weights (W + (alpha/r) B A) and
    removed; the model itself when it has none. A plain model saves as a plain pipeline part."""
    import copy

    from peft.tuners.tuners_utils import BaseTunerLayer

    if not getattr(model, "peft_config", None):
        return model
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    del model.peft_config
    model._hf_peft_config_loaded = False
    return model


def save_full_pipeline(output_dir, components, unet, text_encoder=None, text_encoder_2=None) -> Path:
    """Save a complete ``StableDiffusionXLPipeline`` folder (safetensors) with the trained parts.

    LoRA adapters still attached (e.g. text-encoder LoRA beside a full UNet) are merged into the
    saved weights. The inference scheduler is SDXL's Euler discrete scheduler built from the model's
    scheduler config. The pipeline is written into a temporary folder beside its place, flushed, and
    its parts renamed into place, ``model_index.json`` last: a folder holding it is a whole pipeline."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=components.vae,
        text_encoder=merged_copy(text_encoder or components.text_encoder),
        text_encoder_2=merged_copy(text_encoder_2 or components.text_encoder_2),
        tokenizer=components.tokenizer,
        tokenizer_2=components.tokenizer_2,
        unet=merged_copy(unet),
        scheduler=EulerDiscreteScheduler.from_config(components.noise_scheduler.config),
    )
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"{PIPELINE_TMP_PREFIX}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        fsync_tree(tmp)
        (out / MODEL_INDEX).unlink(missing_ok=True)  # the folder is a pipeline again only once every part is in place
        for entry in sorted(tmp.iterdir(), key=lambda p: p.name == MODEL_INDEX):
            target = out / entry.name
            if target.is_dir():
                old = out / f"{PIPELINE_TMP_PREFIX}old-{entry.name}"
                os.replace(target, old)
                shutil.rmtree(old)
            os.replace(entry, target)
        fsync_dir(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------- EMA


def _ema_names(ema_unet, unet) -> list[str]:
    """UNet parameter names when the EMA covers the whole UNet (full fine-tune), else positions
    (an EMA of the trainable subset, e.g. LoRA parameters, as the trainer built it)."""
    names = [n for n, _ in unet.named_parameters()]
    if len(names) == len(ema_unet.shadow_params):
        return names
    return [f"shadow_params.{i}" for i in range(len(ema_unet.shadow_params))]


def save_ema(directory, ema_unet, unet) -> None:
    """EMA tensors as safetensors and the EMA counters as JSON. For a whole-UNet EMA the folder is
    also a loadable UNet (``UNet2DConditionModel.from_pretrained(directory)``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = _ema_names(ema_unet, unet)
    tensors = {n: p.detach().contiguous() for n, p in zip(names, ema_unet.shadow_params)}
    save_file(tensors, str(directory / DIFFUSERS_WEIGHTS), metadata={"format": "pt"})
    if not names[0].startswith("shadow_params."):
        unet.save_config(directory)
    counters = {k: v for k, v in ema_unet.state_dict().items() if k != "shadow_params"}
    (directory / EMA_STATE).write_text(json.dumps(counters, indent=2))


def load_ema(directory, ema_unet, unet) -> None:
    directory = Path(directory)
    tensors = load_file(str(directory / DIFFUSERS_WEIGHTS))
    names = _ema_names(ema_unet, unet)
    if set(names) != set(tensors):
        raise UserError(f"{directory}: EMA tensors do not match this run's EMA ({len(tensors)} saved, {len(names)} now)")
    state = json.loads((directory / EMA_STATE).read_text())
    state["shadow_params"] = [tensors[n].to(old.device) for n, old in zip(names, ema_unet.shadow_params)]
    ema_unet.load_state_dict(state)


# ----------------------------------------------------------------------------- accelerate hooks


def _has_lora(model) -> bool:
    return bool(getattr(model, "peft_config", None))


def _save_whole(model, directory: Path) -> None:
    if hasattr(model, "save_config"):  # diffusers
        model.save_pretrained(directory, safe_serialization=True)
    else:  # transformers 5 writes safetensors only
        model.save_pretrained(directory)


def _load_whole(model, directory: Path) -> None:
    if hasattr(model, "save_config"):  # diffusers: the file holds the state dict as is
        model.load_state_dict(load_file(str(directory / DIFFUSERS_WEIGHTS)))
    else:  # transformers may rename keys on save; let it read its own folder
        model.load_state_dict(type(model).from_pretrained(directory, use_safetensors=True).state_dict())


def register_checkpoint_hooks(accelerator, *, finetune: str, unet, text_encoder=None, text_encoder_2=None,
                              ema_unet=None) -> None:
    """Make ``accelerator.save_state`` / ``load_state`` write and restore our weights as safetensors.

    Models with a LoRA adapter go to ``pytorch_lora_weights{,_kohya}.safetensors`` (:func:`save_lora`),
    the others whole to ``unet/``, ``text_encoder/``, ``text_encoder_2/`` (``save_pretrained``); the EMA
    to ``unet_ema/``. Pass the text encoders only when they train. The hooks take the models they
    handle out of accelerate's ``weights`` / ``models`` lists so they are not also pickled; optimizer,
    LR scheduler and RNG states stay with accelerate."""
    if finetune not in ("lora", "full"):
        raise ValueError(f"--finetune must be 'lora' or 'full', got {finetune!r}")
    unwrap = accelerator.unwrap_model
    named = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    named = {k: unwrap(m) for k, m in named.items() if m is not None}
    if _has_lora(named["unet"]) != (finetune == "lora"):
        raise ValueError(f"--finetune {finetune} but the UNet {'has' if _has_lora(named['unet']) else 'has no'} LoRA adapter")
    lora = {k: m for k, m in named.items() if _has_lora(m)}
    whole = {k: m for k, m in named.items() if not _has_lora(m)}

    def _handled(models) -> list[int]:
        return [i for i, m in enumerate(models) if any(unwrap(m) is n for n in named.values())]

    def save_hook(models, weights, output_dir):
        out = Path(output_dir)
        if accelerator.is_main_process:
            if lora:
                save_lora(out, lora.get("unet"), lora.get("text_encoder"), lora.get("text_encoder_2"))
            for key, model in whole.items():
                _save_whole(model, out / key)
            if ema_unet is not None:
                save_ema(out / EMA_DIR, ema_unet, named["unet"])
        if len(weights) == len(models):
            for i in reversed(_handled(models)):
                weights.pop(i)

    def load_hook(models, input_dir):
        for i in reversed(_handled(models)):
            models.pop(i)
        src = Path(input_dir)
        if lora:
            load_lora_into(lora.get("unet"), lora.get("text_encoder"), lora.get("text_encoder_2"), src)
        for key, model in whole.items():
            _load_whole(model, src / key)
        if ema_unet is not None:
            load_ema(src / EMA_DIR, ema_unet, named["unet"])

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
