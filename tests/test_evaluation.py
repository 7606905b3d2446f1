"""Memorisation and quality measures with tiny random embedders and the tiny pipeline (no downloads)."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import assert_one_line_error
from helpers.diffusion import reference_ddim
from sdxl_ambient.cli import main
from sdxl_ambient.data import read_metadata
from sdxl_ambient.evaluation import memorization as mem
from sdxl_ambient.evaluation import quality, similarity
from sdxl_ambient.evaluation.features import ClipImageEmbedder, DinoV2Embedder
from sdxl_ambient.evaluation.quality import EmbedderFeatures, fid_kid
from sdxl_ambient.images import load_images


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    from sdxl_ambient.tiny import save_tiny_dinov2

    return save_tiny_dinov2(tmp_path_factory.mktemp("dino") / "dinov2")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    from sdxl_ambient.tiny import write_tokenizer_files

    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2, max_position_embeddings=77,
                vocab_size=514, bos_token_id=512, eos_token_id=513, pad_token_id=513)
    vision = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2, image_size=32, patch_size=8)
    path = tmp_path_factory.mktemp("clip") / "clip"
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(path, safe_serialization=True)
    write_tokenizer_files(path)
    return path


@pytest.fixture(scope="module")
def dino(dino_dir):
    return DinoV2Embedder(dino_dir, device="cpu")


def training_images(folder):
    rows = mem.read_training_set(folder)
    return rows, load_images([r.source for r in rows])


def test_embeddings_are_unit_cls_vectors_and_pil_and_tensor_paths_agree(dino, image_folder):
    _, images = training_images(image_folder)
    emb = dino(images, batch_size=3)
    assert emb.shape == (8, 32)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(8))
    from sdxl_ambient.evaluation.features import pil_to_tensor

    torch.testing.assert_close(dino(pil_to_tensor(images, 224)), emb, atol=1e-5, rtol=1e-5)


def test_each_image_is_its_own_top_match_with_similarity_one(dino, image_folder):
    _, images = training_images(image_folder)
    emb = dino(images)
    values, indices = similarity.top1_similarity(emb, emb)
    torch.testing.assert_close(values, torch.ones(8), atol=1e-5, rtol=0)
    assert indices.tolist() == list(range(8))


def test_a_copied_training_image_is_flagged(dino, image_folder):
    _, images = training_images(image_folder)
    train = dino(images)
    copy = images[3].resize((64, 64))  # a generated image that copies training image 3 at the model's resolution
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    values, indices = similarity.top1_similarity(dino([copy, noise]), train)
    assert indices[0] == 3 and values[0] > 0.99
    stats = similarity.similarity_stats(values)
    assert stats["frac_above_0.99"] == 0.5 and values[1] < values[0]


def test_similarity_stats_figures():
    stats = similarity.similarity_stats(torch.tensor([0.5, 0.91, 0.96, 0.995]))
    assert stats["count"] == 4 and math.isclose(stats["mean"], 0.84125, rel_tol=1e-6)
    assert (stats["frac_above_0.9"], stats["frac_above_0.95"], stats["frac_above_0.99"]) == (0.75, 0.5, 0.25)
    assert math.isclose(stats["p50"], 0.935, rel_tol=1e-6) and math.isclose(stats["max"], 0.995, rel_tol=1e-6)
    with pytest.raises(ValueError):
        similarity.similarity_stats([])


def test_model_specs_and_training_set_errors(tmp_path):
    assert mem.parse_model_spec("plain=stabilityai/sdxl") == ("plain", "stabilityai/sdxl", None)
    assert mem.parse_model_spec("amb=/m/base:/runs/lora") == ("amb", "/m/base", "/runs/lora")
    assert mem.parse_model_spec("w=C:\\m\\base:D:\\lora.safetensors") == ("w", "C:\\m\\base", "D:\\lora.safetensors")
    with pytest.raises(ValueError, match="--model"):
        mem.parse_model_spec("no-name")
    with pytest.raises(ValueError, match="--ambient_timestep"):
        mem.parse_truncation(["other=500"], ["plain"])
    with pytest.raises(ValueError, match="holds no images"):
        mem.read_training_set(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "gone.png", "text": "x"}\n')
    with pytest.raises(ValueError, match="gone.png"):
        mem.read_training_set(tmp_path)


def fake_results(images, top1, match):
    gen = {"captions": ["c"] * len(images), "images": images,
           "by_embedder": {"dinov2": {"top1": top1, "match_index": match, "stats": similarity.similarity_stats(top1)}}}
    sim = {"similarity": top1[:2], "stats": similarity.similarity_stats(top1[:2])}
    attack = {"originals": images[:2], "one_step": images[:2], "full": images[:2],
              "scores": {"one_step": {"dinov2": sim}, "full": {"dinov2": sim}}}
    return {"generation": gen, "noise_attack": attack}


def test_report_files_exist_and_hold_the_numbers(image_folder, tmp_path):
    _, images = training_images(image_folder)
    results = {"plain": fake_results(images[:4], [0.999, 0.97, 0.93, 0.5], [0, 1, 2, 3]),
               "ambient": fake_results(images[4:], [0.8, 0.7, 0.6, 0.55], [4, 5, 6, 7])}
    paths = mem.write_report(tmp_path / "report", results, {"attack_timestep": 900, "num_images": 4}, train_images=images, top_k=3)
    for key in ("json", "markdown", "histogram", "top_matches", "noise_attack"):
        assert paths[key].is_file() and paths[key].stat().st_size > 0
    report = json.loads(paths["json"].read_text())
    assert report["settings"]["attack_timestep"] == 900
    stats = report["models"]["plain"]["generation"]["by_embedder"]["dinov2"]["stats"]
    assert math.isclose(stats["mean"], (0.999 + 0.97 + 0.93 + 0.5) / 4) and stats["frac_above_0.99"] == 0.25
    assert report["models"]["ambient"]["generation"]["by_embedder"]["dinov2"]["top1"] == [0.8, 0.7, 0.6, 0.55]
    md = paths["markdown"].read_text()
    assert "| plain | 4 | 0.850 |" in md and "| ambient | 4 | 0.663 |" in md and "t = 900" in md
    assert Image.open(paths["top_matches"]).size == (2 * (2 * 160 + 8) + 16, 3 * (160 + 18))


def _guided_epsilon(pipe, cond):
    """eps(x, t) of the pipeline's UNet with classifier-free guidance, written out here."""
    def eps(x, t):
        out = pipe.unet(torch.cat([x, x]).float(), t, encoder_hidden_states=cond.prompt_embeds,
                        added_cond_kwargs={"text_embeds": cond.text_embeds, "time_ids": cond.time_ids}).sample
        uncond, text = out.chunk(2)
        return uncond + cond.guidance_scale * (text - uncond)
    return eps


def test_noise_attack_reconstructs_by_ddim_and_scores_each_against_its_own_original(tiny_pipeline_dir, dino, image_folder):
    """The reconstructions are DDIM from the seeded x_t (computed here from the formula, with the real UNet), and
    each image's score is the cosine similarity of its reconstruction with its own original, not another's."""
    from sdxl_ambient import sampling
    from sdxl_ambient.generate import load_pipeline

    rows, images = training_images(image_folder)
    prompts = [r.caption for r in rows[:3]]
    pipe = load_pipeline(str(tiny_pipeline_dir), device="cpu")
    result = mem.noise_attack(pipe, images[:3], prompts, {"dinov2": dino}, timestep=900, num_steps=3, resolution=64, seed=5,
                              guidance_scale=3.0)

    z = sampling.encode_images(pipe, images[:3], 64)
    noise = torch.randn(z.shape, generator=torch.Generator("cpu").manual_seed(5))
    a = pipe.scheduler.alphas_cumprod[900]
    x_t = a.sqrt() * z + (1 - a).sqrt() * noise
    cond = sampling.encode_conditioning(pipe, prompts, guidance_scale=3.0, height=64, width=64)
    with torch.no_grad():
        for method, timesteps in (("one_step", [900]), ("full", [900, 600, 300])):
            x0 = reference_ddim(_guided_epsilon(pipe, cond), x_t, timesteps, pipe.scheduler.alphas_cumprod).float()
            for got, want in zip(result[method], sampling.decode_latents(pipe, x0)):
                assert np.abs(np.asarray(got, dtype=int) - np.asarray(want, dtype=int)).max() <= 1, method

    originals = dino(result["originals"])
    for method in ("one_step", "full"):
        recon = dino(result[method])
        pairs = torch.nn.functional.normalize(recon, dim=-1) @ torch.nn.functional.normalize(originals, dim=-1).T
        scores = torch.tensor(result["scores"][method]["dinov2"]["similarity"])
        torch.testing.assert_close(scores, pairs.diagonal(), atol=1e-5, rtol=0)
        off_diagonal = pairs - torch.diag(pairs.diagonal()) + 10 * torch.eye(3)
        assert (off_diagonal - scores[:, None]).abs().min() > 1e-3  # another pairing would give other scores
        assert result["scores"][method]["dinov2"]["stats"]["mean"] == pytest.approx(float(scores.double().mean()))

    from_latents = mem.noise_attack(pipe, z[:2], ["a", "b"], {"dinov2": dino}, timestep=900, num_steps=3)
    assert [im.size for im in from_latents["originals"]] == [(64, 64)] * 2


def test_memorization_command_reports_two_models(tiny_pipeline_dir, dino_dir, clip_dir, image_folder, tmp_path):
    out = tmp_path / "mem"
    code = main(["memorization", "--train_data_dir", str(image_folder), "--model", f"plain={tiny_pipeline_dir}",
                 "--model", f"ambient={tiny_pipeline_dir}", "--ambient_timestep", "ambient=500", "--embedder", str(dino_dir),
                 "--clip_model", str(clip_dir), "--num_images", "3", "--num_attack_images", "2", "--attack_steps", "2",
                 "--resolution", "64", "--num_inference_steps", "4", "--device", "cpu", "--output_dir", str(out)])
    assert code == 0
    report = json.loads((out / "memorization.json").read_text())
    assert set(report["models"]) == {"plain", "ambient"}
    assert report["settings"]["models"]["ambient"]["ambient_timestep"] == 500
    captions = [r["text"] for r in read_metadata(image_folder)]
    for model in report["models"].values():
        assert model["generation"]["captions"] == captions[:3]
        for emb in ("dinov2", "clip"):
            scores = model["generation"]["by_embedder"][emb]
            assert len(scores["top1"]) == 3 and math.isclose(scores["stats"]["mean"], sum(scores["top1"]) / 3, rel_tol=1e-6)
        assert len(model["noise_attack"]["scores"]["full"]["dinov2"]["similarity"]) == 2
    for name in ("memorization.md", "histogram.png", "top_matches.png", "noise_attack.png"):
        assert (out / name).is_file()


def test_fid_is_zero_for_identical_sets_and_positive_otherwise(dino_dir, image_folder, tmp_path):
    files = sorted(image_folder.glob("*.jpg"))
    feature = EmbedderFeatures(DinoV2Embedder(dino_dir, device="cpu", normalize=False))
    same = fid_kid(files, files, feature, size=224, kid_subsets=5)
    assert abs(same["fid"]) < 1e-3 and same["kid_subset_size"] == 8
    noisy = tmp_path / "noisy"
    noisy.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(noisy / f"{i}.png")
    other = fid_kid(sorted(noisy.glob("*.png")), files, feature, size=224, kid_subsets=5)
    assert other["fid"] > 1e-2 and other["kid_subset_size"] == 4 and other["kid_mean"] > same["kid_mean"]


def test_quality_command_with_clip_score(tiny_pipeline_dir, dino_dir, clip_dir, image_folder, tmp_path, capsys, monkeypatch):
    gen = tmp_path / "gen"
    assert main(["generate", "--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--prompt", "a cat", "--prompt", "a dog",
                 "--num_images_per_prompt", "2", "--resolution", "64", "--num_inference_steps", "3", "--output_dir", str(gen)]) == 0
    out = tmp_path / "q"
    scored, real_clip_score = [], quality.clip_score
    monkeypatch.setattr(quality, "clip_score", lambda images, captions, clip: scored.append((images, captions)) or
                        real_clip_score(images, captions, clip))
    assert main(["quality", "--generated", str(gen), "--reference", str(image_folder), "--embedder", str(dino_dir),
                 "--clip_model", str(clip_dir), "--kid_subsets", "3", "--device", "cpu", "--output_dir", str(out)]) == 0
    results = json.loads((out / "quality.json").read_text())["results"]
    assert results["num_generated"] == 4 and results["num_reference"] == 8  # grid.png is not counted
    assert results["fid"] > 0
    assert f"{results['fid']:.4f}" in (out / "quality.md").read_text()
    # the CLIP score pairs each generated image (in file order) with its own caption from generate's metadata.jsonl
    (call,) = scored
    assert call[1] == ["a cat", "a cat", "a dog", "a dog"]
    images = load_images([gen / f"0000{i}.png" for i in range(4)])
    assert [np.asarray(a).tolist() for a in call[0]] == [np.asarray(b).tolist() for b in images]
    clip = ClipImageEmbedder(clip_dir, device="cpu")
    assert results["clip_score"] == pytest.approx(quality.clip_score(images, call[1], clip)["clip_score"], abs=1e-6)
    assert clip(images[:1]).shape == (1, 16)
    assert_one_line_error(capsys, main(["quality", "--generated", str(gen), "--reference", str(tmp_path / "none"),
                                        "--embedder", str(dino_dir), "--output_dir", str(tmp_path / "q2")]), "--reference",
                          "no such folder")


def test_clip_score_is_100_times_each_images_clamped_cosine_with_its_own_caption():
    """With embeddings whose cosines are known (0.5, -0.17, 0.91, 0.10): the mean of 100 max(cos, 0), pairs in order."""
    angle = torch.tensor([0.0, 30.0, 45.0, 90.0]).deg2rad()
    text_angle = angle + torch.tensor([60.0, 100.0, 25.0, 84.0]).deg2rad()

    class KnownClip:
        def __call__(self, images):
            return torch.stack([angle.cos(), angle.sin()], -1)[images]

        def embed_text(self, captions):
            return 3 * torch.stack([text_angle.cos(), text_angle.sin()], -1)[[int(c) for c in captions]]  # any norm

    per_image = 100 * torch.tensor([60.0, 100.0, 25.0, 84.0]).deg2rad().cos().clamp(min=0)
    result = quality.clip_score([0, 1, 2, 3], ["0", "1", "2", "3"], KnownClip())
    assert result["clip_score"] == pytest.approx(float(per_image.mean()), rel=1e-5)
    assert result["clip_score_std"] == pytest.approx(float(per_image.std()), rel=1e-5)
    assert quality.clip_score([0, 1, 2, 3], ["3", "2", "1", "0"], KnownClip())["clip_score"] != pytest.approx(result["clip_score"])
    with pytest.raises(ValueError, match="3 captions"):
        quality.clip_score([0, 1, 2, 3], ["0", "1", "2"], KnownClip())


# ----------------------------------------------------------------------------- embedders of the expected family only


@pytest.fixture(scope="module")
def dino_missing_a_layer(dino_dir, tmp_path_factory):
    """A DINOv2 folder whose weights lack the second encoder layer (a truncated or foreign checkpoint)."""
    import shutil

    from safetensors.torch import load_file, save_file

    path = tmp_path_factory.mktemp("dino_partial") / "dinov2"
    shutil.copytree(dino_dir, path)
    weights = load_file(str(path / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if ".layer.1." not in k}, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def _forbid_weight_loading(monkeypatch, cls_name: str):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the model family was checked")

    monkeypatch.setattr(getattr(transformers, cls_name), "from_pretrained", refuse)


@pytest.mark.parametrize("case", ["dinov2_as_clip", "clip_as_embedder", "pipeline_as_embedder", "missing_weights"])
def test_an_embedder_of_another_family_or_with_missing_weights_is_refused(case, monkeypatch, capsys, tmp_path, dino_dir,
                                                                           clip_dir, dino_missing_a_layer, tiny_pipeline_dir,
                                                                           image_folder):
    """A DINOv2 folder as --clip_model, a CLIP folder or an SDXL pipeline as --embedder, a DINOv2 with tensors missing:
    one line naming the flag, exit status 2, no transformers load report, and for a wrong family no weights read at all."""
    gen = tmp_path / "gen"
    gen.mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(gen / f"{i}.png")
    quality = ["quality", "--generated", str(gen), "--reference", str(image_folder), "--device", "cpu", "--output_dir",
               str(tmp_path / "q")]
    memorization = ["memorization", "--train_data_dir", str(image_folder), "--model", f"m={tiny_pipeline_dir}",
                    "--device", "cpu", "--output_dir", str(tmp_path / "m")]
    if case != "missing_weights":
        _forbid_weight_loading(monkeypatch, "CLIPModel" if case == "dinov2_as_clip" else "Dinov2Model")
    argv, fragments = {
        "dinov2_as_clip": (quality + ["--embedder", str(dino_dir), "--clip_model", str(dino_dir)],
                           ["--clip_model", "model_type 'dinov2'", "expected a CLIP model"]),
        "clip_as_embedder": (memorization + ["--embedder", str(clip_dir)],
                             ["--embedder", "model_type 'clip'", "expected a DINOv2 model"]),
        "pipeline_as_embedder": (quality + ["--embedder", str(tiny_pipeline_dir)],
                                 ["--embedder", "has no model_type", "expected a DINOv2 model"]),
        "missing_weights": (quality + ["--embedder", str(dino_missing_a_layer)],
                            ["--embedder", "tensors are missing", "encoder.layer.1.", "would be random"]),
    }[case]
    assert_one_line_error(capsys, main(argv), *fragments)
    captured = capsys.readouterr()
    assert "LOAD REPORT" not in captured.err + captured.out
    assert not (tmp_path / "q").exists() and not (tmp_path / "m").exists()


# ----------------------------------------------------------------------------- images read as training reads them


def _ramp16() -> tuple[Image.Image, np.ndarray]:
    """A 16-bit gray image (values up to 65535) and the 8-bit RGB training makes of it."""
    levels = (np.arange(48 * 40) % 256).reshape(48, 40).astype(np.uint16)
    return Image.fromarray(levels * 257), np.repeat(levels.astype(np.uint8)[..., None], 3, axis=-1)


def _rotated_by_exif(tmp_path, upright: Image.Image):
    """A PNG whose pixels are ``upright`` turned a quarter to the left, tagged (EXIF orientation 6) to be shown upright."""
    exif = Image.Exif()
    exif[0x0112] = 6  # display: rotate 90 degrees clockwise
    path = tmp_path / "rotated.png"
    upright.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif)
    return path


@pytest.fixture
def odd_images(tmp_path, image_folder):
    """(16-bit file, EXIF-rotated file) and the RGB images training reads from them."""
    ramp, ramp8 = _ramp16()
    ramp.save(tmp_path / "gray16.png")
    upright = load_images([image_folder / "astronaut.jpg"])[0].resize((40, 64))  # not square, not symmetric
    rotated = _rotated_by_exif(tmp_path, upright)
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I") and Image.open(rotated).size == (64, 40)
    return [tmp_path / "gray16.png", rotated], [Image.fromarray(ramp8), upright]


def test_sixteen_bit_and_exif_rotated_images_are_read_as_training_reads_them(odd_images, dino, tiny_pipeline_dir):
    """The embedders, the quality metrics' batches, the noise attack's originals and its VAE encoding see a 16-bit
    image scaled to 8 bits (not white) and an EXIF-tagged image turned upright, as training does, whether they
    are given files or PIL images as opened."""
    from sdxl_ambient import data, sampling
    from sdxl_ambient.evaluation.features import pil_to_tensor
    from sdxl_ambient.evaluation.quality import image_batches
    from sdxl_ambient.generate import load_pipeline

    files, expected = odd_images
    as_opened = [Image.open(f) for f in files]  # raw: mode I;16 / I, and the stored (sideways) pixels
    for path, want in zip(files, expected):
        np.testing.assert_array_equal(np.asarray(data.load_image(data.ImageRecord("k", "c", path))), np.asarray(want))
    want_pixels = pil_to_tensor(expected, 32)
    torch.testing.assert_close(next(image_batches(files, 32, 8)), want_pixels)
    torch.testing.assert_close(pil_to_tensor(as_opened, 32), want_pixels)
    torch.testing.assert_close(dino(as_opened), dino(expected), atol=1e-5, rtol=0)
    assert pil_to_tensor(as_opened, 32)[0].mean() < 0.6  # the ramp averages 0.5; read as 8-bit it would be white

    pipe = load_pipeline(str(tiny_pipeline_dir), device="cpu")
    torch.testing.assert_close(sampling.encode_images(pipe, as_opened, 64), sampling.encode_images(pipe, expected, 64))
    attack = mem.noise_attack(pipe, as_opened, ["a", "b"], {"dinov2": dino}, timestep=900, num_steps=1, resolution=64)
    for got, want in zip(attack["originals"], expected):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# ----------------------------------------------------------------------------- the training set's layouts


def _kohya_folder(tmp_path, image_folder) -> tuple:
    """The bundled images with kohya .txt captions beside them, no metadata.jsonl."""
    import shutil

    folder = tmp_path / "kohya"
    folder.mkdir()
    rows = read_metadata(image_folder)
    for row in rows:
        shutil.copy(image_folder / row["file_name"], folder / row["file_name"])
        (folder / row["file_name"]).with_suffix(".txt").write_text(row["text"] + "\n")
    by_name = sorted((r["file_name"], r["text"]) for r in rows)
    return folder, [name for name, _ in by_name], [text for _, text in by_name]


def _saved_dataset(tmp_path, image_folder) -> tuple:
    import datasets

    rows = read_metadata(image_folder)
    images = load_images([image_folder / r["file_name"] for r in rows])
    ds = datasets.Dataset.from_dict({"img": images, "prompt": [r["text"] for r in rows]}).cast_column("img", datasets.Image())
    ds.save_to_disk(tmp_path / "saved")
    return tmp_path / "saved", [str(i) for i in range(len(rows))], [r["text"] for r in rows], images


@pytest.mark.parametrize("layout", ["kohya", "saved_dataset"])
def test_memorization_reads_the_layouts_training_reads(layout, tmp_path, image_folder, tiny_pipeline_dir, dino_dir):
    """kohya .txt captions and a save_to_disk dataset (--dataset_name, with its columns) go through the command
    as training reads them: the generation prompts are those captions, the training images those files."""
    if layout == "kohya":
        folder, keys, captions = _kohya_folder(tmp_path, image_folder)
        source = ["--train_data_dir", str(folder)]
    else:
        folder, keys, captions, _ = _saved_dataset(tmp_path, image_folder)
        source = ["--dataset_name", str(folder), "--image_column", "img", "--caption_column", "prompt"]
    out = tmp_path / "mem"
    assert main(["memorization", *source, "--model", f"m={tiny_pipeline_dir}", "--embedder", str(dino_dir),
                 "--num_images", "3", "--num_attack_images", "0", "--resolution", "64", "--num_inference_steps", "2",
                 "--device", "cpu", "--output_dir", str(out)]) == 0
    report = json.loads((out / "memorization.json").read_text())
    assert report["models"]["m"]["generation"]["captions"] == captions[:3]
    assert report["settings"]["training_images"] == keys


def test_the_training_set_is_read_with_trainings_checks(tmp_path, image_folder):
    """A save_to_disk folder as --train_data_dir gives its rows and images; empty captions, broken images and a
    noisy-latent dataset (no clean images in it) are refused as training refuses them, naming the flag or file."""
    from sdxl_ambient.cache import FORMAT, FORMAT_VERSION, MANIFEST
    from sdxl_ambient.data import DataSource, load_image

    folder, keys, captions, images = _saved_dataset(tmp_path, image_folder)
    records = mem.read_training_set(DataSource(train_data_dir=str(folder), image_column="img", caption_column="prompt"))
    assert [(r.key, r.caption) for r in records] == list(zip(keys, captions))
    np.testing.assert_array_equal(np.asarray(load_image(records[5])), np.asarray(images[5]))

    kohya, _, _ = _kohya_folder(tmp_path, image_folder)
    (kohya / "astronaut.txt").write_text("  \n")
    with pytest.raises(ValueError, match=r"empty caption: .*astronaut\.jpg.*--allow_empty_captions"):
        mem.read_training_set(kohya)
    assert len(mem.read_training_set(DataSource(train_data_dir=str(kohya), allow_empty_captions=True))) == 8
    (kohya / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"broken\.png.*--skip_broken_images"):
        mem.read_training_set(DataSource(train_data_dir=str(kohya), allow_empty_captions=True))

    latents = tmp_path / "noisy"
    latents.mkdir()
    (latents / MANIFEST).write_text(json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION}))
    with pytest.raises(ValueError, match=r"--train_data_dir \S+noisy is a noisy-latent dataset.*clean training images"):
        mem.read_training_set(latents)
