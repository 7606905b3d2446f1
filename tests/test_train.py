"""train_sdxl_ambient.py end to end on the tiny pipeline: LoRA and full runs, resume, two processes."""

import shutil

import numpy as np
import pytest
import torch

from helpers import DEMO_IMAGES
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
def test_two_processes(tmp_path, tiny_pipeline_dir, image_folder):
    out = tmp_path / "ddp"
    proc = launch(tiny_args(tiny_pipeline_dir, image_folder, out, "--consistency_weight", "1", "--train_text_encoder",
                            "--validation_split", "3", "--validation_steps", "1", steps=2), num_processes=2)
    assert (out / LORA_FILE).is_file(), proc.stderr[-2000:]
    assert "on 2 processes" in proc.stderr
    # the held-out loss is summed over both processes' shares: every process logs the same value
    values = [line.split("validation_loss ")[1].split()[0] for line in proc.stderr.splitlines() if "step 2: validation_loss" in line]
    assert len(values) == 2 and values[0] == values[1], proc.stderr[-3000:]
    weights = lora_weights(out)
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_text_encoder_lora_trains_and_loads(tmp_path, tiny_pipeline_dir, image_folder):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "te"
    assert run_inprocess(tiny_args(tiny_pipeline_dir, image_folder, out, "--train_text_encoder", steps=2)) == 0
    keys = lora_weights(out).keys()
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("text_encoder_2.") for k in keys)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_pipeline_dir, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(out)
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
    import json

    assert json.loads((out / "training_settings.json").read_text())["resolved"]["ambient_timestep"] == 300
    assert not (out / "latent_cache").exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent), size_guidance={"images": 0})
    events.Reload()
    assert "validation" in events.Tags()["images"] and "loss" in events.Tags()["scalars"]


def test_bf16_lora_keeps_trained_weights_in_fp32(tmp_path, tiny_pipeline_dir, image_folder):
    """bf16 mixed precision: frozen weights in bf16, LoRA weights trained and saved in fp32."""
    out = tmp_path / "bf16"
    assert run_inprocess(tiny_args(tiny_pipeline_dir, image_folder, out, "--mixed_precision", "bf16",
                                   "--consistency_weight", "1", steps=2)) == 0
    weights = lora_weights(out)
    assert {v.dtype for v in weights.values()} == {torch.float32}
    assert all(torch.isfinite(v).all() for v in weights.values())


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
