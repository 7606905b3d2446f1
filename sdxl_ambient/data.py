"""Images and captions in, SDXL training examples out.

Sources: an image folder (diffusers' imagefolder layout with ``metadata.jsonl``, or
kohya-style ``.txt`` captions beside the images), a Hub dataset
(``datasets.load_dataset``) or a folder ``datasets.load_from_disk`` reads. Every record
carries a stable key (its relative file name, or its dataset row index) from which all
random choices are seeded, so an example is transformed the same way every time.

Micro-conditioning follows diffusers' train_text_to_image_lora_sdxl.py: resize (the
shorter side to the resolution, or to cover the bucket), flip, then crop; time_ids are

    (original_h, original_w, crop_top, crop_left, target_h, target_w)

with the crop's top-left measured in the resized (and flipped) image.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdxl_ambient.errors import UserError, first_line
from sdxl_ambient.files import METADATA_FILES, public_name
from sdxl_ambient.images import is_image_file, open_image
from sdxl_ambient.objectives import check_ambient_timestep

logger = logging.getLogger(__name__)

CAPTION_EXTENSIONS = (".txt", ".caption")
VAE_FACTOR = 8


@dataclass(frozen=True)
class DataSource:
    """Where the training images and captions come from: an image folder (``metadata.jsonl`` or
    kohya ``.txt`` captions, or a ``save_to_disk`` folder) or a Hub dataset, and how to read it.

    One entry of ``--data_sources`` (or the one source of ``--train_data_dir`` / ``--dataset_name``):
    ``ambient_timestep`` is this source's noise level t_n (None: the run's ``--ambient_timestep``; an
    ``ambient_timestep`` column of the metadata overrides it per image), ``repeats`` how many times
    each of its examples is seen per epoch, ``name`` how logs, the model card and the examples' keys
    name it (default: the folder's or dataset's name)."""

    train_data_dir: str | None = None
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    image_column: str = "image"
    caption_column: str = "text"
    max_train_samples: int | None = None
    skip_broken_images: bool = False
    allow_empty_captions: bool = False
    ambient_timestep: int | None = None
    repeats: int = 1
    name: str | None = None

    def __post_init__(self):
        if not self.dataset_name and not self.train_data_dir:
            raise UserError("give --dataset_name or --train_data_dir")
        if self.dataset_name and self.train_data_dir:
            raise UserError("--dataset_name and --train_data_dir contradict each other: give one")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise UserError(f"--max_train_samples {self.max_train_samples} must be >= 1")
        if self.ambient_timestep is not None:
            check_ambient_timestep(self.ambient_timestep, where=f"{self.label}: ambient_timestep")
        if self.repeats < 1:
            raise UserError(f"repeats {self.repeats} of {self.label} must be >= 1")
        if self.name is not None and (not self.name or "/" in self.name):
            raise UserError(f"the data source name {self.name!r} must be non-empty and hold no '/'")

    @property
    def label(self) -> str:
        """How logs, the model card and (with several sources) the examples' keys name this source."""
        return self.name or self.origin

    @property
    def origin(self) -> str:
        """Where the data came from, without the local machine's absolute paths."""
        return public_name(self.dataset_name) if self.dataset_name else Path(self.train_data_dir).name


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class ImageRecord:
    """One image and its caption. ``source`` is a file path, encoded bytes or a PIL image."""

    key: str
    caption: str
    source: Any
    fingerprint: dict = field(default_factory=dict)
    original_size: tuple[int, int] | None = None  # (h, w) after EXIF orientation; set by check_images
    ambient_timestep: int | None = None  # its own t_n (a metadata column, or its source's); None: the run's

    @property
    def name(self) -> str:
        """How errors and warnings name this image."""
        return str(self.source) if isinstance(self.source, Path) else f"dataset row {self.key}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists()


def _check_columns(columns: list[str], source: DataSource) -> None:
    for flag, name in (("--image_column", source.image_column), ("--caption_column", source.caption_column)):
        if name not in columns:
            raise UserError(f"{flag} {name!r} is not a column of the dataset; its columns are {sorted(columns)}")


def _metadata_rows(path: Path) -> list[Any]:
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}, line {n}: not valid JSON ({e})") from None
        return rows
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


TIMESTEP_COLUMN = "ambient_timestep"


def row_timestep(value, where: str) -> int | None:
    """An example's ``ambient_timestep`` cell: a whole number, a timestep of the schedule (0 = clean), or
    None when empty."""
    if value is None or value == "":
        return None
    text = value.strip() if isinstance(value, str) else value
    whole = isinstance(text, int) or (isinstance(text, str) and text.removeprefix("-").isdigit())
    if isinstance(value, bool) or not whole:
        raise UserError(f"{where}: {TIMESTEP_COLUMN} {value!r} must be a whole number (0 = clean)")
    check_ambient_timestep(int(text), where=f"{where}: {TIMESTEP_COLUMN}")
    return int(text)


def read_metadata(folder: str | os.PathLike, caption_column: str = "text") -> list[dict] | None:
    """The rows of an image folder's ``metadata.jsonl`` (or ``.csv``), each checked to be an object
    with a ``file_name`` of an existing file and the caption column; None when the folder has none."""
    folder = Path(folder)
    path = next((folder / name for name in METADATA_FILES if (folder / name).is_file()), None)
    if path is None:
        return None
    rows = _metadata_rows(path)
    for n, row in enumerate(rows, 1):
        where = f"{path}, row {n}"
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected an object like {{\"file_name\": ..., \"{caption_column}\": ...}}, "
                            f"got {type(row).__name__}")
        if not isinstance(row.get("file_name"), str) or not row["file_name"]:
            raise UserError(f"{where}: no 'file_name' (the image's path relative to {folder}); its keys are {sorted(row)}")
        if caption_column not in row:
            raise UserError(f"{where}: --caption_column {caption_column!r} is not one of its keys {sorted(row)}")
        if not (folder / row["file_name"]).is_file():
            raise UserError(f"{where}: lists {row['file_name']!r}, which is not in the folder")
        row[TIMESTEP_COLUMN] = row_timestep(row.get(TIMESTEP_COLUMN), where)
    return rows


def _file_fingerprint(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path.read_bytes())}


def folder_records(folder: str | os.PathLike, caption_column: str = "text") -> list[ImageRecord]:
    """Records of an image folder: ``metadata.jsonl``/``.csv`` (``file_name`` + caption column),
    else every image with its kohya-style ``.txt``/``.caption`` file (empty caption when none)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--train_data_dir {folder} is not a folder")
    rows = read_metadata(folder, caption_column)
    records = []
    if rows is not None:
        for row in rows:
            path = folder / row["file_name"]
            caption = row[caption_column]
            records.append(ImageRecord(row["file_name"], "" if caption is None else str(caption), path, _file_fingerprint(path),
                                       ambient_timestep=row[TIMESTEP_COLUMN]))
    else:
        for path in sorted(p for p in folder.rglob("*") if is_image_file(p)):
            caption_file = next((c for c in (path.with_suffix(e) for e in CAPTION_EXTENSIONS) if c.exists()), None)
            caption = caption_file.read_text(encoding="utf-8").strip() if caption_file else ""
            key = path.relative_to(folder).as_posix()
            records.append(ImageRecord(key, caption, path, _file_fingerprint(path)))
    if not records:
        raise UserError(f"--train_data_dir {folder} holds no images (expected images with metadata.jsonl or .txt captions)")
    return records


def _row_image(value: Any, row: int) -> tuple[Any, dict]:
    """(source, fingerprint) of a dataset cell: an undecoded Image dict, a path string or a PIL image."""
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        data = value["bytes"] if value.get("bytes") else Path(value["path"]).read_bytes()
        return data, {"bytes": len(data), "sha256": _sha256(data)}
    if isinstance(value, str):
        data = Path(value).read_bytes()
        return data, {"bytes": len(data), "sha256": _sha256(data)}
    if isinstance(value, Image.Image):
        return value, {"sha256": _sha256(value.mode.encode() + str(value.size).encode() + value.tobytes())}
    raise UserError(f"dataset row {row}: the image cell is a {type(value).__name__}, not an image")


def dataset_records(dataset, image_column: str, caption_column: str, name: str) -> list[ImageRecord]:
    """Records of a ``datasets.Dataset`` (keys are row indices; images are read undecoded)."""
    from datasets import Image as ImageFeature

    if image_column in dataset.features and isinstance(dataset.features[image_column], ImageFeature):
        dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
    if len(dataset) == 0:
        raise UserError(f"dataset {name} is empty")
    records = []
    for i, row in enumerate(dataset):
        source, fingerprint = _row_image(row[image_column], i)
        caption = row[caption_column]
        level = row_timestep(row.get(TIMESTEP_COLUMN), f"dataset {name}, row {i}")
        records.append(ImageRecord(str(i), "" if caption is None else str(caption), source, fingerprint, ambient_timestep=level))
    return records


def load_hf_dataset(dataset_name: str, dataset_config_name: str | None = None):
    """The train split of a Hub dataset, or of a folder written by ``save_to_disk``."""
    import datasets
    from datasets.exceptions import DatasetsError

    from sdxl_ambient.durable import write_failure

    try:
        if Path(dataset_name).is_dir() and _is_saved_dataset(Path(dataset_name)):
            ds = datasets.load_from_disk(dataset_name)
        else:
            ds = datasets.load_dataset(dataset_name, dataset_config_name)
    except (OSError, ValueError, DatasetsError) as err:  # no such dataset, offline, no access, a bad name or config
        if write_failure(err) is not None:  # the disk refused the download: that is not the flag's fault
            raise
        config = f" --dataset_config_name {dataset_config_name}" if dataset_config_name else ""
        raise UserError(f"--dataset_name {dataset_name}{config} cannot be loaded ({type(err).__name__}: "
                        f"{first_line(err)[:300]}): check the name (a Hub dataset id or a save_to_disk folder), "
                        "the network (HF_DATASETS_OFFLINE, HF_HUB_OFFLINE) and your access to it") from None
    if isinstance(ds, (datasets.DatasetDict, dict)):
        if "train" not in ds:
            raise UserError(f"--dataset_name {dataset_name}: no 'train' split (splits: {sorted(ds)})")
        ds = ds["train"]
    return ds


def collect_records(source: DataSource) -> list[ImageRecord]:
    """Records from --dataset_name, or --train_data_dir (an image folder or a ``save_to_disk``
    folder), cut to --max_train_samples (the first N)."""
    name, limit = source.dataset_name, source.max_train_samples
    if not name and _is_saved_dataset(Path(source.train_data_dir)):
        name = str(source.train_data_dir)
    if not name:
        records = folder_records(source.train_data_dir, source.caption_column)
        return records[:limit] if limit is not None else records
    ds = load_hf_dataset(name, source.dataset_config_name)
    _check_columns(list(ds.column_names), source)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return dataset_records(ds, source.image_column, source.caption_column, name)


# ----------------------------------------------------------------------------- image loading


def load_image(record: ImageRecord) -> Image.Image:
    """The record's image, fully decoded, EXIF-oriented, RGB (:func:`images.open_image`). Errors name the file."""
    return open_image(record.source, record.name)


# ----------------------------------------------------------------------------- checks


def check_images(records: list[ImageRecord], skip_broken_images: bool = False) -> tuple[list[ImageRecord], list[str]]:
    """Decode every image once, before any expensive work; fill in ``original_size``.

    A broken image is an error naming it, or with ``skip_broken_images`` is dropped and
    reported (a warning naming each; their keys are returned)."""
    kept, skipped = [], []
    for record in records:
        try:
            im = load_image(record)
        except UserError as e:
            if not skip_broken_images:
                raise UserError(f"{e} (pass --skip_broken_images to skip such files)") from None
            logger.warning("skipping broken image: %s", e)
            skipped.append(record.key)
            continue
        kept.append(replace(record, original_size=(im.height, im.width)))
    if not kept:
        raise UserError(f"no readable images: all {len(records)} were broken")
    return kept, skipped


def check_captions(records: list[ImageRecord], allow_empty_captions: bool = False) -> None:
    empty = [r.name for r in records if not r.caption.strip()]
    if empty and not allow_empty_captions:
        shown = ", ".join(empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
        raise UserError(f"{len(empty)} image(s) have an empty caption: {shown} (pass --allow_empty_captions to train on them)")
    if empty:
        logger.warning("%d image(s) have an empty caption (allowed by --allow_empty_captions)", len(empty))


def warn_small_images(records: list[ImageRecord], config: DataConfig) -> list[str]:
    """Keys of images smaller than their target size (they get upscaled); one warning names them."""
    small = [r for r in records if any(o < t for o, t in zip(r.original_size, config.target_size(r.original_size)))]
    if small:
        logger.warning("%d image(s) are smaller than the training size and will be upscaled: %s",
                       len(small), ", ".join(r.name for r in small))
    return [r.key for r in small]


# ----------------------------------------------------------------------------- geometry


def bucket_resolutions(resolution: int, min_reso: int, max_reso: int, steps: int) -> list[tuple[int, int]]:
    """kohya's buckets: (h, w) with sides in [min_reso, max_reso], multiples of ``steps``,
    area <= resolution^2, plus the square bucket."""
    max_area = resolution * resolution
    side = (resolution // steps) * steps
    buckets = {(side, side)}
    for w in range(steps, max_reso + 1, steps):
        if w < min_reso:
            continue
        h = min(max_reso, (max_area // w) // steps * steps)
        if h >= min_reso:
            buckets.update({(h, w), (w, h)})
    return sorted(buckets)


def closest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio w/h is closest to the image's (ties: the larger area)."""
    ratio = size[1] / size[0]
    return min(buckets, key=lambda b: (abs(b[1] / b[0] - ratio), -b[0] * b[1]))


def check_resolution(resolution: int) -> None:
    """--resolution (training's examples and sampling's images alike) must be a positive multiple of the VAE's factor."""
    if resolution <= 0 or resolution % VAE_FACTOR:
        raise UserError(f"--resolution {resolution} must be a positive multiple of {VAE_FACTOR} (the VAE downsamples by 8)")


@dataclass(frozen=True)
class DataConfig:
    """The settings that decide how an image becomes a training example."""

    resolution: int = 1024
    center_crop: bool = False
    random_flip: bool = False
    enable_bucket: bool = False
    min_bucket_reso: int = 512
    max_bucket_reso: int = 2048
    bucket_reso_steps: int = 64

    def __post_init__(self):
        check_resolution(self.resolution)
        if self.enable_bucket:
            if self.bucket_reso_steps <= 0 or self.bucket_reso_steps % VAE_FACTOR:
                raise UserError(f"--bucket_reso_steps {self.bucket_reso_steps} must be a positive multiple of {VAE_FACTOR}")
            if not 0 < self.min_bucket_reso <= self.resolution <= self.max_bucket_reso:
                raise UserError(f"--resolution {self.resolution} must lie between --min_bucket_reso {self.min_bucket_reso} "
                                f"and --max_bucket_reso {self.max_bucket_reso}")

    def buckets(self) -> list[tuple[int, int]]:
        if not self.enable_bucket:
            return [(self.resolution, self.resolution)]
        return bucket_resolutions(self.resolution, self.min_bucket_reso, self.max_bucket_reso, self.bucket_reso_steps)

    def target_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """(h, w) the image is trained at."""
        return closest_bucket(original_size, self.buckets()) if self.enable_bucket else (self.resolution, self.resolution)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def example_generator(seed: int, key: str, purpose: str) -> torch.Generator:
    """A CPU generator seeded by (seed, example key, purpose): the same draws every run."""
    digest = hashlib.sha256(f"{seed}\x00{key}\x00{purpose}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def resize_to_cover(im: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Scale (keeping the aspect ratio) so the image covers target (h, w): for a square
    target this puts the shorter side at the resolution."""
    th, tw = target
    scale = max(th / im.height, tw / im.width)
    h, w = max(th, round(im.height * scale)), max(tw, round(im.width * scale))
    return im if (h, w) == (im.height, im.width) else im.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=None)


def transform_image(im: Image.Image, target: tuple[int, int], center_crop: bool, random_flip: bool,
                    generator: torch.Generator) -> tuple[torch.Tensor, tuple[int, int]]:
    """Resize to cover, flip with probability 1/2 (if random_flip), crop to target.

    Returns pixels (3, h, w) in [-1, 1] and the crop's (top, left) in the resized image."""
    th, tw = target
    im = resize_to_cover(im, target)
    flip_draw, top_draw, left_draw = torch.rand(3, generator=generator).tolist()
    if random_flip and flip_draw < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if center_crop:
        top, left = max(0, round((im.height - th) / 2)), max(0, round((im.width - tw) / 2))
    else:
        top, left = int(top_draw * (im.height - th + 1)), int(left_draw * (im.width - tw + 1))
    im = im.crop((left, top, left + tw, top + th))
    pixels = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1)
    return pixels / 127.5 - 1.0, (top, left)


def prepare_example(record: ImageRecord, config: DataConfig, seed) -> dict:
    """The transformed image of one record and its SDXL micro-conditioning; the crop and flip are
    drawn from (``seed``, the record's key)."""
    im = load_image(record)
    original_size = (im.height, im.width)
    target = config.target_size(original_size)
    pixels, crop_top_left = transform_image(im, target, config.center_crop, config.random_flip,
                                            example_generator(seed, record.key, "crop"))
    return {"key": record.key, "caption": record.caption, "pixel_values": pixels,
            "time_ids": time_ids(original_size, crop_top_left, target)}


def time_ids(original_size, crop_top_left, target_size) -> torch.Tensor:
    """SDXL's add_time_ids: original (h, w) + crop (top, left) + target (h, w)."""
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)


@dataclass
class TrainingImages:
    """Checked records ready for encoding, and what the checks found."""

    records: list[ImageRecord]
    config: DataConfig
    origin: str
    skipped: list[str] = field(default_factory=list)
    upscaled: list[str] = field(default_factory=list)


def check_source_names(sources: list[DataSource]) -> None:
    """Several sources need different names: the names prefix their examples' keys."""
    labels = [s.label for s in sources]
    if len(set(labels)) < len(labels):
        raise UserError(f"two data sources are both named {next(n for n in labels if labels.count(n) > 1)!r}: "
                        "give each its own name")


def load_training_images(sources: DataSource | list[DataSource], config: DataConfig,
                         prefix_keys: bool | None = None) -> TrainingImages:
    """Records from one or several sources, every image decoded once and every caption checked
    up-front. Each record carries its own t_n (its metadata's, else its source's; None: the run's).
    With several sources (``prefix_keys``, default: more than one given) each key is prefixed by its
    source's name, so keys stay unique."""
    sources = [sources] if isinstance(sources, DataSource) else list(sources)
    prefix_keys = len(sources) > 1 if prefix_keys is None else prefix_keys
    check_source_names(sources)
    records, skipped = [], []
    for source in sources:
        prefix = f"{source.label}/" if prefix_keys else ""
        kept, lost = check_images(collect_records(source), source.skip_broken_images)
        check_captions(kept, source.allow_empty_captions)
        level = source.ambient_timestep
        records += [replace(r, key=prefix + r.key, ambient_timestep=level if r.ambient_timestep is None else r.ambient_timestep)
                    for r in kept]
        skipped += [prefix + k for k in lost]
    upscaled = warn_small_images(records, config)
    return TrainingImages(records, config, "+".join(s.origin for s in sources), skipped, upscaled)
