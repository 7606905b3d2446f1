"""A resume refuses what does not belong to the run: each checkpoint records the run's fingerprint,
and a resume that would change the weights is refused before any model loads, in one line naming
each differing setting, writing nothing. Settings that change no weight stay changeable, and every
accepted resume is shown to have read its checkpoint (the steps it ran, the weights it started from)."""

import json
import logging
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import DEMO_IMAGES, assert_one_line_error
from helpers.training import LORA_FILE, cli_inprocess, lora_weights, record_steps, run_inprocess, snapshot, tiny_args
from sdxl_ambient import checkpointing


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_pipeline_dir):
    """A run of 6 steps with checkpoints at 3 and 6 (cache noise seed 0)."""
    out = tmp_path_factory.mktemp("finished") / "out"
    assert run_inprocess(tiny_args(tiny_pipeline_dir, DEMO_IMAGES, out, steps=6)) == 0
    return out


@pytest.fixture
def no_models(monkeypatch):
    from sdxl_ambient import models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the resume was checked")

    monkeypatch.setattr(models, "load_components", refuse)


def cut_at_3(finished, out):
    """The finished run's folder as a kill after checkpoint-3 leaves it."""
    shutil.copytree(finished, out)
    shutil.rmtree(out / "checkpoint-6")
    for name in (LORA_FILE, "pytorch_lora_weights_kohya.safetensors", "README.md"):
        (out / name).unlink()
    return out


def changed_images(tmp_path):
    """The demo images with one of them changed."""
    folder = tmp_path / "images"
    shutil.copytree(DEMO_IMAGES, folder)
    image = sorted(folder.glob("*.jpg"))[0]
    data = bytearray(image.read_bytes())
    from PIL import Image

    Image.open(image).rotate(90).save(image)
    assert image.read_bytes() != bytes(data)
    return folder


@pytest.mark.parametrize("extra, fragments, prepare", [
    (["--train_batch_size", "4"], ["--train_batch_size 2 there, 4 now"], None),
    (["--rank", "8"], ["--rank 4 there, 8 now"], None),  # today: a raw size-mismatch traceback after loading
    (["--finetune", "full"], ['--finetune "lora" there, "full" now'], None),
    (["--rank", "8", "--train_batch_size", "4", "--gradient_accumulation_steps", "2"],  # each one named
     ["--rank 4 there, 8 now", "--train_batch_size 2 there, 4 now", "--gradient_accumulation_steps 1 there, 2 now"], None),
    (["--seed", "1"], ["--seed 0 there, 1 now"], None),
    (["--learning_rate", "1e-2"], ["--learning_rate 0.001 there, 0.01 now"], None),
    (["--resolution", "128"], ["--resolution 64 there, 128 now"], None),
    (["--ambient_timestep", "200"],  # the example, once the cache is gone; the max delta's default is t_n
     ["--ambient_timestep 100 there, 200 now", "--consistency_max_delta 100 there, 200 now",
      "training data and its noise"],  # the examples' levels are part of the latent data
     lambda out, tmp: shutil.rmtree(out / "latent_cache")),
    (["--cache_dir", "{tmp}/new_cache", "--train_data_dir", "{tmp}/images"], ["training data and its noise"],
     lambda out, tmp: changed_images(tmp)),  # other images, in a fresh cache made with the same noise seed
])
def test_a_resume_that_would_change_the_weights_is_refused_naming_each_setting(no_models, capsys, finished, tmp_path,
                                                                               tiny_pipeline_dir, extra, fragments, prepare):
    out = cut_at_3(finished, tmp_path / "out")
    if prepare:
        prepare(out, tmp_path)
    extra = [e.format(tmp=tmp_path) for e in extra]
    before = snapshot(tmp_path)
    line = assert_one_line_error(capsys, cli_inprocess(tiny_args(tiny_pipeline_dir, DEMO_IMAGES, out, "--resume_from_checkpoint",
                                                                 "latest", *extra)),
                                 f"--resume_from_checkpoint {out / 'checkpoint-3'} belongs to another run", *fragments)
    assert line.count(" there, ") == len(fragments)  # nothing else is named
    assert snapshot(tmp_path) == before  # a failed start writes nothing: training_settings.json is not rewritten


def test_a_checkpoint_of_another_run_is_refused(no_models, capsys, finished, tmp_path, tiny_pipeline_dir):
    """Resuming another run's checkpoint (other t_n and seed) into a new folder names both differences."""
    out = tmp_path / "other"
    args = tiny_args(tiny_pipeline_dir, DEMO_IMAGES, out, "--resume_from_checkpoint", str(finished / "checkpoint-3"))
    args[args.index("--ambient_timestep") + 1], args[args.index("--seed") + 1] = "300", "5"
    assert_one_line_error(capsys, cli_inprocess(args), "belongs to another run", "--ambient_timestep 100 there, 300 now",
                          "--seed 0 there, 5 now")
    assert not out.exists()


def test_a_resume_whose_cache_is_gone_and_cannot_be_remade_is_refused(no_models, capsys, finished, tmp_path,
                                                                      tiny_pipeline_dir):
    """Without the noise seed a new cache draws new noise: the checkpoint's data cannot be had again."""
    out = cut_at_3(finished, tmp_path / "out")
    shutil.rmtree(out / "latent_cache")
    before = snapshot(out)
    assert_one_line_error(capsys, cli_inprocess(tiny_args(tiny_pipeline_dir, DEMO_IMAGES, out, "--resume_from_checkpoint",
                                                          "latest", noise_seed=None)),
                          "the latent cache it was trained on is not in --cache_dir", "new noise")
    assert snapshot(out) == before


def test_a_resume_with_another_model_in_a_folder_of_the_same_name_is_refused(no_models, capsys, finished, tmp_path,
                                                                               tiny_pipeline_dir, other_pipeline_dir):
    """The model is recorded by what it is, not by its folder's name: another model (other weights, the same
    configs and file sizes) in a folder named alike is refused; the same files moved elsewhere are the same model."""
    from sdxl_ambient.models import model_identity

    assert other_pipeline_dir.name == tiny_pipeline_dir.name
    out = cut_at_3(finished, tmp_path / "out")
    before = snapshot(tmp_path)
    line = assert_one_line_error(capsys, cli_inprocess(tiny_args(other_pipeline_dir, DEMO_IMAGES, out,
                                                                 "--resume_from_checkpoint", "latest")),
                                 "belongs to another run", "--pretrained_model_name_or_path \"pipeline (files sha256 ")
    assert line.count(" there, ") == 1  # the model, nothing else
    assert snapshot(tmp_path) == before
    moved = shutil.copytree(tiny_pipeline_dir, tmp_path / "moved" / tiny_pipeline_dir.name)
    assert model_identity(str(moved)) == model_identity(str(tiny_pipeline_dir)) != model_identity(str(other_pipeline_dir))


def test_a_resume_with_another_number_of_processes_is_refused(no_models, capsys, finished, tmp_path, tiny_pipeline_dir):
    """The number of processes is part of the fingerprint (it shapes the batches): a checkpoint of a two-process run
    (its fingerprint as such a run records it) resumed by one process is refused naming it."""
    out = cut_at_3(finished, tmp_path / "out")
    state_file = out / "checkpoint-3" / checkpointing.STATE_FILE
    state = json.loads(state_file.read_text())
    assert state["fingerprint"]["processes"] == 1
    state["fingerprint"]["processes"] = 2
    state_file.write_text(json.dumps(state))
    before = snapshot(tmp_path)
    line = assert_one_line_error(capsys, cli_inprocess(tiny_args(tiny_pipeline_dir, DEMO_IMAGES, out,
                                                                 "--resume_from_checkpoint", "latest")),
                                 "belongs to another run", "processes 2 there, 1 now")
    assert line.count(" there, ") == 1
    assert snapshot(tmp_path) == before


def test_the_readme_lists_exactly_the_flags_a_resume_may_change():
    """README's "Resuming" names every flag of config.RESUME_SAFE_FLAGS and no other (the hidden --hub_token
    aside, refused in every run), so that the two cannot drift apart."""
    import argparse
    import re

    from helpers import ROOT
    from sdxl_ambient.config import RESUME_SAFE_FLAGS, build_parser

    readme = (ROOT / "README.md").read_text()
    listed = re.search(r"These may change on a resume \(`config\.RESUME_SAFE_FLAGS`\):(.*?)\.\s", readme, re.S).group(1)
    named = set(re.findall(r"`--([a-z0-9_]+)`", listed))
    hidden = {a.dest for a in build_parser()._actions if a.help == argparse.SUPPRESS and a.dest != "help"}
    assert hidden == {"hub_token"}
    assert named == RESUME_SAFE_FLAGS - hidden
    assert "validation_split" not in named and {"torch_compile", "torch_compile_mode"} <= named


def test_settings_that_change_no_weight_stay_changeable(monkeypatch, finished, tmp_path, tiny_pipeline_dir):
    """Resume checkpoint-3 of the finished run into a new folder (its cache rebuilt from the same noise
    seed), with logging, checkpointing and validation changed: steps 4-6 run, and the weights are the
    finished run's, bit for bit."""
    steps = record_steps(monkeypatch)
    out = tmp_path / "elsewhere"
    assert run_inprocess(tiny_args(tiny_pipeline_dir, DEMO_IMAGES, out, "--resume_from_checkpoint",
                                   str(finished / "checkpoint-3"), "--logging_steps", "1", "--checkpointing_steps", "2",
                                   "--checkpoints_total_limit", "1", "--max_nonfinite_steps", "2", "--validation_prompt",
                                   "a cat", "--num_validation_images", "1", "--validation_steps", "100",
                                   "--validation_inference_steps", "1", "--dataloader_num_workers", "1")) == 0
    assert steps == [4, 5, 6]
    expected, resumed = lora_weights(finished), lora_weights(out)
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)


def test_the_run_length_may_change_unless_the_learning_rate_depends_on_it(no_models, monkeypatch, capsys, finished,
                                                                          tmp_path, tiny_pipeline_dir):
    out = shutil.copytree(finished, tmp_path / "out")
    before = snapshot(out)
    assert_one_line_error(capsys, cli_inprocess(tiny_args(tiny_pipeline_dir, DEMO_IMAGES, out, "--resume_from_checkpoint",
                                                          "latest", "--lr_scheduler", "linear", steps=8)),
                          '--lr_scheduler "constant" there, "linear" now', "--max_train_steps null there, 8 now")
    assert snapshot(out) == before
    monkeypatch.undo()  # models may load now
    steps = record_steps(monkeypatch)
    assert run_inprocess(tiny_args(tiny_pipeline_dir, DEMO_IMAGES, out, "--resume_from_checkpoint", "latest", steps=8)) == 0
    assert steps == [7, 8]  # a constant learning rate: training longer is a resume


def test_a_resume_starts_from_the_checkpoints_weights(monkeypatch, finished, tmp_path, tiny_pipeline_dir):
    """A deliberately altered checkpoint-3 gives other final weights than the finished run's: the resume
    read it, rather than retraining from step 0 (which gives the same bits, training being deterministic)."""
    out = cut_at_3(finished, tmp_path / "out")
    checkpoint_lora = out / "checkpoint-3" / LORA_FILE
    with safe_open(str(checkpoint_lora), framework="pt") as fh:
        header = fh.metadata()
    weights = load_file(str(checkpoint_lora))
    save_file({k: v + 0.05 if "lora_B" in k else v for k, v in weights.items()}, str(checkpoint_lora), metadata=header)
    steps = record_steps(monkeypatch)
    assert run_inprocess(tiny_args(tiny_pipeline_dir, DEMO_IMAGES, out, "--resume_from_checkpoint", "latest")) == 0
    assert steps == [4, 5, 6]
    expected, resumed = lora_weights(finished), lora_weights(out)
    assert any(not torch.equal(expected[k], resumed[k]) for k in expected)


def test_overwrite_clears_the_earlier_run_and_says_so(caplog, capsys, monkeypatch, finished, tmp_path, tiny_pipeline_dir):
    """--overwrite_output_dir removes the earlier run's checkpoints and results (so `latest` can never
    resume them) and logs what it removed; the latent cache is kept and reused. With a checkpoint there
    to resume, --overwrite_output_dir and --resume_from_checkpoint contradict each other."""
    out = shutil.copytree(finished, tmp_path / "out")
    assert_one_line_error(capsys, cli_inprocess(tiny_args(tiny_pipeline_dir, DEMO_IMAGES, out, "--overwrite_output_dir",
                                                          "--resume_from_checkpoint", "latest")),
                          "--overwrite_output_dir removes", "checkpoint-6", "give one of the two")
    steps = record_steps(monkeypatch)
    with caplog.at_level(logging.INFO):
        assert run_inprocess(tiny_args(tiny_pipeline_dir, DEMO_IMAGES, out, "--overwrite_output_dir",
                                       "--checkpointing_steps", "1", steps=2)) == 0
    assert steps == [1, 2]
    assert [p.name for p in checkpointing.list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    assert "--overwrite_output_dir: removed README.md, checkpoint-3, checkpoint-6" in caplog.text
    assert "encoding" not in caplog.text  # the cache stayed
    assert json.loads((out / "checkpoint-2" / checkpointing.STATE_FILE).read_text())["fingerprint"]["--seed"] == 0
