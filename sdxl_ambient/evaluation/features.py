"""Image embedders for memorisation and quality metrics, loaded from local folders or the Hub.

``DinoV2Embedder``: transformers' ``Dinov2Model``; images resized (shorter side) and center-cropped
to 224 px, ImageNet normalisation, the CLS token (the model's pooled output), L2-normalised for
similarity search; the paper's memorisation measure.

``ClipImageEmbedder``: a ``CLIPModel``'s projected image (and text) embeddings, 224 px with CLIP's
normalisation; an optional second similarity measure and the CLIP score.

SSCD (the copy-detection model) is distributed only as TorchScript / pickle archives, so it is left
out: weights here load through safetensors only.

Every embedder takes a list of PIL images (any sizes) or a float tensor (N, 3, H, W) in [0, 1] and
returns float32 features (N, D).
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sdxl_ambient.errors import UserError, first_line
from sdxl_ambient.images import center_crop_resize, open_image
from sdxl_ambient.models import resolve_device

DEFAULT_EMBEDDER = "facebook/dinov2-base"  # --embedder: the paper's memorisation measure

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def pil_to_tensor(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """(N, 3, size, size) float in [0, 1] from images (PIL images, paths or bytes), each read as
    training reads it (:func:`images.open_image`: EXIF orientation, 16-bit scaled) and center-cropped."""
    arrays = [np.asarray(center_crop_resize(open_image(im), size), dtype=np.float32) / 255.0 for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def resize_tensor(x: torch.Tensor, size: int) -> torch.Tensor:
    """Shorter side to ``size`` (bicubic, antialiased) and the central square, for (N, 3, H, W)."""
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[..., top:top + size, left:left + size]
    return x


class ImageEmbedder(abc.ABC):
    """Base: preprocessing to ``size`` px with (mean, std), batching, optional L2 normalisation.
    Subclasses give ``features(pixel_values)``."""

    size = 224
    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(self, model: torch.nn.Module, device=None, dtype=torch.float32, normalize: bool = True):
        self.device = resolve_device(device)
        self.dtype = dtype
        self.model = model.to(self.device, dtype).eval().requires_grad_(False)
        self.normalize = normalize

    @abc.abstractmethod
    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, D) features of normalised (N, 3, size, size) pixels."""

    @torch.no_grad()
    def embed_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Embed (N, 3, H, W) images in [0, 1] (uint8 in [0, 255] is accepted too)."""
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        x = resize_tensor(x.float().to(self.device), self.size)
        mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        feats = self.features(((x - mean) / std).to(self.dtype)).float()
        return F.normalize(feats, dim=-1) if self.normalize else feats

    def __call__(self, images, batch_size: int = 32) -> torch.Tensor:
        """Embed a list of PIL images or an image tensor, ``batch_size`` at a time; on the CPU."""
        if isinstance(images, torch.Tensor):
            chunks = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
            return torch.cat([self.embed_tensor(c).cpu() for c in chunks]) if chunks else torch.empty(0)
        images = list(images)
        if not images:
            raise ValueError("no images to embed")
        return torch.cat([
            self.embed_tensor(pil_to_tensor(images[i:i + batch_size], self.size)).cpu()
            for i in range(0, len(images), batch_size)
        ])

    @property
    def dim(self) -> int:
        return int(self.embed_tensor(torch.zeros(1, 3, self.size, self.size)).shape[-1])


class DinoV2Embedder(ImageEmbedder):
    """DINOv2 CLS token (``Dinov2Model`` pooled output: the final layer-normed CLS)."""

    def __init__(self, name_or_path: str, device=None, dtype=torch.float32, normalize: bool = True):
        from transformers import Dinov2Model

        self.name_or_path = str(name_or_path)
        model = _from_pretrained(Dinov2Model, name_or_path, "--embedder", "a DINOv2 model (e.g. facebook/dinov2-base)")
        super().__init__(model, device, dtype, normalize)

    def features(self, pixel_values):
        return self.model(pixel_values=pixel_values).pooler_output


class ClipImageEmbedder(ImageEmbedder):
    """CLIP's projected image embedding; ``embed_text`` gives the projected text embedding."""

    mean, std = CLIP_MEAN, CLIP_STD

    def __init__(self, name_or_path: str, device=None, dtype=torch.float32, normalize: bool = True):
        from transformers import CLIPModel, CLIPTokenizer

        self.name_or_path = str(name_or_path)
        model = _from_pretrained(CLIPModel, name_or_path, "--clip_model", "a CLIP model (e.g. openai/clip-vit-large-patch14)")
        self.size = int(model.config.vision_config.image_size)
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(str(name_or_path))
        except (OSError, ValueError) as err:
            raise UserError(f"--clip_model {name_or_path!r}: cannot load its tokenizer ({first_line(err)})") from None
        super().__init__(model, device, dtype, normalize)

    def features(self, pixel_values):
        return _pooled(self.model.get_image_features(pixel_values=pixel_values))

    @torch.no_grad()
    def embed_text(self, prompts: Sequence[str]) -> torch.Tensor:
        max_len = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        feats = _pooled(self.model.get_text_features(**tokens.to(self.device))).float().cpu()
        return F.normalize(feats, dim=-1) if self.normalize else feats


def _pooled(output) -> torch.Tensor:
    """transformers < 5 returns the projected features, >= 5 a model output holding them."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' own load report (a table of missing / unexpected tensors) is replaced by our one-line check."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _from_pretrained(cls, name_or_path, flag: str, family: str):
    """``cls.from_pretrained`` with safetensors weights only, refusing anything but a complete
    checkpoint of ``cls``'s family: the config's ``model_type`` is checked before any weight is
    read, and a load that leaves a tensor missing or of the wrong shape (so randomly initialised)
    is refused. Errors are one line naming the flag."""
    from transformers import PretrainedConfig

    name_or_path = str(name_or_path)
    expected = cls.config_class.model_type
    try:
        config, _ = PretrainedConfig.get_config_dict(name_or_path)
    except (OSError, ValueError) as err:
        raise UserError(f"{flag} {name_or_path!r}: no model config to read, expected {family} ({first_line(err)})") from None
    found = config.get("model_type")
    if found != expected:
        what = f"model_type {found!r}" if found else "no model_type"
        architectures = config.get("architectures") or []
        raise UserError(f"{flag} {name_or_path!r} has {what}{f' ({architectures[0]})' if architectures else ''}: "
                        f"expected {family}, model_type {expected!r}")
    try:
        with _quiet_transformers():
            model, info = cls.from_pretrained(name_or_path, use_safetensors=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise UserError(f"{flag} {name_or_path!r}: cannot load a {cls.__name__} with safetensors weights "
                        f"({first_line(err)})") from None
    absent = sorted(info.get("missing_keys") or []) + sorted(str(k[0]) for k in info.get("mismatched_keys") or [])
    if absent:
        raise UserError(f"{flag} {name_or_path!r}: {len(absent)} of the {cls.__name__}'s tensors are missing from its "
                        f"weights or have another shape ({', '.join(absent[:3])}{', ...' if len(absent) > 3 else ''}), "
                        f"so they would be random: give a complete checkpoint of {family}")
    return model
