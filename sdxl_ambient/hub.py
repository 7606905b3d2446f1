"""Saved settings, the model card, and Hub pushes (final folder and background checkpoint uploads).

A Hub token is read from ``HF_TOKEN`` or the stored login; it is never written into settings,
cards or log messages, and neither is the secret noise seed."""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from sdxl_ambient.durable import atomic_write
from sdxl_ambient.errors import UserError, first_line
from sdxl_ambient.files import EMA_DIR, LORA_FILES, MODEL_CARD, MODEL_INDEX, SDXL_PARTS, SETTINGS_FILE
from sdxl_ambient.images import IMAGE_SUFFIXES

logger = logging.getLogger(__name__)

CARD_FILES = (MODEL_CARD, SETTINGS_FILE)
CHECKPOINT_WEIGHTS = (*LORA_FILES, "unet/*", f"{EMA_DIR}/*", "text_encoder/*", "text_encoder_2/*")
# Settings keys whose values never leave the machine: Hub tokens, and the noise seed that would undo the noise.
SECRET_KEYS = ("token", "noise_seed")
UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
PAPER = "https://arxiv.org/abs/2404.10177"


# ----------------------------------------------------------------------------- tokens and settings


def resolve_token(token: str | None = None) -> str | None:
    """``token`` (from code), else ``HF_TOKEN``, else the token stored by ``hf auth login``."""
    if token:
        return token
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    from huggingface_hub import get_token

    return get_token()


def _known_secrets(extra: str | None = None) -> list[str]:
    secrets = [extra, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")]
    try:
        from huggingface_hub import get_token

        secrets.append(get_token())
    except Exception:  # no stored login, unreadable file
        pass
    return [s for s in secrets if s]


def _redact(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def _jsonable(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


def _holds_secret(value, secrets: list[str]) -> bool:
    text = json.dumps(value)
    return any(secret in text for secret in secrets)


def public_settings(items: dict) -> dict:
    """The settings without any ``*token*`` or noise-seed key and without any value holding a Hub token."""
    secrets = _known_secrets(items.get("hub_token"))
    out = {}
    for key, value in sorted(items.items()):
        if any(word in key.lower() for word in SECRET_KEYS):
            continue
        value = _jsonable(value)
        if not _holds_secret(value, secrets):
            out[key] = value
    return out


def write_settings(output_dir, settings) -> Path:
    path = Path(output_dir) / SETTINGS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(public_settings(settings), indent=2) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return path


def read_settings(folder) -> dict:
    """The ``training_settings.json`` in ``folder`` ({} when there is none); a damaged one is a
    one-line error naming it. The one reader of the file (``push``, the t_n of a trained model)."""
    path = Path(folder) / SETTINGS_FILE
    if not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is damaged ({type(exc).__name__}: {first_line(exc)}): restore it, or delete it "
                        "and give the settings it held as flags") from None
    if not isinstance(settings, dict):
        raise UserError(f"{path} is not a training settings file (a JSON object): restore it, or delete it "
                        "and give the settings it held as flags")
    return settings


# ----------------------------------------------------------------------------- model card


def _front_matter(repo_id, base_model, finetune, image_paths, validation_prompt) -> str:
    tags = ["stable-diffusion-xl", "stable-diffusion-xl-diffusers", "text-to-image", "diffusers"]
    tags += ["lora"] if finetune == "lora" else []
    tags += ["ambient-diffusion", "template:sd-lora"]
    lines = ["---", "license: openrail++", "library_name: diffusers", f"base_model: {json.dumps(base_model)}", "tags:"]
    lines += [f"- {t}" for t in tags]
    if image_paths:
        lines.append("widget:")
        for path in image_paths:
            lines += [f"- text: {json.dumps(validation_prompt or '')}", "  output:", f"    url: {json.dumps(path)}"]
    lines.append("---")
    return "\n".join(lines)


def _ambient_section(settings: dict) -> str:
    t_n = int(settings.get("ambient_timestep") or 0)
    if t_n == 0:
        head = ("Trained with `ambient_timestep` = 0: the data were treated as clean, so this is an "
                "ordinary denoising fine-tune.")
    else:
        head = (
            f"The training images were only available as noisy latents at diffusion time t_n = {t_n}: "
            "y = sqrt(abar_n) x0 + sqrt(1 - abar_n) eps. For t >= t_n the model learned E[x0 | x_t] from y "
            "with the double Tweedie objective; for t < t_n a consistency loss ties its predictions to its "
            f"own sampler ([Consistent Diffusion Meets Tweedie]({PAPER}), Daras, Dimakis, Daskalakis, ICML 2024)."
        )
    sources = settings.get("data_sources") or []
    levels = {str(k) for src in sources for k in (src["ambient_timestep"] if isinstance(src["ambient_timestep"], dict)
                                                  else [src["ambient_timestep"]])}
    if len(levels) > 1:
        head = (f"The training data mixed noise levels (t_n = {', '.join(sorted(levels, key=int))}; 0 = clean): each "
                "example's loss was the double Tweedie objective above its own t_n (the plain denoising loss for a "
                "clean one), and the consistency loss applied to the noisy ones only "
                f"([Consistent Diffusion Meets Tweedie]({PAPER}), Daras, Dimakis, Daskalakis, ICML 2024).")
    ambient = {k: v for k, v in settings.items()
               if k.startswith(("ambient", "consistency")) or "weighting" in k or "tweedie" in k}
    rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in ambient.items())
    section = f"## Ambient training\n\n{head}\n\n| setting | value |\n|---|---|\n{rows}\n"
    if sources:
        table = "\n".join(f"| {src['name']} | {src['examples']} | {src['repeats']} | "
                          + (", ".join(f"{k}: {n}" for k, n in src["ambient_timestep"].items())
                             if isinstance(src["ambient_timestep"], dict) else f"{src['ambient_timestep']}") + " |"
                          for src in sources)
        section += f"\n### Data sources\n\n| source | examples | repeats | t_n (0 = clean) |\n|---|---|---|---|\n{table}\n"
        if settings.get("held_out_examples"):
            section += (f"\n{settings['held_out_examples']} noisy examples were held out for the validation loss "
                        "(not trained on).\n")
    return section


def _usage(repo_id: str, base_model: str, finetune: str, dora: bool = False) -> str:
    if finetune == "lora":
        other_tools = (f"For ComfyUI use `{LORA_FILES[1]}` (kohya key names, DoRA as ComfyUI's `dora_scale`); put it in "
                       "`models/loras`. Automatic1111 and kohya's scripts read DoRA in another form: use diffusers there.\n"
                       if dora else
                       f"For ComfyUI, Automatic1111/Forge and kohya tools use `{LORA_FILES[1]}` (kohya key names, "
                       "original SDXL UNet block names); put it in `models/loras`.\n")
        return (
            "## How to use\n\n```python\nimport torch\nfrom diffusers import StableDiffusionXLPipeline\n\n"
            f"pipe = StableDiffusionXLPipeline.from_pretrained({base_model!r}, torch_dtype=torch.float16).to(\"cuda\")\n"
            f"pipe.load_lora_weights({repo_id!r})\nimage = pipe(\"your prompt\").images[0]\n```\n\n" + other_tools
        )
    return (
        "## How to use\n\n```python\nimport torch\nfrom diffusers import StableDiffusionXLPipeline\n\n"
        f"pipe = StableDiffusionXLPipeline.from_pretrained({repo_id!r}, torch_dtype=torch.float16).to(\"cuda\")\n"
        "image = pipe(\"your prompt\").images[0]\n```\n"
    )


def _card_path(path, output_dir) -> str:
    """An image path as it will be in the repo: relative to ``output_dir`` (paths may be given
    absolute, relative to the working directory, or relative to ``output_dir``)."""
    path = Path(path)
    if output_dir is None:
        if path.is_absolute():
            raise ValueError(f"sample image {path}: give paths relative to the output folder, or pass output_dir")
        return path.as_posix()
    root = Path(output_dir).resolve()
    candidates = [path] if path.is_absolute() else [root / path, Path.cwd() / path]
    for candidate in candidates:
        if candidate.resolve().is_relative_to(root) and candidate.exists():
            return candidate.resolve().relative_to(root).as_posix()
    raise ValueError(f"sample image {path} is not a file inside the output folder {output_dir}")


def model_card(*, repo_id: str, base_model: str, settings: dict, finetune: str, image_paths, validation_prompt,
               output_dir=None) -> str:
    """README.md for the Hub: YAML front matter (license, base model, tags, widget), the ambient
    settings, how to load, the kohya/ComfyUI file and sample images (paths as in the repo, i.e.
    relative to ``output_dir``). Settings pass through :func:`public_settings`: no token reaches the card."""
    settings = public_settings(settings)
    images = [_card_path(p, output_dir) for p in image_paths or []]
    kind = "LoRA" if finetune == "lora" else "full fine-tune"
    parts = [
        _front_matter(repo_id, base_model, finetune, images, validation_prompt),
        f"\n# {repo_id}\n",
        f"Stable Diffusion XL {kind} of `{base_model}`, trained with sdxl-ambient on noisy data.\n",
        _ambient_section(settings),
        _usage(repo_id, base_model, finetune, dora=bool(settings.get("use_dora"))),
    ]
    if images:
        gallery = "\n".join(f"![sample {i}]({p})" for i, p in enumerate(images))
        parts.append(f"## Samples\n\nPrompt: `{validation_prompt}`\n\n{gallery}\n")
    parts.append("## Training settings\n\nAll resolved settings are in `training_settings.json`.\n")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- file lists


def _rel(paths, root: Path) -> list[str]:
    return sorted({p.relative_to(root).as_posix() for p in paths if p.is_file()})


def _excluded_dir(part: str) -> bool:
    return part.startswith((".", "checkpoint-", "logs")) or "cache" in part.lower()


def final_upload_files(output_dir) -> list[str]:
    """The files a final push uploads: weights (LoRA in both formats, or the pipeline folder),
    README.md, training_settings.json and sample images. Never checkpoints, caches, logs or pickles."""
    root = Path(output_dir)
    files = [root / n for n in (*LORA_FILES, *CARD_FILES, MODEL_INDEX)]
    if (root / MODEL_INDEX).is_file():
        for part in SDXL_PARTS:
            files += [p for p in (root / part).rglob("*") if not p.name.endswith(UNSAFE_SUFFIXES)]
    for image in root.rglob("*"):
        rel = image.relative_to(root).parts
        if image.suffix.lower() in IMAGE_SUFFIXES and not any(_excluded_dir(d) for d in rel[:-1]) \
                and rel[0] not in SDXL_PARTS:
            files.append(image)
    return _rel(files, root)


def checkpoint_upload_files(checkpoint_dir, include_training_state: bool = False) -> list[str]:
    """A checkpoint's weights only (LoRA files, unet/, unet_ema/, text encoders), or everything
    (optimizer, scheduler, RNG states) with ``include_training_state``."""
    root = Path(checkpoint_dir)
    if include_training_state:
        return _rel(root.rglob("*"), root)
    files = [p for pattern in CHECKPOINT_WEIGHTS for p in root.glob(pattern)]
    return _rel(files, root)


def _patterns(files: list[str]) -> list[str]:
    return [glob.escape(f) for f in files]


# ----------------------------------------------------------------------------- pushing


def _api(api, token):
    if api is not None:
        return api
    from huggingface_hub import HfApi

    return HfApi(token=token)


def prepare_repo(repo_id: str, *, private: bool = False, flag: str = "--push_to_hub", token: str | None = None,
                 api=None) -> str:
    """Before any work: check that a push can succeed (a token, the Hub reachable, the repo created
    or already there in a namespace the token can write to), as diffusers' scripts create the repo
    at the start. Returns the repo's full id; anything in the way is a one-line error naming ``flag``."""
    check_repo_id(repo_id)
    token = resolve_token(token)
    if not token:
        raise UserError(f"{flag} needs a Hub token with write access: set HF_TOKEN or run `hf auth login`")
    try:
        repo = _api(api, token).create_repo(repo_id=repo_id, private=private, exist_ok=True, token=token)
    except OSError as err:  # offline, unreachable, no rights to the namespace (HTTP errors are OSErrors)
        raise UserError(_redact(f"{flag}: cannot create or reach the Hub repo {repo_id!r} ({type(err).__name__}: "
                                f"{first_line(err)}); check the network, the token's write access and --hub_model_id",
                                _known_secrets(token))) from None
    return getattr(repo, "repo_id", None) or repo_id


def check_repo_id(repo_id: str) -> None:
    """A repo id the Hub accepts (NAME or OWNER/NAME of letters, digits, '-', '_', '.'); the default
    one, the output folder's name, often is not (``my run (v2)``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise UserError(f"--hub_model_id {repo_id!r} is not a valid Hub repo id ({first_line(err)}); without "
                        "--hub_model_id the output folder's name is used: give --hub_model_id NAME or OWNER/NAME") from None


def default_repo_id(hub_model_id: str | None, output_dir) -> str:
    """The repo a run pushes to: --hub_model_id, else the output folder's name (as in diffusers' scripts)."""
    return hub_model_id or Path(output_dir).name


def try_push_final(output_dir, repo_id: str, *, private: bool = False, token: str | None = None, api=None,
                   exclude=()) -> str | None:
    """:func:`push_final`; when it fails (network, Hub) nothing local is touched and the returned
    one-line message says where the files are and how to push them later. None when pushed."""
    try:
        push_final(output_dir, repo_id, token=token, private=private, api=api, exclude=exclude)
    except OSError as err:
        return _redact(f"training finished and its weights are in {output_dir}, but the push to the Hub repo {repo_id!r} "
                       f"failed ({type(err).__name__}: {first_line(err)}); push them later with "
                       f"`sdxl-ambient push --output_dir {output_dir} --hub_model_id {repo_id}`", _known_secrets(token))
    return None


def push_final(output_dir, repo_id: str, *, token: str | None = None, private: bool = False, api=None,
               exclude=()):
    """Create (or reuse) the model repo and upload :func:`final_upload_files` in one commit, leaving
    out those under the top-level names ``exclude`` (files the run did not write)."""
    token = resolve_token(token)
    api = _api(api, token)
    files = [f for f in final_upload_files(output_dir) if f.split("/")[0] not in set(exclude)]
    if not files:
        raise FileNotFoundError(f"{output_dir}: nothing to upload (no weights, card or images)")
    repo = api.create_repo(repo_id=repo_id, private=private, exist_ok=True, token=token)
    repo_id = getattr(repo, "repo_id", repo_id)
    logger.info("uploading %d files from %s to %s", len(files), output_dir, repo_id)
    return api.upload_folder(repo_id=repo_id, folder_path=str(output_dir), allow_patterns=_patterns(files),
                             commit_message="Upload final weights (sdxl-ambient)", token=token)


class CheckpointPusher:
    """Upload checkpoints in a background thread while training goes on.

    ``mode="subfolder"`` puts checkpoint N under ``checkpoint-N/`` on main; ``mode="branch"`` on a
    branch ``checkpoint-N``. The files are hard-linked (or copied) into a staging folder before
    :meth:`push` returns, so deleting old checkpoints cannot race the upload. Upload errors are
    logged and returned by :meth:`wait`; they never stop training."""

    def __init__(self, repo_id: str, *, token: str | None = None, api=None, include_training_state: bool = False,
                 mode: str = "subfolder", private: bool = False):
        if mode not in ("subfolder", "branch"):
            raise ValueError(f"checkpoint push mode must be 'subfolder' or 'branch', got {mode!r}")
        self.repo_id, self.mode, self.private = repo_id, mode, private
        self.include_training_state = include_training_state
        self._token = resolve_token(token)
        self._api = _api(api, self._token)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-push")
        self._futures: list[tuple[int, Future]] = []
        self._repo_ready = False

    def _stage(self, checkpoint_dir: Path, files: list[str]) -> Path:
        staging = Path(tempfile.mkdtemp(prefix="sdxl_ambient_push_"))
        for rel in files:
            dest = staging / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(checkpoint_dir / rel, dest)
            except OSError:
                shutil.copy2(checkpoint_dir / rel, dest)
        return staging

    def _upload(self, staging: Path, files: list[str], step: int):
        try:
            if not self._repo_ready:
                self._api.create_repo(repo_id=self.repo_id, private=self.private, exist_ok=True, token=self._token)
                self._repo_ready = True
            name = f"checkpoint-{step}"
            kwargs = dict(repo_id=self.repo_id, folder_path=str(staging), allow_patterns=_patterns(files),
                          commit_message=f"Checkpoint at step {step}", token=self._token)
            if self.mode == "branch":
                self._api.create_branch(repo_id=self.repo_id, branch=name, exist_ok=True, token=self._token)
                return self._api.upload_folder(**kwargs, revision=name)
            return self._api.upload_folder(**kwargs, path_in_repo=name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def push(self, checkpoint_dir, step: int) -> Future:
        """Queue an upload of ``checkpoint_dir``'s :func:`checkpoint_upload_files`; returns at once."""
        checkpoint_dir = Path(checkpoint_dir)
        files = checkpoint_upload_files(checkpoint_dir, self.include_training_state)
        if not files:
            raise FileNotFoundError(f"{checkpoint_dir}: no checkpoint weights to upload")
        staging = self._stage(checkpoint_dir, files)
        future = self._executor.submit(self._upload, staging, files, step)
        self._futures.append((step, future))
        return future

    def wait(self) -> list[str]:
        """Block until queued uploads finish; returns one message per failed upload (tokens redacted)."""
        errors = []
        for step, future in self._futures:
            exc = future.exception()
            if exc is not None:
                message = _redact(f"checkpoint-{step} upload to {self.repo_id} failed: {type(exc).__name__}: {exc}",
                                  _known_secrets(self._token))
                logger.warning(message)
                errors.append(message)
        self._futures = []
        return errors

    def close(self) -> list[str]:
        errors = self.wait()
        self._executor.shutdown(wait=True)
        return errors

    def abandon(self) -> None:
        """On an early stop (preemption, a non-finite streak): drop queued uploads and do not wait for
        the one in flight, so the process can exit within its grace period."""
        self._executor.shutdown(wait=False, cancel_futures=True)
