"""Memorisation and quality measures with tiny random embedders and the tiny pipeline (no downloads)."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import assert_one_line_error
from sdxl_ambient.cli import main
from sdxl_ambient.data import read_metadata
from sdxl_ambient.evaluation import memorization as mem
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
    return rows, load_images([r["path"] for r in rows])


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
    values, indices = mem.top1_similarity(emb, emb)
    torch.testing.assert_close(values, torch.ones(8), atol=1e-5, rtol=0)
    assert indices.tolist() == list(range(8))


def test_a_copied_training_image_is_flagged(dino, image_folder):
    _, images = training_images(image_folder)
    train = dino(images)
    copy = images[3].resize((64, 64))  # a generated image that copies training image 3 at the model's resolution
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    values, indices = mem.top1_similarity(dino([copy, noise]), train)
    assert indices[0] == 3 and values[0] > 0.99
    stats = mem.similarity_stats(values)
    assert stats["frac_above_0.99"] == 0.5 and values[1] < values[0]


def test_similarity_stats_figures():
    stats = mem.similarity_stats(torch.tensor([0.5, 0.91, 0.96, 0.995]))
    assert stats["count"] == 4 and math.isclose(stats["mean"], 0.84125, rel_tol=1e-6)
    assert (stats["frac_above_0.9"], stats["frac_above_0.95"], stats["frac_above_0.99"]) == (0.75, 0.5, 0.25)
    assert math.isclose(stats["p50"], 0.935, rel_tol=1e-6) and math.isclose(stats["max"], 0.995, rel_tol=1e-6)
    with pytest.raises(ValueError):
        mem.similarity_stats([])


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
           "by_embedder": {"dinov2": {"top1": top1, "match_index": match, "stats": mem.similarity_stats(top1)}}}
    sim = {"similarity": top1[:2], "stats": mem.similarity_stats(top1[:2])}
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


def test_noise_attack_scores_reconstructions_against_originals(tiny_pipeline_dir, dino, image_folder):
    from sdxl_ambient import sampling
    from sdxl_ambient.generate import load_pipeline

    rows, images = training_images(image_folder)
    pipe = load_pipeline(str(tiny_pipeline_dir), device="cpu")
    result = mem.noise_attack(pipe, images[:2], [r["caption"] for r in rows[:2]], {"dinov2": dino},
                              timestep=900, num_steps=3, resolution=64)
    assert len(result["one_step"]) == len(result["full"]) == len(result["originals"]) == 2
    for method in ("one_step", "full"):
        sim = result["scores"][method]["dinov2"]["similarity"]
        assert len(sim) == 2 and all(-1 <= s <= 1 + 1e-6 for s in sim)
    from_latents = mem.noise_attack(pipe, sampling.encode_images(pipe, images[:2], 64), ["a", "b"], {"dinov2": dino},
                                    timestep=900, num_steps=3)
    assert [im.size for im in from_latents["originals"]] == [(64, 64)] * 2
    # Scoring a reconstruction that is its original gives 1: the paired score is the right pairing.
    z = mem.paired_similarity(dino(result["originals"]), dino(result["originals"]))
    torch.testing.assert_close(z, torch.ones(2))


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


def test_quality_command_with_clip_score(tiny_pipeline_dir, dino_dir, clip_dir, image_folder, tmp_path, capsys):
    gen = tmp_path / "gen"
    assert main(["generate", "--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--prompt", "a cat", "--prompt", "a dog",
                 "--num_images_per_prompt", "2", "--resolution", "64", "--num_inference_steps", "3", "--output_dir", str(gen)]) == 0
    out = tmp_path / "q"
    assert main(["quality", "--generated", str(gen), "--reference", str(image_folder), "--embedder", str(dino_dir),
                 "--clip_model", str(clip_dir), "--kid_subsets", "3", "--device", "cpu", "--output_dir", str(out)]) == 0
    results = json.loads((out / "quality.json").read_text())["results"]
    assert results["num_generated"] == 4 and results["num_reference"] == 8  # grid.png is not counted
    assert results["fid"] > 0 and 0 <= results["clip_score"] <= 100
    assert f"{results['fid']:.4f}" in (out / "quality.md").read_text()
    clip = ClipImageEmbedder(clip_dir, device="cpu")
    assert clip(load_images([gen / "00000.png"])).shape == (1, 16)
    assert_one_line_error(capsys, main(["quality", "--generated", str(gen), "--reference", str(tmp_path / "none"),
                                        "--embedder", str(dino_dir), "--output_dir", str(tmp_path / "q2")]), "--reference",
                          "no such folder")
