"""The noisy-latent cache, its sampler, prepare_cache and `sdxl-ambient corrupt`."""

import contextlib
import hashlib
import json
import os
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from helpers import assert_one_line_error
from sdxl_ambient import cache as cache_mod
from sdxl_ambient.cache import BucketBatchSampler, CacheSettings, LatentCache, build_cache, prepare_cache
from sdxl_ambient.data import DataConfig, DataSource, load_training_images, prepare_example
from sdxl_ambient.objectives import add_noise

T_N = 500
NOISE_SEED = "7"
# (h, w) of the test images: three aspect ratios -> three buckets at resolution 64
SIZES = [(64, 64), (48, 80), (80, 48), (64, 64), (48, 80), (80, 48), (64, 64)]


@pytest.fixture(scope="module")
def components(tiny_pipeline_dir):
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_pipeline_dir)
    return types.SimpleNamespace(
        tokenizer=pipe.tokenizer, tokenizer_2=pipe.tokenizer_2, text_encoder=pipe.text_encoder,
        text_encoder_2=pipe.text_encoder_2, vae=pipe.vae, unet=pipe.unet,
        noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config), model_id=str(tiny_pipeline_dir), vae_id=None)


@pytest.fixture
def noise_folder(tmp_path) -> Path:
    """Images of seeded random noise (each recognisable by its content), captioned by their number."""
    folder = tmp_path / "data"
    folder.mkdir()
    rows = []
    for k, (h, w) in enumerate(SIZES):
        pixels = np.random.default_rng(k).integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{k}.png")
        rows.append({"file_name": f"img{k}.png", "text": f"picture number {k}"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return folder


def data_config(**overrides) -> DataConfig:
    base = dict(resolution=64, center_crop=False, random_flip=True, enable_bucket=True, min_bucket_reso=32,
                max_bucket_reso=128, bucket_reso_steps=16)
    return DataConfig(**{**base, **overrides})


def training_images(folder, **overrides):
    return load_training_images(DataSource(train_data_dir=str(folder)), data_config(**overrides))


def build(folder, components, cache_dir, shard_size=3, ambient_timestep=T_N, noise_seed=NOISE_SEED, **overrides):
    return build_cache(cache_dir, training_images(folder, **overrides), components, ambient_timestep,
                       noise_seed=noise_seed, shard_size=shard_size, batch_size=2)


def all_tensors(cache_dir: Path) -> dict:
    out = {}
    for shard in sorted(cache_dir.glob("shard-*.safetensors")):
        out.update(load_file(shard))
    return out


def expected_observation(folder, components, k, t_n=T_N, seed=NOISE_SEED, **config):
    """y of image k computed independently: its own VAE latent, its own fixed noise, add_noise."""
    images = training_images(folder, **config)
    record = next(r for r in images.records if r.key == f"img{k}.png")
    pixels = prepare_example(record, images.config, seed)["pixel_values"][None]
    z = cache_mod.encode_latents(components.vae, pixels, [record.key], seed, "cpu")
    noise = cache_mod.example_noise(z.shape[1:], seed, record.key)[None]
    return add_noise(z, torch.tensor([t_n]), noise, components.noise_scheduler.alphas_cumprod)[0], z[0]


def assert_observations_match(cache, folder, components, seed=NOISE_SEED):
    for i in range(len(cache)):
        k = int(cache[i]["caption"].split()[-1])
        y, _ = expected_observation(folder, components, k, seed=seed)
        torch.testing.assert_close(cache[i]["observed"], y, rtol=1e-5, atol=1e-5)


def test_each_latent_is_its_image_noised_with_its_fixed_noise(noise_folder, tmp_path, components):
    cache = build(noise_folder, components, tmp_path / "c")
    assert len(cache) == len(SIZES)
    for i in range(len(cache)):
        item = cache[i]
        k = int(item["caption"].split()[-1])
        y, z = expected_observation(noise_folder, components, k)
        torch.testing.assert_close(item["observed"], y, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(item["observed"], z, atol=1e-2)  # the clean latent is not what is stored
        assert tuple(item["observed"].shape[1:]) == (SIZES[k][0] // 8, SIZES[k][1] // 8)
        assert item["observed_timestep"].item() == T_N and item["index"].item() == i
        assert item["time_ids"][:2].tolist() == list(SIZES[k])
        ids = cache_mod.tokenize(components.tokenizer, [item["caption"]])
        embeds, pooled = cache_mod.encode_prompts(components, ids, cache_mod.tokenize(components.tokenizer_2, [item["caption"]]))
        torch.testing.assert_close(item["prompt_embeds"].float(), embeds[0], rtol=1e-2, atol=1e-3)
        torch.testing.assert_close(item["pooled_prompt_embeds"].float(), pooled[0], rtol=1e-2, atol=1e-3)
        assert torch.equal(item["input_ids_one"], ids[0])


def test_fixed_noise_is_per_example_and_reproducible(noise_folder, tmp_path, components):
    a = build(noise_folder, components, tmp_path / "a")
    b = build(noise_folder, components, tmp_path / "b")
    ta, tb = all_tensors(a.cache_dir), all_tensors(b.cache_dir)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    n0, n1 = cache_mod.example_noise((4, 8, 8), "7", "img0.png"), cache_mod.example_noise((4, 8, 8), "7", "img3.png")
    assert not torch.allclose(n0, n1)
    assert torch.equal(n0, cache_mod.example_noise((4, 8, 8), "7", "img0.png"))
    assert not torch.allclose(n0, cache_mod.example_noise((4, 8, 8), "8", "img0.png"))


def test_identical_images_get_different_noise(noise_folder, tmp_path, components):
    (noise_folder / "dup.png").write_bytes((noise_folder / "img0.png").read_bytes())
    with open(noise_folder / "metadata.jsonl", "a") as f:
        f.write("\n" + json.dumps({"file_name": "dup.png", "text": "picture number 0"}))
    cache = build(noise_folder, components, tmp_path / "c", random_flip=False)
    first, dup = cache[0]["observed"], cache[len(SIZES)]["observed"]
    assert first.shape == dup.shape and (first - dup).abs().mean() > 0.3


def test_clean_cache_at_t_n_zero_stores_the_vae_latent(noise_folder, tmp_path, components):
    cache = build(noise_folder, components, tmp_path / "clean", ambient_timestep=0)
    k = int(cache[0]["caption"].split()[-1])
    _, z = expected_observation(noise_folder, components, k, t_n=0)
    torch.testing.assert_close(cache[0]["observed"], z, rtol=1e-5, atol=1e-5)


def test_captions_stay_paired_through_shuffled_bucketed_batches(noise_folder, tmp_path, components):
    cache = build(noise_folder, components, tmp_path / "c")
    sampler = BucketBatchSampler(cache.latent_shapes(), batch_size=2, seed=1)
    loader = torch.utils.data.DataLoader(cache, batch_sampler=sampler)
    captions = [e["caption"] for e in cache.manifest["data"]["examples"]]
    orders = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        seen = []
        for batch in loader:
            for r, i in enumerate(batch["index"].tolist()):
                assert batch["caption"][r] == captions[i] == cache[i]["caption"]
                assert torch.equal(batch["observed"][r], cache[i]["observed"])  # same fixed noise every epoch
            seen += batch["index"].tolist()
        assert sorted(seen) == list(range(len(cache)))
        orders.append(seen)
    assert len(loader) == len(sampler) == 4  # buckets of 3, 2, 2 examples
    assert orders[0] != orders[1]


def test_bucket_batch_sampler_is_homogeneous_and_deterministic():
    shapes = [(8, 8)] * 5 + [(6, 12)] * 4 + [(12, 6)] * 3
    sampler = BucketBatchSampler(shapes, batch_size=2, seed=3)
    sampler.set_epoch(4)
    first = list(sampler)
    assert all(len({shapes[i] for i in b}) == 1 for b in first)
    assert sorted(i for b in first for i in b) == list(range(12)) and len(first) == len(sampler) == 7
    again = BucketBatchSampler(shapes, batch_size=2, seed=3)  # another process, or after a resume
    again.set_epoch(4)
    assert list(again) == first
    sampler.set_epoch(5)
    assert list(sampler) != first
    dropped = BucketBatchSampler(shapes, batch_size=2, seed=3, drop_last=True)
    assert len(dropped) == len(list(dropped)) == 5 and all(len(b) == 2 for b in dropped)


@pytest.mark.parametrize("damage", ["delete_shard", "forget_shards", "truncate_shard", "delete_manifest"])
def test_interrupted_cache_is_completed_identically(noise_folder, tmp_path, components, damage, monkeypatch):
    reference = all_tensors(build(noise_folder, components, tmp_path / "ref").cache_dir)
    cache_dir = tmp_path / "cut"
    build(noise_folder, components, cache_dir)
    manifest_path = cache_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if damage == "delete_shard":
        (cache_dir / "shard-00001.safetensors").unlink()
        expected = ["shard-00001.safetensors"]
    elif damage == "forget_shards":  # the run died before the manifest recorded the last shards
        manifest["complete"] = False
        for name in ("shard-00001.safetensors", "shard-00002.safetensors"):
            del manifest["shards"][name]
        manifest_path.write_text(json.dumps(manifest))
        expected = ["shard-00001.safetensors", "shard-00002.safetensors"]
    elif damage == "truncate_shard":
        shard = cache_dir / "shard-00000.safetensors"
        shard.write_bytes(shard.read_bytes()[:200])
        expected = ["shard-00000.safetensors"]
    else:
        manifest_path.unlink()
        expected = [f"shard-0000{n}.safetensors" for n in range(3)]
    if damage != "forget_shards":
        with pytest.raises((ValueError, FileNotFoundError), match="shard|manifest"):
            LatentCache(cache_dir)
    encoded = []
    real = cache_mod.encode_shard
    monkeypatch.setattr(cache_mod, "encode_shard", lambda images, indices, *a, **k: encoded.append(indices) or real(images, indices, *a, **k))
    build(noise_folder, components, cache_dir)
    assert [cache_mod.shard_name(idx[0] // 3) for idx in encoded] == expected
    completed = all_tensors(cache_dir)
    assert completed.keys() == reference.keys() and all(torch.equal(completed[k], reference[k]) for k in reference)
    assert len(LatentCache(cache_dir)) == len(SIZES)


def test_a_damaged_finished_cache_without_its_noise_seed_is_refused(noise_folder, tmp_path, components):
    """The fresh secret seed is gone once the build completes: a lost shard cannot be re-made with
    the same noise, so the cache is refused (naming the shard) rather than silently mixed."""
    cache_dir = tmp_path / "c"
    build(noise_folder, components, cache_dir, noise_seed=None)
    (cache_dir / "shard-00001.safetensors").unlink()
    with pytest.raises(ValueError, match=r"shard-00001\.safetensors is missing or damaged.*delete"):
        build(noise_folder, components, cache_dir, noise_seed=None)


def _other_parts(components, change: str, other=None):
    """The components with one part replaced: another model or VAE by name, another model (``other``) in a folder of
    the same name, a VAE of another latent scaling, text encoders of another width, another noise schedule."""
    from diffusers import DDPMScheduler

    def config(part, **changed):
        return types.SimpleNamespace(**{**dict(part.config.to_dict() if hasattr(part.config, "to_dict") else part.config),
                                        **changed})

    parts = {
        "model": dict(model_id="stabilityai/stable-diffusion-xl-base-1.0"),
        "model_of_the_same_folder_name": dict(model_id=str(other)),
        "vae": dict(vae_id="madebyollin/sdxl-vae-fp16-fix"),
        "vae_scaling": dict(vae=types.SimpleNamespace(config=config(components.vae, scaling_factor=0.18215))),
        "text_encoder": dict(text_encoder=types.SimpleNamespace(config=config(components.text_encoder, hidden_size=48))),
        "schedule": dict(noise_scheduler=DDPMScheduler.from_config({**components.noise_scheduler.config, "beta_end": 0.02})),
    }[change]
    return types.SimpleNamespace(**{**vars(components), **parts})


@pytest.mark.parametrize("change, named", [
    (dict(ambient_timestep=300), "ambient_timestep"),
    (dict(resolution=48, min_bucket_reso=16), "resolution"),
    (dict(noise_seed="8"), "--noise_seed"),
    (dict(center_crop=True), "center_crop"),
    ("edit_image", "img4.png"),
    ("edit_caption", "caption"),
    ("model", "', now 'stabilityai/stable-diffusion-xl-base-1.0'"),  # was 'pipeline (files sha256 ...)'
    ("model_of_the_same_folder_name", "model_id: cache has 'pipeline (files sha256 "),
    ("vae", "vae_id: cache has None, now 'madebyollin/sdxl-vae-fp16-fix'"),
    ("vae_scaling", "'scaling_factor': 0.18215"),
    ("text_encoder", "'prompt_embeds_dim': 80"),
    ("schedule", "'beta_end': 0.02"),
])
def test_cache_with_other_settings_or_data_is_refused(noise_folder, tmp_path, components, other_pipeline_dir, change, named,
                                                     monkeypatch):
    build(noise_folder, components, tmp_path / "c")
    overrides = change if isinstance(change, dict) else {}
    parts = ("model", "model_of_the_same_folder_name", "vae", "vae_scaling", "text_encoder", "schedule")
    now = _other_parts(components, change, other_pipeline_dir) if change in parts else components
    if change == "edit_image":
        Image.new("RGB", SIZES[4][::-1], (1, 2, 3)).save(noise_folder / "img4.png")
    elif change == "edit_caption":
        rows = [json.loads(line) for line in (noise_folder / "metadata.jsonl").read_text().splitlines()]
        rows[1]["text"] = "another caption"
        (noise_folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    monkeypatch.setattr(cache_mod, "encode_shard", lambda *a, **k: pytest.fail("encoded instead of refused"))
    with pytest.raises(ValueError, match=f"(?s){re.escape(named)}.*another --cache_dir"):
        build(noise_folder, now, tmp_path / "c", **overrides)


def test_nonfinite_latents_name_the_files_and_suggest_the_fix(noise_folder, tmp_path, components, monkeypatch):
    real = components.vae.encode

    def nan_encode(pixels):
        out = real(pixels)
        out.latent_dist.mean[:] = float("nan")
        return out

    monkeypatch.setattr(components.vae, "encode", nan_encode)
    with pytest.raises(ValueError, match="(?s)NaN.*img.*sdxl-vae-fp16-fix"):
        build(noise_folder, components, tmp_path / "c")


def test_manifest_records_the_making_and_no_local_paths(noise_folder, tmp_path, components, tiny_pipeline_dir):
    cache = build(noise_folder, components, tmp_path / "c")
    text = (cache.cache_dir / "manifest.json").read_text()
    assert str(tmp_path) not in text and str(tiny_pipeline_dir.parent) not in text
    m = cache.manifest
    s = m["settings"]
    assert (s["resolution"], s["random_flip"], s["enable_bucket"]) == (64, True, True)
    assert {e["ambient_timestep"] for e in m["data"]["examples"]} == {T_N}  # each example's t_n beside its key
    assert m["noise_seed_digest"] == cache_mod.seed_digest(NOISE_SEED) and "seed" not in s  # the seed would undo the noise
    assert s["model_id"].startswith(f"{tiny_pipeline_dir.name} (files sha256 ") and m["data"]["examples"][0]["key"] == "img0.png"
    assert len(m["data"]["examples"][0]["content"]) == 64 and m["complete"]
    plain = hashlib.sha256((noise_folder / "img0.png").read_bytes()).hexdigest()
    assert plain not in text  # keyed: the manifest cannot confirm a candidate image


def corrupt(pipeline_dir, folder, out, *extra) -> int:
    from sdxl_ambient.cli import main

    return main(["corrupt", "--pretrained_model_name_or_path", str(pipeline_dir), "--train_data_dir", str(folder),
                 "--ambient_timestep", "400", "--resolution", "64", "--output_dir", str(out), "--device", "cpu", *extra])


def test_corrupt_command_writes_a_dataset_prepare_cache_adopts(noise_folder, tmp_path, components, tiny_pipeline_dir, capsys):
    out = tmp_path / "shared"
    assert corrupt(tiny_pipeline_dir, noise_folder, out, "--noise_seed", "7") == 0
    assert "t_n = 400" in capsys.readouterr().out
    source, unused = DataSource(train_data_dir=str(out)), tmp_path / "unused_cache"
    dataset = prepare_cache(source, data_config(), CacheSettings(unused), components)
    assert dataset.ambient_timestep == 400 and len(dataset) == len(SIZES)
    assert not unused.exists()
    assert {tuple(s) for s in dataset.latent_shapes()} == {(8, 8)}
    with pytest.raises(ValueError, match="--ambient_timestep 300"):
        prepare_cache(source, data_config(), CacheSettings(unused, ambient_timestep=300), components)
    other = types.SimpleNamespace(**{**vars(components), "vae": types.SimpleNamespace(config=types.SimpleNamespace(
        latent_channels=16, scaling_factor=components.vae.config.scaling_factor))})
    with pytest.raises(ValueError, match="latent_channels"):
        prepare_cache(source, data_config(), CacheSettings(unused), other)


@pytest.mark.parametrize("extra, fragment", [
    (["--batch_size", "0"], "--batch_size 0 must be >= 1"),
    (["--shard_size", "0"], "--shard_size 0 must be >= 1"),
    (["--ambient_timestep", "1000"], "--ambient_timestep 1000 must be in [0, 1000)"),
])
def test_corrupt_refuses_bad_flags_in_one_line_before_loading(noise_folder, tmp_path, tiny_pipeline_dir, capsys,
                                                                monkeypatch, extra, fragment):
    from sdxl_ambient import models

    monkeypatch.setattr(models, "load_components", lambda *a, **k: pytest.fail("a model was loaded before the flags were checked"))
    out = tmp_path / "shared"
    assert_one_line_error(capsys, corrupt(tiny_pipeline_dir, noise_folder, out, *extra), fragment)
    assert not out.exists()


def test_corrupt_keeps_its_default_noise_seed_secret(noise_folder, tmp_path, tiny_pipeline_dir, capsys, monkeypatch):
    """Whoever knows the seed can subtract the noise: the default seed is fresh and written nowhere."""
    import secrets

    monkeypatch.setattr(secrets, "token_hex", lambda n: "f00dfeed" * (2 * n // 8))
    out = tmp_path / "shared"
    assert corrupt(tiny_pipeline_dir, noise_folder, out) == 0
    printed = capsys.readouterr().out
    written = b"".join(p.read_bytes() for p in out.iterdir())
    assert b"f00dfeed" not in written and "f00dfeed" not in printed
    assert not (out / cache_mod.SECRETS).exists()


def _die_after(monkeypatch, shards: int):
    """Make the build die (as a kill would) once ``shards`` shards are written."""
    real, done = cache_mod.encode_shard, []

    def encode(*args, **kwargs):
        if len(done) == shards:
            raise KeyboardInterrupt("killed")
        done.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_mod, "encode_shard", encode)


def test_an_interrupted_corrupt_is_completed_by_the_same_command(noise_folder, tmp_path, tiny_pipeline_dir, components,
                                                                 monkeypatch, capsys):
    """Killed after 1 of 3 shards: the unfinished folder keeps its secret (owner-only) and cannot be
    trained on; the same command again completes it with the same noise, and then no secret is left."""
    import secrets

    monkeypatch.setattr(secrets, "token_hex", lambda n: "c0ffee00" * (2 * n // 8))
    out = tmp_path / "shared"
    with monkeypatch.context() as patch:
        _die_after(patch, 1)
        assert corrupt(tiny_pipeline_dir, noise_folder, out, "--shard_size", "3") == 130  # as after a Ctrl-C
    secret = out / cache_mod.SECRETS
    assert secret.stat().st_mode & 0o777 == 0o600 and "c0ffee00" in secret.read_text()
    first = (out / "shard-00000.safetensors").read_bytes()
    with pytest.raises(ValueError, match="incomplete"):
        prepare_cache(DataSource(train_data_dir=str(out)), data_config(), CacheSettings(tmp_path / "c"), components)
    monkeypatch.setattr(secrets, "token_hex", lambda n: "0dd" * n)  # a rerun must not draw a new seed
    assert corrupt(tiny_pipeline_dir, noise_folder, out, "--shard_size", "3") == 0
    assert (out / "shard-00000.safetensors").read_bytes() == first
    assert not secret.exists()
    dataset = LatentCache(out)
    for i in range(len(dataset)):
        k = int(dataset[i]["caption"].split()[-1])
        y, _ = expected_observation(noise_folder, components, k, t_n=400, seed="c0ffee00" * 4, random_flip=False,
                                    enable_bucket=False)
        torch.testing.assert_close(dataset[i]["observed"], y, rtol=1e-5, atol=1e-5)
    assert corrupt(tiny_pipeline_dir, noise_folder, out, "--shard_size", "3") == 2  # complete: nothing to redo, refused
    assert "already holds a complete noisy-latent dataset" in capsys.readouterr().err


def test_the_training_cache_keeps_no_noise_seed_once_complete(noise_folder, tmp_path, components, monkeypatch):
    """A fresh secret seed while the build runs (owner-only file), only a one-way data key after it;
    the cache is then reused as is for the same data and refused for other data."""
    import secrets

    monkeypatch.setattr(secrets, "token_hex", lambda n: "beef" * (n // 2))
    cache_dir = tmp_path / "c"
    seen = []
    real = cache_mod.encode_shard
    monkeypatch.setattr(cache_mod, "encode_shard", lambda *a, **k: seen.append(
        json.loads((cache_dir / cache_mod.SECRETS).read_text())) or real(*a, **k))
    cache = build(noise_folder, components, cache_dir, noise_seed=None)
    assert seen and all(s["noise_seed"] == "beef" * 8 for s in seen)
    assert json.loads((cache_dir / cache_mod.SECRETS).read_text()) == {"data_key": cache_mod.data_key("beef" * 8)}
    assert b"beef" * 8 not in b"".join(p.read_bytes() for p in cache_dir.iterdir())
    assert_observations_match(cache, noise_folder, components, seed="beef" * 8)
    seen.clear()
    again = build(noise_folder, components, cache_dir, noise_seed=None)
    assert not seen and torch.equal(again[0]["observed"], cache[0]["observed"])  # reused, not re-encoded
    Image.new("RGB", SIZES[2][::-1], (9, 9, 9)).save(noise_folder / "img2.png")
    with pytest.raises(ValueError, match="img2.png"):
        build(noise_folder, components, cache_dir, noise_seed=None)


class FakeAccelerator:
    """accelerate's process roles, recorded: main_process_first lets the main process go first."""

    def __init__(self, is_main_process, log):
        self.is_main_process, self.device, self.log = is_main_process, torch.device("cpu"), log

    @contextlib.contextmanager
    def main_process_first(self):
        self.log.append(("enter", self.is_main_process))
        yield
        self.log.append(("exit", self.is_main_process))


def test_prepare_cache_builds_on_the_main_process_only(noise_folder, tmp_path, components, monkeypatch):
    log = []
    real = cache_mod.build_cache
    monkeypatch.setattr(cache_mod, "build_cache", lambda *a, **k: log.append("build") or real(*a, **k))
    source, cache_dir = DataSource(train_data_dir=str(noise_folder)), tmp_path / "out" / "latent_cache"

    def prepare(accelerator):
        return prepare_cache(source, data_config(), CacheSettings(cache_dir, T_N, NOISE_SEED), components, accelerator)

    dataset = prepare(FakeAccelerator(True, log))
    assert dataset.parts[0].cache.cache_dir == cache_dir and len(dataset) == len(SIZES)
    assert log == [("enter", True), "build", ("exit", True)]
    other = prepare(FakeAccelerator(False, log))
    assert log[3:] == [("enter", False), ("exit", False)]  # the other process reads what the main one wrote
    assert torch.equal(other[2]["observed"], dataset[2]["observed"])


def test_sampler_pads_epochs_to_whole_optimizer_steps_on_every_process():
    """3 batches, 2 processes, accumulation 2: each process gets 2 batches, so no step spans two epochs."""
    shapes = [(8, 8)] * 6
    per_rank = [list(BucketBatchSampler(shapes, 2, seed=0, num_replicas=2, rank=r, accumulation=2)) for r in (0, 1)]
    assert [len(b) for b in per_rank] == [2, 2]
    assert {i for b in per_rank for batch in b for i in batch} == set(range(6))
    single = BucketBatchSampler(shapes, 2, seed=0, accumulation=2)
    assert len(single) == 4 and len(list(single)) == 4


# ----------------------------------------------------------------------------- several noise levels

LEVELS = [0, 100, 500, 0, 900, 100, 500]  # per image k; 0 = clean


def set_levels(folder, levels) -> None:
    """Give image k the metadata column ambient_timestep = levels[k] (None: no column value)."""
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    for row in rows:
        k = int(row["file_name"][3:-4])
        row.pop("ambient_timestep", None)
        if levels[k] is not None:
            row["ambient_timestep"] = levels[k]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))


def test_each_cached_example_has_its_own_level(noise_folder, tmp_path, components):
    """The metadata column sets each image's t_n, overriding the run's: each cached latent is its image noised
    to its own level (a clean one is the VAE latent itself), the level is stored with it and the batch
    carries it; a changed level refuses the cache, naming the image."""
    set_levels(noise_folder, [*LEVELS[:-1], None])  # the last image takes the run's t_n
    cache = build(noise_folder, components, tmp_path / "c", ambient_timestep=T_N)
    expected_levels = [*LEVELS[:-1], T_N]
    for i in range(len(cache)):
        item = cache[i]
        k = int(item["caption"].split()[-1])
        y, z = expected_observation(noise_folder, components, k, t_n=expected_levels[k])
        assert item["observed_timestep"].item() == expected_levels[k] == cache.ambient_timesteps[i]
        torch.testing.assert_close(item["observed"], y, rtol=1e-5, atol=1e-5)
        if expected_levels[k] == 0:
            torch.testing.assert_close(item["observed"], z, rtol=1e-5, atol=1e-5)
        else:
            assert not torch.allclose(item["observed"], z, atol=1e-2)
    batch = next(iter(torch.utils.data.DataLoader(cache, batch_size=1)))
    assert batch["observed_timestep"].tolist() == [cache.ambient_timesteps[0]]
    set_levels(noise_folder, [*LEVELS[:3], 300, *LEVELS[4:-1], None])
    with pytest.raises(ValueError, match=r"(?s)img3\.png: ambient_timestep changed.*another --cache_dir"):
        build(noise_folder, components, tmp_path / "c", ambient_timestep=T_N)


def test_a_level_off_the_schedule_names_the_image(noise_folder, tmp_path, components):
    set_levels(noise_folder, [0, 100, 1000, 0, 0, 0, 0])
    with pytest.raises(ValueError, match=r"metadata\.jsonl, row 3: ambient_timestep 1000 must be in \[0, 1000\)"):
        build(noise_folder, components, tmp_path / "c")


def _split_folder(folder: Path, dest: Path, ks: list[int]) -> Path:
    dest.mkdir()
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    rows = [r for r in rows if int(r["file_name"][3:-4]) in ks]
    for r in rows:
        (dest / r["file_name"]).write_bytes((folder / r["file_name"]).read_bytes())
    (dest / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return dest


def test_data_sources_mix_clean_images_noisy_images_and_a_noisy_latent_dataset(noise_folder, tmp_path, components):
    """Three sources, each with its own t_n and repeats: a clean folder seen 3 times per epoch, a folder at
    t_n 500, and a dataset written by `corrupt` at t_n 300 used as is. Every item carries its source's level,
    keys stay unique, and the summary (logged, in the model card) counts each source."""
    clean = _split_folder(noise_folder, tmp_path / "clean", [0, 1])
    noisy = _split_folder(noise_folder, tmp_path / "noisy", [2, 3, 4])
    shared = _split_folder(noise_folder, tmp_path / "to_share", [5, 6])
    build_cache(tmp_path / "shared", training_images(shared), components, 300, noise_seed="9", shareable=True)
    sources = [DataSource(train_data_dir=str(clean), ambient_timestep=0, repeats=3, name="clean"),
               DataSource(train_data_dir=str(noisy), ambient_timestep=500),
               DataSource(train_data_dir=str(tmp_path / "shared"))]
    data = prepare_cache(sources, data_config(), CacheSettings(tmp_path / "cache", None, NOISE_SEED), components)
    assert len(data) == 3 * 2 + 3 + 2 and len(data.latent_shapes()) == len(data)
    items = [data[n] for n in range(len(data))]
    by_source = {}
    for item in items:
        by_source.setdefault(item["key"].split("/")[0], set()).add(item["observed_timestep"].item())
    assert by_source == {"clean": {0}, "noisy": {500}, "shared": {300}}
    seen = [i["key"] for i in items]
    assert seen.count("clean/img0.png") == seen.count("clean/img1.png") == 3 and seen.count("noisy/img2.png") == 1
    assert len({key for _, _, key, _ in data.examples()}) == 7 and data.levels == [0, 300, 500]
    assert data.summary() == [{"name": "clean", "examples": 2, "repeats": 3, "ambient_timestep": 0},
                              {"name": "noisy", "examples": 3, "repeats": 1, "ambient_timestep": 500},
                              {"name": "shared", "examples": 2, "repeats": 1, "ambient_timestep": 300}]
    y, _ = expected_observation(noise_folder, components, 2, t_n=500)
    noisy_item = next(i for i in items if i["key"] == "noisy/img2.png")
    assert noisy_item["observed"].shape == y.shape and noisy_item["caption"] == "picture number 2"
    with pytest.raises(ValueError, match="both named 'clean'"):
        prepare_cache([sources[0], DataSource(train_data_dir=str(noisy), name="clean")], data_config(),
                      CacheSettings(tmp_path / "cache2"), components)


def test_corrupt_writes_a_dataset_at_several_levels(noise_folder, tmp_path, tiny_pipeline_dir, components, capsys):
    """`corrupt` with an ambient_timestep column and no --ambient_timestep: each example at its own level, the
    summary counts each level and warns of clean ones; an image without a level needs the flag."""
    from sdxl_ambient.cli import main

    def run(out, *extra):
        return main(["corrupt", "--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--train_data_dir",
                     str(noise_folder), "--resolution", "64", "--output_dir", str(out), "--device", "cpu",
                     "--noise_seed", NOISE_SEED, *extra])

    set_levels(noise_folder, [*LEVELS[:-1], None])
    assert run(tmp_path / "missing") == 2
    assert "--ambient_timestep is required for the 1 image(s)" in capsys.readouterr().err
    set_levels(noise_folder, LEVELS)
    assert run(tmp_path / "shared") == 0
    printed = capsys.readouterr().out
    assert "t_n = 500" in printed and "(2 examples)" in printed and "2 example(s) at t_n = 0 are clean" in printed
    dataset = LatentCache(tmp_path / "shared")
    assert dataset.levels == [0, 100, 500, 900]
    for i in range(len(dataset)):
        k = int(dataset[i]["caption"].split()[-1])
        y, _ = expected_observation(noise_folder, components, k, t_n=LEVELS[k], random_flip=False, enable_bucket=False)
        torch.testing.assert_close(dataset[i]["observed"], y, rtol=1e-5, atol=1e-5)


def test_a_dataset_of_the_earlier_format_is_read_with_its_one_level(noise_folder, tmp_path, components):
    """A noisy-latent dataset written before each example carried its t_n (format 2: one t_n in the settings)
    still trains at that level; completing or reusing it as a cache is refused with what to do."""
    cache = build(noise_folder, components, tmp_path / "old", ambient_timestep=400)
    manifest = json.loads((tmp_path / "old" / "manifest.json").read_text())
    manifest["format_version"], manifest["settings"]["ambient_timestep"] = 2, 400
    for entry in manifest["data"]["examples"]:
        del entry["ambient_timestep"]
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(manifest))
    old = LatentCache(tmp_path / "old")
    assert old.levels == [400] and old[3]["observed_timestep"].item() == 400
    assert torch.equal(old[3]["observed"], cache[3]["observed"])
    with pytest.raises(ValueError, match="made by an earlier version"):
        build(noise_folder, components, tmp_path / "old", ambient_timestep=400)


# ----------------------------------------------------------------------------- a complete cache is only read


_WATCHED: list[str] = []
_WRITES: list[tuple[str, str]] = []
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PATH_EVENTS = {"os.rename": 2, "os.link": 2, "os.symlink": 2, "os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.chmod": 1,
                "os.chown": 1, "os.truncate": 1, "os.utime": 1, "shutil.rmtree": 1, "shutil.copyfile": 2, "shutil.move": 2}


def _audit(event, args):
    """Every attempt to open for writing, create, rename, remove or change a file under a watched folder."""
    if not _WATCHED:
        return
    if event == "open":
        path, mode, flags = args
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (isinstance(flags, int) and flags & _WRITE_FLAGS)
        paths = [path] if writes else []
    elif event in _PATH_EVENTS:
        paths = list(args[:_PATH_EVENTS[event]])
    else:
        return
    for path in paths:
        if isinstance(path, (str, bytes, os.PathLike)):
            full = os.path.abspath(os.fsdecode(path))
            if any(full == w or full.startswith(w + os.sep) for w in _WATCHED):
                _WRITES.append((event, full))


sys.addaudithook(_audit)  # an audit hook stays for the life of the process; it acts only while a folder is watched


@contextlib.contextmanager
def read_only(folder: Path):
    """The folder and its files made read-only (chmod; which does not bind root, as the tests may run) and
    every write attempt under it recorded (Python's audit events: binds root as well); modes restored after."""
    paths = [folder, *folder.rglob("*")]
    modes = {p: p.stat().st_mode & 0o777 for p in paths}
    for p in paths:
        p.chmod(0o555 if p.is_dir() else modes[p] & 0o444)
    _WRITES.clear()
    _WATCHED.append(os.path.abspath(folder))
    try:
        yield _WRITES
    finally:
        _WATCHED.clear()
        for p in reversed(paths):
            p.chmod(modes[p])


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes())
            for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", ["secret_seed", "given_seed", "corrupt_output"])
def test_a_complete_cache_on_a_read_only_folder_trains(case, tmp_path, tiny_pipeline_dir, noise_folder, caplog):
    """Reading a complete latent cache (a --cache_dir with its own secret seed or a given one, or a `corrupt` output
    as --train_data_dir) needs no write access: a second run on the folder made read-only trains, writes nothing
    there, and gets the weights of the first run (the same cache was read)."""
    import logging

    from helpers.training import lora_weights, run_inprocess, tiny_args

    seed = "0" if case == "given_seed" else None
    if case == "corrupt_output":
        folder = tmp_path / "noisy"
        assert corrupt(tiny_pipeline_dir, noise_folder, folder) == 0
        data, extra = folder, []
    else:
        folder = tmp_path / "cache"
        data, extra = noise_folder, ["--cache_dir", folder]

    def train(out):
        args = tiny_args(tiny_pipeline_dir, data, out, *extra, steps=2, noise_seed=seed)
        if case == "corrupt_output":  # t_n is the dataset's
            del args[args.index("--ambient_timestep"):args.index("--ambient_timestep") + 2]
        assert run_inprocess(args) == 0

    train(tmp_path / "first")
    before = _snapshot(folder)
    with read_only(folder) as writes, caplog.at_level(logging.INFO, logger="sdxl_ambient"):
        train(tmp_path / "second")
    assert writes == [] and _snapshot(folder) == before
    assert "encoding" not in caplog.text
    first, second = lora_weights(tmp_path / "first"), lora_weights(tmp_path / "second")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
