"""train_sdxl_ambient.py end to end on the tiny pipeline: LoRA and full runs, resume, two processes."""

import json
import shutil

import numpy as np
import pytest
import torch

from helpers import DEMO_IMAGES, ROOT
from helpers.training import LORA_FILE, launch, lora_weights, run_inprocess, tiny_args


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_pipeline_dir):
    """One uninterrupted LoRA run with the consistency loss under `accelerate launch` (6 steps, checkpoints at 3 and 6)."""
    out = tmp_path_factory.mktemp("lora") / "out"
    launch(tiny_args(tiny_pipeline_dir, DEMO_IMAGES, out, "--consistency_weight", "0.5",
                     "--validation_prompt", "a ginger cat", "--num_validation_images", "1",
                     "--validation_steps", "100", "--validation_inference_steps", "2"))
    return out


def _images(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    return pipe("a ginger cat", num_inference_steps=3, height=64, width=64, generator=g, output_type="np").images


@pytest.mark.slow  # subprocess / accelerate launch, or seconds of training
def test_lora_run_writes_loadable_weights_that_change_images(lora_run, tiny_pipeline_dir):
    from diffusers import StableDiffusionXLPipeline

    for name in (LORA_FILE, "pytorch_lora_weights_kohya.safetensors", "training_settings.json", "README.md"):
        assert (lora_run / name).is_file(), name
    assert (lora_run / "samples" / "sample_0.png").is_file()
    assert [p.name for p in sorted(lora_run.glob("checkpoint-*"))] == ["checkpoint-3", "checkpoint-6"]
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_pipeline_dir, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    before = _images(pipe)
    pipe.load_lora_weights(lora_run)
    after = _images(pipe)
    assert np.abs(after - before).max() > 1e-3


@pytest.mark.slow  # subprocess / accelerate launch, or seconds of training
def test_resume_from_middle_equals_uninterrupted_run(lora_run, tmp_path, tiny_pipeline_dir):
    """Drop everything after checkpoint-3, resume with `latest`: the final LoRA is bit-identical."""
    out = tmp_path / "out"
    shutil.copytree(lora_run, out)
    shutil.rmtree(out / "checkpoint-6")
    for name in (LORA_FILE, "pytorch_lora_weights_kohya.safetensors", "README.md"):
        (out / name).unlink()
    launch(tiny_args(tiny_pipeline_dir, DEMO_IMAGES, out, "--consistency_weight", "0.5",
                     "--resume_from_checkpoint", "latest"))
    expected, resumed = lora_weights(lora_run), lora_weights(out)
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key


@pytest.mark.slow  # subprocess / accelerate launch, or seconds of training
def test_full_finetune_saves_a_complete_pipeline(tmp_path, tiny_pipeline_dir, image_folder):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    out = tmp_path / "full"
    launch(tiny_args(tiny_pipeline_dir, image_folder, out, "--finetune", "full", "--use_ema", "--ema_decay", "0.5", steps=3))
    pipe = StableDiffusionXLPipeline.from_pretrained(out, use_safetensors=True)
    base = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet")
    changed = [not torch.equal(a, b) for a, b in zip(pipe.unet.state_dict().values(), base.state_dict().values())]
    assert any(changed)
    assert (out / "checkpoint-3").is_dir()


@pytest.mark.slow  # subprocess / accelerate launch, or seconds of training
def test_two_processes_agree_on_the_weights_and_share_the_data(tmp_path, tiny_pipeline_dir, image_folder):
    """Two DDP processes (consistency loss, text-encoder LoRA) end with bit-identical trained weights, which did
    train, after each saw its own half of every epoch."""
    from safetensors.torch import load_file

    out, report = tmp_path / "ddp", tmp_path / "report"
    report.mkdir()
    proc = launch(tiny_args(tiny_pipeline_dir, image_folder, out, "--consistency_weight", "1", "--train_text_encoder", steps=2),
                  num_processes=2, script=ROOT / "tests" / "helpers" / "rank_report.py", RANK_REPORT_DIR=str(report))
    assert (out / LORA_FILE).is_file(), proc.stderr[-2000:]
    assert "on 2 processes" in proc.stderr
    ranks = [load_file(str(report / f"rank-{r}.safetensors")) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and any(k.startswith("1.") for k in ranks[0])  # text encoders too
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    for model in ("0.", "1.", "2."):  # the UNet and both text encoders trained
        assert _trained_lora_b(ranks[0], model), model
    seen = [json.loads((report / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert seen[0]["step"] == seen[1]["step"] == 2
    halves = [{i for batch in s["batches"] for i in batch} for s in seen]  # 2 steps x batch 2 x 2 processes = 8 images
    assert not halves[0] & halves[1] and halves[0] | halves[1] == set(range(8))
    saved = lora_weights(out)
    assert len(saved) == len(ranks[0]) and all(torch.isfinite(v).all() for v in saved.values())


def _trained_lora_b(weights: dict, prefix: str) -> bool:
    """Whether some LoRA up-projection of ``prefix`` moved off its zero initialisation."""
    return any(k.startswith(prefix) and "lora_B" in k and v.abs().max() > 0 for k, v in weights.items())


def test_text_encoder_lora_trains_and_loads(tmp_path, tiny_pipeline_dir, image_folder):
    """Both text encoders' adapters are trained (off their zero start) and saved, and diffusers' loader applies
    them: the prompt embeddings change."""
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "te"
    assert run_inprocess(tiny_args(tiny_pipeline_dir, image_folder, out, "--train_text_encoder", steps=2)) == 0
    weights = lora_weights(out)
    for prefix in ("text_encoder.", "text_encoder_2.", "unet."):
        assert _trained_lora_b(weights, prefix), prefix
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_pipeline_dir, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        before = pipe.encode_prompt("a ginger cat", do_classifier_free_guidance=False)
        pipe.load_lora_weights(out, use_safetensors=True)
        after = pipe.encode_prompt("a ginger cat", do_classifier_free_guidance=False)
    assert (after[0] - before[0]).abs().max() > 1e-4 and (after[2] - before[2]).abs().max() > 1e-4  # embeds, pooled
    assert np.isfinite(_images(pipe)).all()


def test_trains_directly_on_a_corrupted_dataset_and_logs_to_tensorboard(tmp_path, tiny_pipeline_dir, image_folder):
    """`sdxl-ambient corrupt` output is a training set as is (t_n adopted); validation images reach tensorboard."""
    pytest.importorskip("tensorboard")
    from sdxl_ambient.cli import main as cli_main

    shared = tmp_path / "noisy"
    assert cli_main(["corrupt", "--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--train_data_dir",
                     str(image_folder), "--ambient_timestep", "300", "--resolution", "64", "--output_dir", str(shared),
                     "--device", "cpu"]) == 0
    out = tmp_path / "out"
    args = tiny_args(tiny_pipeline_dir, shared, out, "--report_to", "tensorboard", "--validation_prompt", "a cat",
                     "--num_validation_images", "1", "--validation_steps", "2", "--validation_inference_steps", "2", steps=2)
    i = args.index("--ambient_timestep")
    del args[i:i + 2]
    assert run_inprocess(args) == 0

    assert json.loads((out / "training_settings.json").read_text())["resolved"]["ambient_timestep"] == 300
    assert not (out / "latent_cache").exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent), size_guidance={"images": 0})
    events.Reload()
    assert "validation" in events.Tags()["images"] and "loss" in events.Tags()["scalars"]


def test_bf16_lora_keeps_trained_weights_in_fp32(monkeypatch, tmp_path, tiny_pipeline_dir, image_folder):
    """bf16 mixed precision: the frozen UNet and text encoders in bf16, the VAE in fp32, the LoRA weights
    trained (off their zero start) in fp32 and saved in fp32."""
    from sdxl_ambient import train

    runs, real_setup = [], train.setup
    monkeypatch.setattr(train, "setup", lambda cfg: runs.append(real_setup(cfg)) or runs[-1])
    out = tmp_path / "bf16"
    assert run_inprocess(tiny_args(tiny_pipeline_dir, image_folder, out, "--mixed_precision", "bf16",
                                   "--consistency_weight", "1", steps=2)) == 0
    (run,) = runs
    parts = run.components
    assert {p.dtype for p in parts.unet.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for te in (parts.text_encoder, parts.text_encoder_2) for p in te.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in parts.vae.parameters()} == {torch.float32}
    assert run.params and {p.dtype for p in run.params} == {torch.float32}
    weights = lora_weights(out)
    assert {v.dtype for v in weights.values()} == {torch.float32}
    assert all(torch.isfinite(v).all() for v in weights.values()) and _trained_lora_b(weights, "unet.")


def test_resume_with_gradient_accumulation_over_uneven_epochs(tmp_path, tiny_pipeline_dir, image_folder):
    """6 images in batches of 2 (3 micro-batches an epoch), accumulation 2: resuming mid-run is still exact."""
    lines = (image_folder / "metadata.jsonl").read_text().splitlines()[:6]
    (image_folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    full, cut = tmp_path / "full", tmp_path / "cut"
    accumulate = ("--gradient_accumulation_steps", "2")
    assert run_inprocess(tiny_args(tiny_pipeline_dir, image_folder, full, *accumulate, steps=5)) == 0
    shutil.copytree(full, cut)
    for name in (LORA_FILE, "README.md"):
        (cut / name).unlink()
    assert run_inprocess(tiny_args(tiny_pipeline_dir, image_folder, cut, *accumulate, "--resume_from_checkpoint",
                                   "checkpoint-3", steps=5)) == 0
    expected, resumed = lora_weights(full), lora_weights(cut)
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
