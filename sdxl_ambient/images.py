"""Images in and out: the one image reader (every mode to RGB, EXIF orientation applied), the
image suffixes the toolkit recognises, a center crop and a grid. Training, sampling and
evaluation all read images through :func:`open_image`."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from sdxl_ambient.errors import UserError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
BACKGROUND = (255, 255, 255)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def _scale_high_bit_depth(im: Image.Image) -> Image.Image:
    """I;16 / I / F images to 8-bit L. 16-bit data (I;16*, or I with values above 255) is divided
    by 257 so 65535 -> 255; float images in [0, 1] are multiplied by 255."""
    arr = np.asarray(im).astype(np.float64)
    if im.mode.startswith("I;16") or (im.mode == "I" and arr.max(initial=0) > 255):
        arr = arr / 257.0
    elif im.mode == "F" and arr.max(initial=0) <= 1.0:
        arr = arr * 255.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: transparency is composited onto white, 16-bit is scaled to 8-bit."""
    if im.mode.startswith("I") or im.mode == "F":
        im = _scale_high_bit_depth(im)
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def _open(source: Any) -> Image.Image:
    if isinstance(source, Image.Image):
        return source.copy()
    return Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)


def open_image(source: Any, name: str | None = None) -> Image.Image:
    """An image fully decoded, EXIF-oriented, RGB, from a path, encoded bytes or a PIL image.

    A file that cannot be read is a :class:`UserError` naming it (``name``, else the path)."""
    try:
        with _open(source) as im:
            im.load()
            return to_rgb(ImageOps.exif_transpose(im))
    except Exception as e:  # PIL raises many kinds (OSError, SyntaxError, ValueError, DecompressionBombError)
        shown = name or (os.fspath(source) if isinstance(source, (str, os.PathLike)) else "image")
        raise UserError(f"cannot read image {shown}: {type(e).__name__}: {e}") from None


def load_images(paths: Sequence[str | os.PathLike]) -> list[Image.Image]:
    return [open_image(Path(p)) for p in paths]


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """RGB (:func:`to_rgb`), shorter side resized to ``size`` (bicubic), then the central ``size`` square."""
    image = to_rgb(image)
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size))


def image_grid(images: Sequence[Image.Image], cols: int | None = None, cell: int | None = None) -> Image.Image:
    """The images tiled row by row in square cells of ``cell`` px (default: the first image's size)."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    cw, ch = (cell, cell) if cell else images[0].size
    grid = Image.new("RGB", (cols * cw, rows * ch), BACKGROUND)
    for i, im in enumerate(images):
        grid.paste(to_rgb(im).resize((cw, ch)), ((i % cols) * cw, (i // cols) * ch))
    return grid
