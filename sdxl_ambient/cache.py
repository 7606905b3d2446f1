"""The noisy-latent cache: images are encoded and corrupted once, training reads latents.

For each example (key k, at its own noise level t_n) the cache stores only the observation

    y = sqrt(abar_n) z + sqrt(1 - abar_n) eps,   z = scaling_factor * (mu + sigma * xi),

with xi ~ N(0, I) seeded by (s, k, "vae") and eps ~ N(0, I) seeded by (s, k, "noise"), s the
cache's noise seed (the crop and flip are drawn from (s, k, "crop")): one fixed noise realisation
per example, the same in every epoch and on every process. The clean latent z is never written.

The noise seed is a secret: whoever knows it can subtract the noise. By default each new cache
draws a fresh one. It is kept only in ``.secrets.json`` (readable by the owner alone) while the
build is unfinished, so that an interrupted build can be completed, and removed when the build
completes. What stays is a key derived from it (one-way) that fingerprints the data, so that a
later run can check the images are unchanged; a shareable dataset (``sdxl-ambient corrupt``) keeps
no secret at all. Text embeddings are SDXL's (penultimate hidden states
of both CLIP encoders, concatenated; pooled = text_encoder_2's projected output).

On disk: ``shard-00000.safetensors``, ... and ``manifest.json`` recording what made the
cache (settings, model, data fingerprints, captions) and the completed shards with a
checksum, and each example's t_n (0 = clean) beside its key. Shards and the manifest are replaced atomically, so an interrupted build is
completed by re-encoding only the missing or damaged shards. The same folder is the
shareable dataset that ``sdxl-ambient corrupt`` writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdxl_ambient.data import (
    DataConfig,
    DataSource,
    TrainingImages,
    check_source_names,
    example_generator,
    load_training_images,
    prepare_example,
)
from sdxl_ambient.durable import atomic_write
from sdxl_ambient.errors import UserError
from sdxl_ambient.models import model_identity
from sdxl_ambient.objectives import add_noise, check_ambient_timestep
from sdxl_ambient.outputs import OutputFolder
from sdxl_ambient.text import text_embeddings, tokenize

logger = logging.getLogger(__name__)

FORMAT = "sdxl-ambient-noisy-latents"
FORMAT_VERSION = 3  # 3: a t_n per example (version 2 datasets, one t_n for all, are still read)
READABLE_VERSIONS = (2, 3)
MANIFEST = "manifest.json"
SECRETS = ".secrets.json"
# Every file a cache folder may hold (shards, manifest, secret, an atomic write in progress): it
# recognises its own files by these names, and refuses a folder holding anything else.
CACHE_FILES = (MANIFEST, SECRETS, "shard-*.safetensors", ".*.tmp-*")
SHARD_SIZE = 256
ENCODE_BATCH_SIZE = 8
FP16_VAE_HINT = ("use an fp32 VAE (do not cast the VAE to fp16) or pass "
                 "--pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix")


# ----------------------------------------------------------------------------- small helpers


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_manifest(cache_dir: Path, manifest: dict) -> None:
    atomic_write(cache_dir / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=1)))


def _write_secrets(cache_dir: Path, secrets: dict) -> None:
    """``.secrets.json``, created readable and writable by the owner only."""
    def write(path: Path) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(secrets, fh)
    atomic_write(cache_dir / SECRETS, write)


def _read_secrets(cache_dir: Path) -> dict:
    path = cache_dir / SECRETS
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path} is damaged; delete the folder {cache_dir} to rebuild the cache") from None


def read_manifest(cache_dir: str | os.PathLike) -> dict | None:
    """The manifest of a cache folder, or None when there is none. Foreign JSON is an error."""
    path = Path(cache_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}); delete the folder {cache_dir} to rebuild the cache") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path} is not an sdxl-ambient latent cache manifest; use another --cache_dir")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise UserError(f"{path}: cache format version {manifest.get('format_version')}, this version reads "
                         f"{READABLE_VERSIONS}; delete {cache_dir} (or use another --cache_dir) to rebuild it")
    return manifest


def is_complete(cache_dir: str | os.PathLike) -> bool:
    """Whether ``cache_dir`` holds a complete latent cache (one that is only read from now on)."""
    manifest = read_manifest(cache_dir)
    return bool(manifest and manifest.get("complete"))


def is_latent_dataset(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a noisy-latent dataset (a cache or the output of ``corrupt``)."""
    return (Path(folder) / MANIFEST).is_file() and read_manifest(folder) is not None


@contextlib.contextmanager
def _placed(module: torch.nn.Module, device, dtype=None) -> Iterator[torch.nn.Module]:
    """Move/cast a module for the block and restore its device and dtype afterwards."""
    p = next(module.parameters())
    old_device, old_dtype = p.device, p.dtype
    moved = torch.device(device) != old_device or (dtype is not None and dtype != old_dtype)
    if moved:
        module.to(device=device, dtype=dtype or old_dtype)
    try:
        yield module
    finally:
        if moved:
            module.to(device=old_device, dtype=old_dtype)


# ----------------------------------------------------------------------------- what made the cache


def model_signature(components) -> dict:
    """The shapes and constants a latent dataset shares with the model that trains on it."""
    sched = components.noise_scheduler.config
    return {
        "latent_channels": int(components.vae.config.latent_channels),
        "scaling_factor": float(components.vae.config.scaling_factor),
        "prompt_embeds_dim": int(components.text_encoder.config.hidden_size + components.text_encoder_2.config.hidden_size),
        "pooled_dim": int(components.text_encoder_2.config.projection_dim),
        "scheduler": {k: sched.get(k) for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")},
    }


def seed_digest(seed) -> str:
    """What the manifest records of the noise seed: anyone who knows the seed can subtract the
    noise and recover the clean latents, so the seed itself is never written there."""
    return hashlib.sha256(f"sdxl-ambient-noise-seed\x00{seed}".encode()).hexdigest()


def data_key(noise_seed) -> str:
    """The key of the data fingerprints, derived one-way from the noise seed."""
    return hashlib.sha256(f"sdxl-ambient-data-key\x00{noise_seed}".encode()).hexdigest()


def fresh_noise_seed() -> str:
    return secrets.token_hex(16)  # 128 bits


def planned_settings(config: DataConfig, model_id: str | None, vae_id: str | None = None, revision: str | None = None,
                     variant: str | None = None, shard_size: int = SHARD_SIZE) -> dict:
    """The manifest's settings that are known before any model loads: all but the model's signature
    (``model``, read from the loaded model). The model and the VAE are recorded by
    :func:`models.model_identity`."""
    return {
        "model_id": model_identity(model_id, revision, variant),
        "vae_id": model_identity(vae_id),
        **config.as_dict(),
        "shard_size": int(shard_size),
    }


def manifest_settings(config: DataConfig, components, shard_size: int) -> dict:
    """What the manifest records of how the cache was made; a cache is reused only when they are equal
    (and its examples, each with its t_n, are the same)."""
    made_with = planned_settings(config, getattr(components, "model_id", None), getattr(components, "vae_id", None),
                                 getattr(components, "revision", None), getattr(components, "variant", None), shard_size)
    return {**made_with, "model": model_signature(components)}


def example_levels(images: TrainingImages, ambient_timestep: int) -> list[int]:
    """Each example's t_n: its own (metadata or source), else ``ambient_timestep``."""
    return [ambient_timestep if r.ambient_timestep is None else r.ambient_timestep for r in images.records]


def data_entries(images: TrainingImages, key: str, ambient_timestep: int) -> list[dict]:
    """Per example: key (relative file name or row), t_n, content fingerprint, original size, caption.

    The fingerprint is keyed (``data_key``): a plain hash of the file would let anyone holding a
    candidate image confirm that it is in a shared noisy dataset."""
    def keyed(fingerprint: dict) -> str:
        return hashlib.sha256(f"{key}\x00{json.dumps(fingerprint, sort_keys=True)}".encode()).hexdigest()

    return [{"key": r.key, "ambient_timestep": level, "content": keyed(r.fingerprint), "original_size": list(r.original_size),
             "caption": r.caption} for r, level in zip(images.records, example_levels(images, ambient_timestep))]


def _setting_differences(old: dict, new: dict) -> list[str]:
    return [f"{k}: cache has {old.get(k)!r}, now {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _data_differences(old: list[dict], new: list[dict]) -> list[str]:
    old_by_key, new_by_key = {e["key"]: e for e in old}, {e["key"]: e for e in new}
    out = [f"{k}: removed" for k in old_by_key if k not in new_by_key]
    out += [f"{k}: added" for k in new_by_key if k not in old_by_key]
    for k in new_by_key.keys() & old_by_key.keys():
        if new_by_key[k] != old_by_key[k]:
            changed = sorted(f for f in new_by_key[k].keys() | old_by_key[k].keys() if new_by_key[k].get(f) != old_by_key[k].get(f))
            out.append(f"{k}: {', '.join(changed)} changed")
    if not out and [e["key"] for e in old] != [e["key"] for e in new]:
        out.append("the order of the examples changed")
    return sorted(out)


def _refuse(cache_dir: Path, what: str, differences: list[str]) -> None:
    shown = "; ".join(differences[:10]) + (f"; and {len(differences) - 10} more" if len(differences) > 10 else "")
    raise UserError(f"the latent cache in {cache_dir} was made with other {what}: {shown}. "
                     f"Use another --cache_dir (--output_dir for `sdxl-ambient corrupt`), or delete {cache_dir} to rebuild it.")


# ----------------------------------------------------------------------------- encoding


@torch.no_grad()
def encode_prompts(components, ids_one: torch.Tensor, ids_two: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's prompt encoding (``text.text_embeddings``), on the CPU in float32 for the cache."""
    prompt_embeds, pooled = text_embeddings(components.text_encoder, components.text_encoder_2, ids_one, ids_two)
    return prompt_embeds.float().cpu(), pooled.float().cpu()


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, keys: list[str], seed, device) -> torch.Tensor:
    """z = scaling_factor * (mu + sigma * xi), xi drawn per example from (seed, key, "vae")."""
    p = next(vae.parameters())
    dist = vae.encode(pixels.to(device=device, dtype=p.dtype)).latent_dist
    xi = torch.stack([torch.randn(dist.mean.shape[1:], generator=example_generator(seed, k, "vae")) for k in keys])
    z = dist.mean.float().cpu() + dist.std.float().cpu() * xi
    return z * vae.config.scaling_factor


def example_noise(shape, seed, key: str) -> torch.Tensor:
    """The one fixed noise realisation eps of an example."""
    return torch.randn(shape, generator=example_generator(seed, key, "noise"))


def observe(z: torch.Tensor, keys: list[str], seed, levels: list[int], alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """y = add_noise(z, t_n, eps) with each example's fixed eps at its own t_n."""
    noise = torch.stack([example_noise(z.shape[1:], seed, k) for k in keys])
    return add_noise(z, torch.tensor(levels, dtype=torch.long), noise, alphas_cumprod)


def _check_finite(z: torch.Tensor, names: list[str]) -> None:
    bad = [n for n, ok in zip(names, torch.isfinite(z).flatten(1).all(1).tolist()) if not ok]
    if bad:
        raise UserError(f"the VAE gave NaN/inf latents for {', '.join(bad)}; {FP16_VAE_HINT}")


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _encode_images(images: TrainingImages, indices: list[int], components, ambient_timestep: int, seed: str,
                   batch_size: int, device) -> dict[str, torch.Tensor]:
    """``{i}.observed`` and ``{i}.time_ids``; images are decoded a batch at a time, batches share a size."""
    config, out = images.config, {}
    by_size: dict[tuple, list[int]] = {}
    for i in indices:
        by_size.setdefault(config.target_size(images.records[i].original_size), []).append(i)
    for group in by_size.values():
        for batch in _chunks(group, batch_size):
            records = [images.records[i] for i in batch]
            examples = [prepare_example(r, config, seed) for r in records]
            keys = [r.key for r in records]
            z = encode_latents(components.vae, torch.stack([e["pixel_values"] for e in examples]), keys, seed, device)
            _check_finite(z, [r.name for r in records])
            levels = [ambient_timestep if r.ambient_timestep is None else r.ambient_timestep for r in records]
            y = observe(z, keys, seed, levels, components.noise_scheduler.alphas_cumprod)
            for i, y_i, e in zip(batch, y, examples):
                out[f"{i}.observed"], out[f"{i}.time_ids"] = y_i.float().contiguous(), e["time_ids"]
    return out


def _encode_captions(images: TrainingImages, indices: list[int], components, batch_size: int, device) -> dict[str, torch.Tensor]:
    """Token ids of both tokenizers and the prompt embeddings (stored in float16)."""
    out = {}
    for batch in _chunks(indices, batch_size):
        captions = [images.records[i].caption for i in batch]
        ids_one, ids_two = tokenize(components.tokenizer, captions), tokenize(components.tokenizer_2, captions)
        embeds, pooled = encode_prompts(components, ids_one, ids_two)
        for n, i in enumerate(batch):
            out[f"{i}.prompt_embeds"] = embeds[n].to(torch.float16).contiguous()
            out[f"{i}.pooled_prompt_embeds"] = pooled[n].to(torch.float16).contiguous()
            out[f"{i}.input_ids_one"], out[f"{i}.input_ids_two"] = ids_one[n].long(), ids_two[n].long()
            if not (torch.isfinite(out[f"{i}.prompt_embeds"]).all() and torch.isfinite(out[f"{i}.pooled_prompt_embeds"]).all()):
                raise UserError(f"the text embeddings of the caption of {images.records[i].name} overflow float16")
    return out


def encode_shard(images: TrainingImages, indices: list[int], components, ambient_timestep: int, seed: str,
                 batch_size: int, device) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
    """The tensors of one shard (named ``{index}.{field}``) and the latent (h, w) of each example."""
    tensors = _encode_images(images, indices, components, ambient_timestep, seed, batch_size, device)
    tensors.update(_encode_captions(images, indices, components, batch_size, device))
    return tensors, [list(tensors[f"{i}.observed"].shape[1:]) for i in indices]


# ----------------------------------------------------------------------------- building


def shard_name(n: int) -> str:
    return f"shard-{n:05d}.safetensors"


def _valid_shards(cache_dir: Path, manifest: dict) -> dict:
    """The manifest's shards whose file exists and matches its checksum; others are dropped (and re-made)."""
    kept = {}
    for name, entry in manifest.get("shards", {}).items():
        path = cache_dir / name
        if not path.is_file():
            logger.warning("latent cache shard %s is missing; it will be re-made", path)
        elif _sha256_file(path) != entry.get("sha256"):
            logger.warning("latent cache shard %s fails its checksum; it will be re-made", path)
        else:
            kept[name] = entry
    return kept


def _noise_seed_for(cache_dir: Path, manifest: dict | None, given: str | None, secret: dict) -> str:
    """The noise seed of a new or unfinished build: the one given, the unfinished build's own, or a fresh one."""
    if manifest is None:
        return given if given is not None else fresh_noise_seed()
    seed = given if given is not None else secret.get("noise_seed")
    if seed is None:
        raise UserError(f"the unfinished latent cache in {cache_dir} lost its noise seed ({SECRETS}); "
                        f"delete {cache_dir} to rebuild it")
    if seed_digest(seed) != manifest["noise_seed_digest"]:
        raise UserError(f"the latent cache in {cache_dir} was made with another --noise_seed; "
                        f"give the same one, or delete {cache_dir} to rebuild it")
    return seed


def _check_complete(cache_dir: Path, manifest: dict, images: TrainingImages, given: str | None, secret: dict,
                    ambient_timestep: int) -> None:
    """A finished cache is reused only for the same data, which its data key lets us check."""
    if given is not None and seed_digest(given) != manifest["noise_seed_digest"]:
        raise UserError(f"the latent cache in {cache_dir} was made with another --noise_seed; "
                        f"use another --cache_dir, or delete {cache_dir} to rebuild it")
    key = data_key(given) if given is not None else secret.get("data_key")
    if key is None:
        raise UserError(f"{cache_dir} already holds a complete noisy-latent dataset whose data cannot be checked "
                        f"(it keeps no key): choose another output folder, or train on it with --train_data_dir {cache_dir}")
    entries = data_entries(images, key, ambient_timestep)
    if manifest["data"]["examples"] != entries:
        _refuse(cache_dir, "data", _data_differences(manifest["data"]["examples"], entries))


def check_made_alike(cache_dir: Path, manifest: dict, settings: dict, images: TrainingImages, ambient_timestep: int,
                     noise_seed: str | None) -> None:
    """The one check that an existing cache (complete or unfinished) is what a build from ``images``
    would make: the same format version, ``settings`` (:func:`manifest_settings`; before any model
    loads :func:`planned_settings`, without the model's signature) and the same examples, each with its
    t_n, content and noise seed. Anything else is refused in one line naming what differs."""
    cache_dir = Path(cache_dir)
    if manifest["format_version"] != FORMAT_VERSION:
        raise UserError(f"the latent cache in {cache_dir} was made by an earlier version (format {manifest['format_version']}): "
                        f"delete {cache_dir} to rebuild it, or use another --cache_dir")
    recorded = manifest["settings"] if "model" in settings else {k: v for k, v in manifest["settings"].items() if k != "model"}
    if recorded != settings:
        _refuse(cache_dir, "settings", _setting_differences(recorded, settings))
    secret = _read_secrets(cache_dir)
    if manifest.get("complete"):
        _check_complete(cache_dir, manifest, images, noise_seed, secret, ambient_timestep)
        return
    data = data_entries(images, data_key(_noise_seed_for(cache_dir, manifest, noise_seed, secret)), ambient_timestep)
    if manifest["data"]["examples"] != data:
        _refuse(cache_dir, "data", _data_differences(manifest["data"]["examples"], data))


def check_cache_dir(settings: CacheSettings, made_with: dict, images: TrainingImages) -> None:
    """Before any model loads: a cache already in ``settings.cache_dir`` (to be reused or completed)
    was made with ``made_with`` (:func:`planned_settings`) from ``images`` (:func:`check_made_alike`)."""
    manifest = read_manifest(settings.cache_dir)
    if manifest is not None:
        default = 0 if settings.ambient_timestep is None else settings.ambient_timestep
        check_made_alike(settings.cache_dir, manifest, made_with, images, default, settings.noise_seed)


def _check_levels(images: TrainingImages, ambient_timestep: int, num_train_timesteps: int) -> None:
    for record, level in zip(images.records, example_levels(images, ambient_timestep)):
        check_ambient_timestep(level, num_train_timesteps, where=f"{record.name}: ambient_timestep")


def build_cache(cache_dir: str | os.PathLike, images: TrainingImages, components, ambient_timestep: int, *,
                noise_seed: str | None = None, shareable: bool = False, batch_size: int = ENCODE_BATCH_SIZE,
                shard_size: int = SHARD_SIZE, device=None) -> LatentCache:
    """Encode and corrupt every example into ``cache_dir``, complete a cache cut off half-way, or
    reuse a complete one made from the same data with the same settings.

    ``ambient_timestep`` is the t_n of examples without their own. ``noise_seed`` None draws a fresh
    secret one for a new cache. ``shareable`` (the output of
    ``corrupt``) keeps no key once complete. A cache made with other settings or other data is
    refused (the error names what differs). The VAE runs in fp32 unless the components carry a
    separate VAE (``vae_id``)."""
    cache_dir = Path(cache_dir)
    check_ambient_timestep(ambient_timestep, len(components.noise_scheduler.alphas_cumprod))
    _check_levels(images, ambient_timestep, len(components.noise_scheduler.alphas_cumprod))
    settings = manifest_settings(images.config, components, shard_size)
    manifest, secret = read_manifest(cache_dir), _read_secrets(cache_dir)
    if manifest is not None:
        check_made_alike(cache_dir, manifest, settings, images, ambient_timestep, noise_seed)
    if manifest is not None and manifest.get("complete"):
        damaged = sorted(set(manifest["shards"]) - set(_valid_shards(cache_dir, manifest)))
        if not damaged:
            return LatentCache(cache_dir, verify=False)
        if noise_seed is None:  # the secret seed went with the finished build: the same noise cannot be re-made
            raise UserError(f"latent cache shard {cache_dir / damaged[0]} is missing or damaged, and a finished cache "
                            f"keeps no noise seed to re-make it: delete {cache_dir} to rebuild it")
    seed = _noise_seed_for(cache_dir, manifest, noise_seed, secret)
    data = data_entries(images, data_key(seed), ambient_timestep)  # a manifest's examples are these (checked above)
    shards = _valid_shards(cache_dir, manifest) if manifest is not None else {}
    cache_dir.mkdir(parents=True, exist_ok=True)
    _write_secrets(cache_dir, {"noise_seed": seed, "data_key": data_key(seed)})
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "settings": settings,
        "noise_seed_digest": seed_digest(seed), "num_examples": len(data),
        "complete": False, "data": {"origin": images.origin, "examples": data, "skipped": images.skipped},
        "shards": shards,
    }
    _write_manifest(cache_dir, manifest)
    device = device or next(components.vae.parameters()).device
    vae_dtype = None if getattr(components, "vae_id", None) else torch.float32
    plan = [(shard_name(n), list(range(s, min(s + shard_size, len(data))))) for n, s in enumerate(range(0, len(data), shard_size))]
    todo = [(name, idx) for name, idx in plan if name not in shards]
    if todo:
        logger.info("encoding %d of %d shard(s) into %s", len(todo), len(plan), cache_dir)
        with _placed(components.vae, device, vae_dtype), _placed(components.text_encoder, device), \
                _placed(components.text_encoder_2, device):
            for name, indices in todo:
                tensors, shapes = encode_shard(images, indices, components, ambient_timestep, seed, batch_size, device)
                atomic_write(cache_dir / name, lambda p, t=tensors: save_file(t, str(p), metadata={"format": "pt"}))
                shards[name] = {"indices": indices, "latent_shapes": shapes, "sha256": _sha256_file(cache_dir / name)}
                _write_manifest(cache_dir, manifest)
    manifest["shards"] = {name: shards[name] for name, _ in plan}
    manifest["complete"] = True
    _write_manifest(cache_dir, manifest)
    if shareable:
        (cache_dir / SECRETS).unlink()
    else:
        _write_secrets(cache_dir, {"data_key": data_key(seed)})
    return LatentCache(cache_dir, verify=False)


# ----------------------------------------------------------------------------- reading


class LatentCache(torch.utils.data.Dataset):
    """A finished latent cache as a Dataset of the contract's example dicts."""

    FIELDS = ("observed", "prompt_embeds", "pooled_prompt_embeds", "input_ids_one", "input_ids_two", "time_ids")

    def __init__(self, cache_dir: str | os.PathLike, verify: bool = True):
        self.cache_dir = Path(cache_dir)
        manifest = read_manifest(self.cache_dir)
        if manifest is None:
            raise UserError(f"{self.cache_dir} holds no {MANIFEST}: not a latent cache")
        if not manifest.get("complete"):
            raise UserError(f"the latent cache in {self.cache_dir} is incomplete; run the same command again to complete it")
        if verify:
            for name, entry in manifest["shards"].items():
                if not (self.cache_dir / name).is_file() or _sha256_file(self.cache_dir / name) != entry["sha256"]:
                    raise UserError(f"latent cache shard {self.cache_dir / name} is missing or fails its checksum; "
                                    f"delete {self.cache_dir} to rebuild it")
        self.manifest = manifest
        self._where: dict[int, str] = {}
        self._shapes: dict[int, tuple[int, int]] = {}
        for name, entry in manifest["shards"].items():
            for i, shape in zip(entry["indices"], entry["latent_shapes"]):
                self._where[i], self._shapes[i] = name, tuple(shape)
        examples = manifest["data"]["examples"]
        self._captions = [e["caption"] for e in examples]
        self.keys = [e["key"] for e in examples]
        # version 2 datasets have one t_n in their settings
        self.ambient_timesteps = [int(e.get("ambient_timestep", manifest["settings"].get("ambient_timestep", 0))) for e in examples]
        self._handles: dict = {}

    @property
    def levels(self) -> list[int]:
        """The distinct t_n of its examples, lowest first."""
        return sorted(set(self.ambient_timesteps))

    @property
    def ambient_timestep(self) -> int:
        """The lowest t_n of its examples (the one t_n when they share it)."""
        return self.levels[0]

    def __len__(self) -> int:
        return self.manifest["num_examples"]

    def latent_shapes(self) -> list[tuple[int, int]]:
        """Latent (h, w) of every example, in index order."""
        return [self._shapes[i] for i in range(len(self))]

    def _handle(self, name: str):
        if name not in self._handles:
            self._handles[name] = safe_open(str(self.cache_dir / name), framework="pt")
        return self._handles[name]

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for a cache of {len(self)} examples")
        f = self._handle(self._where[i])
        item = {k: f.get_tensor(f"{i}.{k}") for k in self.FIELDS}
        item["observed_timestep"] = torch.tensor(self.ambient_timesteps[i], dtype=torch.long)
        item["index"] = torch.tensor(i, dtype=torch.long)
        item["caption"], item["key"] = self._captions[i], self.keys[i]
        return item

    def __getstate__(self):  # DataLoader workers reopen the shards
        return {**self.__dict__, "_handles": {}}


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of equal latent shape, shuffled from (seed, epoch): the same order on every
    process and after a resume.

    With ``num_replicas`` processes, process ``rank`` takes every num_replicas-th batch. The list is
    padded by repeating its first batches so that every process gets as many, and a multiple of
    ``accumulation`` (gradient accumulation steps), so an optimizer step never spans two epochs.
    ``set_epoch(epoch, skip)`` starts an epoch, ``skip`` of this process's batches already done."""

    def __init__(self, latent_shapes: list[tuple[int, int]], batch_size: int, seed: int = 0, drop_last: bool = False,
                 num_replicas: int = 1, rank: int = 0, accumulation: int = 1):
        self.batch_size, self.seed, self.drop_last, self.epoch, self.skip = batch_size, seed, drop_last, 0, 0
        self.num_replicas, self.rank, self.accumulation = num_replicas, rank, accumulation
        self.groups: dict[tuple, list[int]] = {}
        for i, shape in enumerate(latent_shapes):
            self.groups.setdefault(tuple(shape), []).append(i)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _batches(self) -> list[list[int]]:
        rng = random.Random(f"{self.seed}:{self.epoch}")
        batches = []
        for shape in sorted(self.groups):
            members = self.groups[shape][:]
            rng.shuffle(members)
            for s in range(0, len(members), self.batch_size):
                batch = members[s:s + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        rng.shuffle(batches)
        return batches

    def _total(self) -> int:
        size = self.batch_size
        return sum(len(g) // size if self.drop_last else -(-len(g) // size) for g in self.groups.values())

    def __iter__(self):
        batches = self._batches()
        while len(batches) < len(self) * self.num_replicas:
            batches += batches[: len(self) * self.num_replicas - len(batches)]
        batches = batches[self.rank::self.num_replicas]
        return iter(batches[self.skip:])

    def __len__(self) -> int:
        """This process's batches in a whole epoch."""
        per_process = -(-self._total() // self.num_replicas)
        return -(-per_process // self.accumulation) * self.accumulation


# ----------------------------------------------------------------------------- the trainer's entry point


def check_model_family(cache: LatentCache, components) -> None:
    """A latent dataset must match the model's latent channels, VAE scaling, text dims and noise schedule."""
    made_with, now = cache.manifest["settings"]["model"], model_signature(components)
    if made_with != now:
        raise UserError(f"the latent dataset {cache.cache_dir} was made for another model family: "
                        + "; ".join(_setting_differences(made_with, now)))


def adopt_latent_dataset(folder, components, ambient_timestep: int | None) -> LatentCache:
    """A noisy-latent dataset given as --train_data_dir (or a data source), used as is;
    ``ambient_timestep`` None adopts its examples' t_n, a number must equal them (:func:`check_adopted_level`)."""
    cache = LatentCache(folder)
    check_model_family(cache, components)
    check_adopted_level(cache, ambient_timestep)
    return cache


def check_adopted_level(cache: LatentCache, ambient_timestep: int | None) -> None:
    if ambient_timestep is not None and cache.levels != [ambient_timestep]:
        hint = f"pass --ambient_timestep {cache.ambient_timestep}" if len(cache.levels) == 1 else "its examples carry their own"
        raise UserError(f"--ambient_timestep {ambient_timestep} differs from the t_n {cache.levels} of the "
                        f"latent dataset {cache.cache_dir}; {hint} (or leave it out)")


@dataclass(frozen=True)
class CacheSettings:
    """Where the trainer's latent cache goes, the data's noise level (None: adopt a noisy-latent
    dataset's, else 0 = clean) and the secret noise seed (None: a fresh one for a new cache)."""

    cache_dir: Path
    ambient_timestep: int | None = None
    noise_seed: str | None = None


def cache_folder(cache_dir, flag: str = "--cache_dir", command: str = "train") -> OutputFolder:
    """A cache folder as the output folder of ``command``: its own files recognised by name, anything else refused."""
    return OutputFolder(cache_dir, command=command, writes=CACHE_FILES, flag=flag, recognise_by_name=True)


def uses_latent_dataset(source: DataSource) -> bool:
    """Whether the source is a noisy-latent dataset (from ``corrupt``), trained on as is."""
    return bool(source.train_data_dir) and is_latent_dataset(source.train_data_dir)


def image_sources(sources) -> list[DataSource]:
    """The sources whose images go into the run's own cache (the others are noisy-latent datasets)."""
    return [s for s in sources if not uses_latent_dataset(s)]


@dataclass(frozen=True)
class PlannedData:
    """What the run will train on, known before any model loads: each example's t_n, and each latent
    cache's fingerprint (a digest of its examples, levels and noise, and how its images became
    latents), None for a new cache that will draw a fresh secret noise seed."""

    levels: list[int]
    fingerprints: list[dict | None]

    @property
    def fingerprint(self) -> list[dict] | None:
        return None if any(f is None for f in self.fingerprints) else list(self.fingerprints)

    def built(self, cache_dir) -> list[dict]:
        """The fingerprints once the run's cache exists (a new cache's is known only then)."""
        return [latent_data_fingerprint(read_manifest(cache_dir)) if f is None else f for f in self.fingerprints]


def _data_digest(noise_seed_digest: str, examples: list[dict]) -> str:
    return hashlib.sha256(json.dumps([noise_seed_digest, examples], sort_keys=True).encode()).hexdigest()


def latent_data_fingerprint(manifest: dict) -> dict:
    """What a cache or latent dataset gives training: a digest of its examples (keyed fingerprints,
    levels, captions) and its noise, and how its images became latents (the DataConfig settings)."""
    settings = manifest["settings"]
    return {"latent_data": _data_digest(manifest["noise_seed_digest"], manifest["data"]["examples"]),
            **{key: settings[key] for key in DataConfig.__dataclass_fields__}}


def plan_data(sources, config: DataConfig, settings: CacheSettings, images: TrainingImages | None) -> PlannedData:
    """:class:`PlannedData` from the sources (latent datasets read from their manifests), the checked
    ``images`` of the image sources (None when there are none) and the cache folder."""
    default = 0 if settings.ambient_timestep is None else settings.ambient_timestep
    levels, fingerprints = [], []
    for source in sources:
        if uses_latent_dataset(source):
            dataset = LatentCache(source.train_data_dir, verify=False)
            level = source.ambient_timestep if source.ambient_timestep is not None else settings.ambient_timestep
            check_adopted_level(dataset, level)
            levels += dataset.ambient_timesteps
            fingerprints.append(latent_data_fingerprint(dataset.manifest))
    if images is not None:
        levels += example_levels(images, default)
        manifest = read_manifest(settings.cache_dir)
        if settings.noise_seed is not None:
            entries = data_entries(images, data_key(settings.noise_seed), default)
            fingerprints.append({"latent_data": _data_digest(seed_digest(settings.noise_seed), entries), **config.as_dict()})
        elif manifest is not None:  # reused or completed as it is (the build refuses it for other data)
            fingerprints.append(latent_data_fingerprint(manifest))
        else:
            fingerprints.append(None)
    return PlannedData(levels=sorted(set(levels)), fingerprints=fingerprints)


@dataclass(frozen=True)
class SourcePart:
    """One data source's examples: their indices in a latent cache (the run's own, or a noisy-latent
    dataset used as is), how many times each is seen per epoch, and the prefix that keeps the keys of
    an adopted dataset apart from the others'."""

    name: str
    cache: LatentCache
    indices: tuple[int, ...]
    repeats: int = 1
    key_prefix: str = ""


class TrainingSet(torch.utils.data.Dataset):
    """The examples a run trains on: each source's examples (each with its own t_n), repeated
    ``repeats`` times per epoch. Items are the latent cache's, with ``key`` unique across sources."""

    def __init__(self, parts: list[SourcePart]):
        self.parts = [p for p in parts if p.indices]
        if not self.parts:
            raise UserError("no training examples are left (every example is held out for validation?)")
        self._items = [(n, i) for n, p in enumerate(self.parts) for _ in range(p.repeats) for i in p.indices]
        self._shapes = [p.cache.latent_shapes() for p in self.parts]

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, n: int) -> dict:
        part_no, i = self._items[n]
        part = self.parts[part_no]
        item = part.cache[i]
        item["key"] = part.key_prefix + item["key"]
        return item

    def latent_shapes(self) -> list[tuple[int, int]]:
        """Latent (h, w) of every item, in order (repeats included)."""
        return [self._shapes[n][i] for n, i in self._items]

    def examples(self) -> list[tuple[int, int, str, int]]:
        """Each distinct example once: (part number, cache index, key, t_n)."""
        return [(n, i, p.key_prefix + p.cache.keys[i], p.cache.ambient_timesteps[i]) for n, p in enumerate(self.parts)
                for i in p.indices]

    @property
    def levels(self) -> list[int]:
        """The distinct t_n of the examples, lowest first."""
        return sorted({level for *_, level in self.examples()})

    @property
    def ambient_timestep(self) -> int:
        """The lowest t_n with data (the one t_n when all examples share it)."""
        return self.levels[0]

    def without(self, held: set[tuple[int, int]]) -> TrainingSet:
        """The same sources less the (part number, index) pairs in ``held``."""
        return TrainingSet([SourcePart(p.name, p.cache, tuple(i for i in p.indices if (n, i) not in held), p.repeats,
                                       p.key_prefix) for n, p in enumerate(self.parts)])

    def summary(self) -> list[dict]:
        """Per source: name, examples, repeats and t_n (a number, or {t_n: examples} when they differ)."""
        out = []
        for p in self.parts:
            counts: dict[int, int] = {}
            for i in p.indices:
                counts[p.cache.ambient_timesteps[i]] = counts.get(p.cache.ambient_timesteps[i], 0) + 1
            level = next(iter(counts)) if len(counts) == 1 else {str(k): v for k, v in sorted(counts.items())}
            out.append({"name": p.name, "examples": len(p.indices), "repeats": p.repeats, "ambient_timestep": level})
        return out


def prepare_cache(sources: DataSource | list[DataSource], config: DataConfig, settings: CacheSettings, components,
                  accelerator=None, images: TrainingImages | None = None) -> TrainingSet:
    """The trainer's one call: each source's examples, as a :class:`TrainingSet`.

    A noisy-latent dataset (the output of ``corrupt``) is used as is; all image sources go into one
    cache in ``settings.cache_dir``, built, completed or reused on the main process from ``images``
    (checked already; read from the sources when None), each example at its own t_n (its
    metadata's, its source's, else ``settings.ambient_timestep``, else 0)."""
    sources = [sources] if isinstance(sources, DataSource) else list(sources)
    check_source_names(sources)
    several = len(sources) > 1
    cache = None
    if image_sources(sources):
        t_n = 0 if settings.ambient_timestep is None else settings.ambient_timestep
        device = accelerator.device if accelerator is not None else None

        def build():
            loaded = images if images is not None else load_training_images(image_sources(sources), config, prefix_keys=several)
            build_cache(settings.cache_dir, loaded, components, t_n, noise_seed=settings.noise_seed, device=device)

        if accelerator is None:
            build()
        else:
            with accelerator.main_process_first():
                if accelerator.is_main_process:
                    build()
        cache = LatentCache(settings.cache_dir, verify=False)
    parts = []
    for source in sources:
        if uses_latent_dataset(source):
            level = source.ambient_timestep if source.ambient_timestep is not None else settings.ambient_timestep
            adopted = adopt_latent_dataset(source.train_data_dir, components, level)
            parts.append(SourcePart(source.label, adopted, tuple(range(len(adopted))), source.repeats,
                                    f"{source.label}/" if several else ""))
        else:
            prefix = f"{source.label}/" if several else ""
            indices = tuple(i for i, key in enumerate(cache.keys) if key.startswith(prefix))
            parts.append(SourcePart(source.label, cache, indices, source.repeats))
    return TrainingSet(parts)
