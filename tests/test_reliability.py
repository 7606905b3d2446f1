"""Each reliability and safety guard, provoked: kills at random moments, half-written saves, planted
NaNs, a Hub token that must leak nowhere, an output folder that must not be overwritten, contradictory
flags. (The scan of the sources for unsafe loading is tests/test_safe_loading.py.)"""

import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import DEMO_IMAGES, ROOT, assert_one_line_error, message_lines
from helpers.training import LORA_FILE, launch_command, lora_weights, record_steps, run_inprocess, subprocess_env, tiny_args
from sdxl_ambient import checkpointing

STEPS = 42  # not a multiple of the 4 steps per epoch (8 images, batch 2): the last epoch is partial
CHAIN_ARGS = ("--checkpointing_steps", "2")


def _assert_same_weights(expected: dict, got: dict) -> None:
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def _assert_loadable(checkpoint: Path) -> int:
    """A complete checkpoint: its weights and optimizer/scheduler state load (safetensors, and torch.load
    with weights_only=True) and the trainer state parses; returns its step."""
    assert not checkpoint.name.startswith("."), checkpoint
    for weights in checkpoint.glob("*.safetensors"):
        assert all(torch.isfinite(v).all() for v in load_file(str(weights)).values()), weights
    assert torch.load(checkpoint / "optimizer.bin", weights_only=True)["param_groups"]
    assert torch.load(checkpoint / "scheduler.bin", weights_only=True)["last_epoch"] >= 0
    state = json.loads((checkpoint / checkpointing.STATE_FILE).read_text())
    assert checkpoint.name == f"checkpoint-{state['global_step']}"
    return state["global_step"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_pipeline_dir):
    """The reference: one run of STEPS steps with a checkpoint every 2 steps, never interrupted."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert run_inprocess(tiny_args(tiny_pipeline_dir, DEMO_IMAGES, out, *CHAIN_ARGS, steps=STEPS)) == 0
    return out


# ----------------------------------------------------------------------------- a crash loses nothing


def _step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


def _wait_for(proc, predicate, timeout=120.0) -> bool:
    """Poll until ``predicate()`` holds (True) or the process ends (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    raise TimeoutError("the training run made no progress")


def _group_gone(pgid: int, timeout=60.0) -> None:
    """Wait until every process of the group (the launcher and the training script) has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)
    raise TimeoutError(f"process group {pgid} still alive")


def _inode(path: Path) -> int | None:
    """The folder's identity, None once it is gone (a save in progress is renamed into place)."""
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _interrupt(args, out: Path, log: Path, moment: str, delay: float, signum: int) -> tuple[bool, int]:
    """Start `accelerate launch`, wait for a checkpoint newer than the resumed one (``moment="checkpoint"``,
    then ``delay`` seconds) or for a save in progress (``moment="saving"``), then signal the whole process
    group, as a preempted node does. Returns whether the run was still going when it was signalled, and
    the launcher's exit status."""
    start = max([_step(p) for p in checkpointing.list_checkpoints(out)], default=0)
    pattern = "checkpoint-*" if moment == "checkpoint" else ".tmp-checkpoint-*"
    left = {p.name: _inode(p) for p in out.glob(pattern)}  # a save killed earlier is not this run's

    def progressed():
        return any(_step(p) > start and left.get(p.name) != _inode(p) for p in out.glob(pattern)
                   if p.name.rsplit("-", 1)[1].isdigit())

    with open(log, "w") as fh:
        proc = subprocess.Popen(launch_command(args), cwd=ROOT, env=subprocess_env(), stdout=fh, stderr=fh,
                                start_new_session=True)
        alive = _wait_for(proc, progressed)
        time.sleep(delay)
        alive = alive and proc.poll() is None
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass
        status = proc.wait()
        _group_gone(proc.pid)
    return alive, status


def _identities(out: Path) -> dict:
    """Each complete checkpoint's folder identity: a re-save replaces the folder (another inode)."""
    return {p.name: p.stat().st_ino for p in checkpointing.list_checkpoints(out)}


@pytest.mark.slow  # subprocess / accelerate launch, or seconds of training
def test_killed_at_random_moments_then_resumed_equals_uninterrupted_run(monkeypatch, uninterrupted, tmp_path,
                                                                       tiny_pipeline_dir):
    """kill -9 (twice at random moments, once in the middle of a save) and a SIGTERM, each followed by
    `--resume_from_checkpoint latest`: the final LoRA is bit-identical to the uninterrupted run's, and
    `latest` is always a complete, loadable checkpoint. Each resume read its checkpoint: it says so, no
    earlier checkpoint is saved again, and the last one runs only the steps after it."""
    rng = random.Random(20240410)
    out = tmp_path / "out"
    args = tiny_args(tiny_pipeline_dir, DEMO_IMAGES, out, *CHAIN_ARGS, "--resume_from_checkpoint", "latest", steps=STEPS)
    plan = [("checkpoint", signal.SIGKILL), ("saving", signal.SIGKILL),
            ("checkpoint", signal.SIGKILL), ("checkpoint", signal.SIGTERM)]
    previous = None
    for i, (moment, signum) in enumerate(plan):
        delay = rng.uniform(0.0, 0.3) if moment == "checkpoint" else 0.0
        log = tmp_path / f"run{i}.log"
        before = _identities(out)
        alive, status = _interrupt(args, out, log, moment, delay, signum)
        assert alive, f"run {i} ended before it was interrupted"
        text = log.read_text()
        if previous is not None:  # resumed: from the checkpoint the last run left, and nothing before it re-saved
            assert f"resumed from {previous} at step {_step(previous)}" in text, text[-3000:]
            assert {k: v for k, v in _identities(out).items() if k in before} == before
        latest = checkpointing.resolve_checkpoint("latest", out)
        assert latest is not None and latest.parent == out
        step = _assert_loadable(latest)
        if signum == signal.SIGTERM:  # preemption: a checkpoint at the step it stopped, then exit 143
            assert status == 143, text[-3000:]
            assert f"stopped by signal 15 (SIGTERM) at step {step};" in text, text[-3000:]
        previous = latest
    steps = record_steps(monkeypatch)
    assert run_inprocess(args) == 0
    assert steps == list(range(_step(previous) + 1, STEPS + 1))
    _assert_same_weights(lora_weights(uninterrupted), lora_weights(out))
    assert not list(out.glob(".tmp-checkpoint-*"))


def test_half_written_save_is_never_resumed_from(monkeypatch, uninterrupted, tmp_path, tiny_pipeline_dir):
    """A kill in the middle of a save leaves a `.tmp-checkpoint-N` (partial) or, with a non-atomic writer,
    a `checkpoint-N` without its trainer state: `latest` skips both and the resumed run ends as the
    uninterrupted one did."""
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    for name in (LORA_FILE, "pytorch_lora_weights_kohya.safetensors", "README.md"):
        (out / name).unlink()
    for step in range(STEPS - 4 + 2, STEPS + 1, 2):  # keep checkpoint-(STEPS-4)
        shutil.rmtree(out / f"checkpoint-{step}")
    last_good = out / f"checkpoint-{STEPS - 4}"
    unfinished = out / f"checkpoint-{STEPS - 2}"
    shutil.copytree(last_good, unfinished)
    (unfinished / checkpointing.STATE_FILE).unlink()
    partial = out / f".tmp-checkpoint-{STEPS}"
    partial.mkdir()
    (partial / "optimizer.bin").write_bytes((last_good / "optimizer.bin").read_bytes()[:100])
    (partial / checkpointing.STATE_FILE).write_text(json.dumps({"global_step": STEPS, "seed": 0}))

    assert checkpointing.resolve_checkpoint("latest", out) == last_good
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        checkpointing.resolve_checkpoint(unfinished.name, out)
    steps = record_steps(monkeypatch)
    assert run_inprocess(tiny_args(tiny_pipeline_dir, DEMO_IMAGES, out, *CHAIN_ARGS, "--resume_from_checkpoint",
                                   "latest", steps=STEPS)) == 0
    assert steps == list(range(STEPS - 4 + 1, STEPS + 1))  # from the last good checkpoint on
    _assert_same_weights(lora_weights(uninterrupted), lora_weights(out))
    assert not partial.exists()
    assert _assert_loadable(checkpointing.resolve_checkpoint("latest", out)) == STEPS


def test_resume_from_the_final_checkpoint_takes_no_extra_step(monkeypatch, uninterrupted, tmp_path, tiny_pipeline_dir):
    """Killed after the last checkpoint but before the final weights were written: resuming finishes
    without training a single step."""
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    (out / LORA_FILE).unlink()
    steps = record_steps(monkeypatch)
    assert run_inprocess(tiny_args(tiny_pipeline_dir, DEMO_IMAGES, out, *CHAIN_ARGS, "--resume_from_checkpoint",
                                   "latest", steps=STEPS)) == 0
    assert steps == []
    _assert_same_weights(lora_weights(uninterrupted), lora_weights(out))


def test_a_kill_while_old_checkpoints_are_deleted_leaves_no_partial_checkpoint(monkeypatch, tmp_path):
    """--checkpoints_total_limit deletes old checkpoints; a kill half-way through a deletion must not leave
    a `checkpoint-N` that still looks complete (trainer state present, weights gone)."""
    for step in (2, 4, 6):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / LORA_FILE).write_bytes(b"weights")
        (folder / checkpointing.STATE_FILE).write_text(json.dumps({"global_step": step}))

    def killed_half_way(path, ignore_errors=False):
        (Path(path) / LORA_FILE).unlink()
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(checkpointing.shutil, "rmtree", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        checkpointing._prune(tmp_path, total_limit=1)
    complete = checkpointing.list_checkpoints(tmp_path)
    assert [p.name for p in complete] == ["checkpoint-4", "checkpoint-6"]
    assert all((p / LORA_FILE).is_file() for p in complete)


@pytest.mark.parametrize("moment", ["deleting the old copy", "renaming the new copy in"])
def test_a_kill_while_a_checkpoint_is_resaved_leaves_no_partial_checkpoint(moment, monkeypatch, tmp_path):
    """A second save of the same step (a stop right after a checkpoint) replaces checkpoint-N. A kill while the old
    copy is deleted, or before the new one is renamed in, leaves every `checkpoint-N` complete (the old copy, or
    none and `latest` the one before), and the next save completes it."""
    generator = torch.Generator()
    for step in (2, 4):
        checkpointing.save_checkpoint(_SavingAccelerator(), tmp_path, step, {"global_step": step}, generator)
    real_rmtree, real_replace = shutil.rmtree, os.replace

    def killed_while_deleting(path, ignore_errors=False):
        if (Path(path) / "optimizer.bin").is_file():  # a saved checkpoint being deleted: die half-way
            (Path(path) / "optimizer.bin").unlink()
            raise KeyboardInterrupt("killed")
        real_rmtree(path, ignore_errors=ignore_errors)

    def killed_before_renaming(src, dst):
        if Path(dst).name == "checkpoint-4":
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    if moment == "deleting the old copy":
        monkeypatch.setattr(checkpointing.shutil, "rmtree", killed_while_deleting)
    else:
        monkeypatch.setattr(checkpointing.os, "replace", killed_before_renaming)
    with pytest.raises(KeyboardInterrupt):
        checkpointing.save_checkpoint(_SavingAccelerator(), tmp_path, 4, {"global_step": 4, "saved": "again"}, generator)
    monkeypatch.undo()

    def complete(folder: Path) -> bool:
        return (folder / "optimizer.bin").read_bytes() == b"state" and (folder / "rng-0.safetensors").is_file() \
            and json.loads((folder / checkpointing.STATE_FILE).read_text())["global_step"] == _step(folder)

    left = checkpointing.list_checkpoints(tmp_path)
    assert left and all(complete(p) for p in left), [sorted(q.name for q in p.iterdir()) for p in left]
    assert checkpointing.resolve_checkpoint("latest", tmp_path) == left[-1]
    checkpointing.save_checkpoint(_SavingAccelerator(), tmp_path, 4, {"global_step": 4, "saved": "again"}, generator)
    assert [p.name for p in checkpointing.list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4"]
    assert json.loads((tmp_path / "checkpoint-4" / checkpointing.STATE_FILE).read_text())["saved"] == "again"
    assert complete(tmp_path / "checkpoint-4") and not list(tmp_path.glob(".tmp-*"))


# ----------------------------------------------------------------------------- non-finite losses


def _plant_nan(monkeypatch, bad_calls) -> list:
    """Make AmbientObjective return a NaN loss on the chosen calls (1-based; ``None`` = every call)."""
    from sdxl_ambient.step import AmbientObjective

    original, calls = AmbientObjective.__call__, []

    def planted(self, *args, **kwargs):
        losses = original(self, *args, **kwargs)
        calls.append(len(calls) + 1)
        if bad_calls is None or calls[-1] in bad_calls:
            losses = {**losses, "loss": losses["loss"] * float("nan")}
        return losses

    monkeypatch.setattr(AmbientObjective, "__call__", planted)
    return calls


def test_an_isolated_nan_is_skipped_with_a_warning(monkeypatch, caplog, tmp_path, tiny_pipeline_dir, image_folder):
    calls = _plant_nan(monkeypatch, {2})
    out = tmp_path / "out"
    handler = signal.getsignal(signal.SIGTERM)
    with caplog.at_level(logging.WARNING, logger="sdxl_ambient"):
        assert run_inprocess(tiny_args(tiny_pipeline_dir, image_folder, out, steps=6)) == 0
    assert signal.getsignal(signal.SIGTERM) is handler  # the run's save-and-stop handler is gone
    assert len(calls) == 6
    assert "non-finite loss or gradients at step 2 (1 in a row): update skipped" in caplog.text
    assert all(torch.isfinite(v).all() for v in lora_weights(out).values())
    assert _assert_loadable(checkpointing.resolve_checkpoint("latest", out)) == 6


def test_nonfinite_losses_in_a_row_stop_the_run_with_a_checkpoint(monkeypatch, tmp_path, tiny_pipeline_dir,
                                                                    image_folder):
    _plant_nan(monkeypatch, None)
    out = tmp_path / "out"
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RuntimeError, match="--max_nonfinite_steps"):
        run_inprocess(tiny_args(tiny_pipeline_dir, image_folder, out, "--max_nonfinite_steps", "2", steps=6))
    assert signal.getsignal(signal.SIGTERM) is handler
    saved = checkpointing.resolve_checkpoint("latest", out)
    assert _assert_loadable(saved) == 2  # flags are read every --max_nonfinite_steps steps
    lora = load_file(str(saved / LORA_FILE))
    assert all(torch.count_nonzero(v) == 0 for k, v in lora.items() if "lora_B" in k)  # no NaN update applied
    assert not (out / LORA_FILE).exists()


# ----------------------------------------------------------------------------- the Hub token


class RecordingApi:
    """Stands in for huggingface_hub.HfApi: records each upload's file list and bytes, sends nothing."""

    uploads: list = []

    def __init__(self, token=None, **kwargs):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        from types import SimpleNamespace

        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, allow_patterns, path_in_repo=None, **kwargs):
        assert kwargs.get("token") == self.token
        files = sorted(allow_patterns)
        data = b"".join((Path(folder_path) / f).read_bytes() for f in files)
        RecordingApi.uploads.append({"repo_id": repo_id, "path_in_repo": path_in_repo, "files": files, "data": data,
                                     "token_from_env": self.token == os.environ.get("HF_TOKEN")})


def _files_under(root: Path):
    return [p for p in root.rglob("*") if p.is_file()]


def test_hub_token_is_used_but_never_written_or_logged(monkeypatch, caplog, capsys, tmp_path, tiny_pipeline_dir,
                                                       image_folder):
    import huggingface_hub

    token = "hf_PlantedFakeTokenQ7zX93kLmN"
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    monkeypatch.setattr(RecordingApi, "uploads", [])
    out = tmp_path / "out"
    with caplog.at_level(logging.DEBUG):
        assert run_inprocess(tiny_args(
            tiny_pipeline_dir, image_folder, out, "--push_to_hub", "--push_checkpoints_to_hub",
            "--hub_model_id", "user/repo", "--report_to", "tensorboard", "--validation_prompt", "a ginger cat",
            "--num_validation_images", "1", "--validation_steps", "100", "--validation_inference_steps", "2",
            steps=6)) == 0
    captured = capsys.readouterr()
    for where, text in (("log records", caplog.text), ("stdout", captured.out), ("stderr", captured.err)):
        assert token not in text, where
    for path in _files_under(out):
        assert token.encode() not in path.read_bytes(), path
    uploads = RecordingApi.uploads
    assert all(u["token_from_env"] and u["repo_id"] == "user/repo" for u in uploads)
    assert all(token.encode() not in u["data"] for u in uploads)

    by_place = {u["path_in_repo"]: u["files"] for u in uploads}
    assert set(by_place) == {None, "checkpoint-3", "checkpoint-6"}
    weights = [LORA_FILE, "pytorch_lora_weights_kohya.safetensors"]
    assert by_place["checkpoint-3"] == by_place["checkpoint-6"] == weights  # weights only, no optimizer/RNG pickles
    final = by_place[None]
    assert {*weights, "README.md", "training_settings.json"} <= set(final)
    assert any(f.startswith("samples/") and f.endswith(".png") for f in final)
    assert not [f for f in final if f.startswith(("checkpoint-", "latent_cache", "logs")) or f.endswith((".bin", ".pkl"))]


def test_hub_token_flag_is_refused():
    from sdxl_ambient.config import parse_args

    with pytest.raises(ValueError, match="--hub_token is not accepted"):
        parse_args(["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--hub_token", "hf_x"])


# ----------------------------------------------------------------------------- output folder and flags


def _forbid_model_loading(monkeypatch):
    from sdxl_ambient import models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the flags were checked")

    monkeypatch.setattr(models, "load_components", refuse)


def test_output_folder_is_not_overwritten_without_the_flag(monkeypatch, tmp_path, tiny_pipeline_dir, image_folder):
    from sdxl_ambient.train import main

    out = tmp_path / "out"
    args = tiny_args(tiny_pipeline_dir, image_folder, out, steps=1)
    assert run_inprocess(args) == 0
    before = lora_weights(out)
    with monkeypatch.context() as patch:
        _forbid_model_loading(patch)
        with pytest.raises(ValueError, match="--overwrite_output_dir"):
            main(args)
    assert run_inprocess(args + ["--overwrite_output_dir", "--learning_rate", "1e-2"]) == 0
    after = lora_weights(out)
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("extra, message", [
    (["--ambient_timestep", "-1"], "--ambient_timestep -1"),
    (["--ambient_timestep", "1000"], "--ambient_timestep 1000"),
    (["--resolution", "100"], "--resolution 100"),
    (["--dataset_name", "user/data"], "--dataset_name and --train_data_dir"),
    (["--finetune", "full", "--train_text_encoder"], "--train_text_encoder"),
    (["--push_checkpoints_to_hub"], "--push_checkpoints_to_hub"),
    (["--resume_from_checkpoint", "checkpoint-7"], "--resume_from_checkpoint checkpoint-7"),
    (["--use_dora", "--finetune", "full"], "--use_dora"),
    (["--text_encoder_lr", "1e-5"], "--text_encoder_lr sets the text encoders' learning rate"),
    (["--optimizer", "prodigy", "--train_text_encoder", "--text_encoder_lr", "1e-5"], "--text_encoder_lr does not go with --optimizer prodigy"),
    (["--optimizer", "adafactor", "--use_8bit_adam"], "--use_8bit_adam"),
    (["--proportion_empty_prompts", "1.5"], "--proportion_empty_prompts 1.5"),
])
def test_bad_flags_fail_before_any_model_is_loaded(monkeypatch, tmp_path, extra, message):
    from sdxl_ambient.train import main

    _forbid_model_loading(monkeypatch)
    with pytest.raises(ValueError, match=re.escape(message)):
        main(tiny_args(tmp_path / "model", tmp_path / "images", tmp_path / "out", *extra))


def test_consistency_needs_a_noisy_example_known_once_the_levels_are_read(monkeypatch, tmp_path, tiny_pipeline_dir,
                                                                        image_folder):
    """--ambient_timestep 0 with the consistency term: refused before any model loads when no example is
    noisy, and not refused when metadata.jsonl's ambient_timestep column puts some images at t_n = 100."""
    from sdxl_ambient.train import main

    _forbid_model_loading(monkeypatch)
    args = tiny_args(tiny_pipeline_dir, image_folder, tmp_path / "out", "--consistency_weight", "1", "--ambient_timestep", "0")
    with pytest.raises(ValueError, match=re.escape("--consistency_weight > 0 needs data with noise")):
        main(args)
    rows = [json.loads(line) for line in (image_folder / "metadata.jsonl").read_text().splitlines()]
    for row in rows[:3]:
        row["ambient_timestep"] = 100
    (image_folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(AssertionError, match="a model was loaded"):  # every check passed: the models load next
        main(args)


def test_unknown_config_key_names_the_file(monkeypatch, tmp_path):
    from sdxl_ambient.train import main

    _forbid_model_loading(monkeypatch)
    config = tmp_path / "run.yaml"
    config.write_text("learning_rat: 1.0e-4\n")
    with pytest.raises(ValueError, match=re.escape(f"--config {config}: unknown keys ['learning_rat']")):
        main(["--config", str(config), *tiny_args(tmp_path / "model", tmp_path / "images", tmp_path / "out")])


def _no_network(monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("network access")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")
                                          if not p.name.startswith("accelerate_")))
def test_shipped_training_configs_parse_offline(monkeypatch, config):
    from sdxl_ambient.config import parse_args

    _no_network(monkeypatch)
    path = ROOT / "configs" / config
    # the demo config leaves the model and the images to `sdxl-ambient demo`
    extra = ["--pretrained_model_name_or_path", "tiny", "--train_data_dir", "images"] if config == "demo.yaml" else []
    args = parse_args(["--config", str(path), *extra])
    assert args.pretrained_model_name_or_path and (args.dataset_name or args.train_data_dir or args.data_sources)
    assert args.resolution % 8 == 0


def test_shipped_configs_ship_only_measured_settings_and_distinct_output_folders():
    """Each training config writes its own folder (a second config run into the first one's folder is
    refused), and none turns on the consistency term: on real images it helped only full sampling, never
    the Tweedie jump that ambient models are sampled with, and made samples worse at t_n >= 500
    (docs/image_results.md). A config that turns it on must come with a measurement that supports it."""
    import yaml

    configs = {p.name: yaml.safe_load(p.read_text()) for p in sorted((ROOT / "configs").glob("*.yaml"))
               if not p.name.startswith("accelerate_")}
    folders = [c.get("output_dir") for c in configs.values() if c.get("output_dir")]
    assert len(folders) == len(set(folders)), folders
    assert {name: c.get("consistency_weight", 0) for name, c in configs.items()} == dict.fromkeys(configs, 0.0)


@pytest.mark.slow  # subprocess / accelerate launch, or seconds of training
def test_sigterm_to_two_processes_stops_both_at_one_checkpoint(tmp_path, tiny_pipeline_dir, image_folder):
    """Preemption of a two-process run: the processes agree on the step, save it together and exit,
    instead of one saving while the other waits in a gradient all-reduce."""
    out = tmp_path / "out"
    args = tiny_args(tiny_pipeline_dir, image_folder, out, "--checkpointing_steps", "100000", "--logging_steps", "100000",
                     steps=100000)
    proc = subprocess.Popen(launch_command(args, 2), cwd=ROOT, env=subprocess_env(ACCELERATE_USE_CPU="true"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (out / "latent_cache" / "manifest.json").exists() and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(5)  # well into training
        os.killpg(proc.pid, signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stops = [line for line in output.splitlines() if "stopped by signal" in line]
    assert len(stops) == 2, output[-3000:]
    steps = {line.split(" at step ")[1].split(";")[0] for line in stops}
    assert len(steps) == 1
    (saved,) = checkpointing.list_checkpoints(out)
    assert saved.name == f"checkpoint-{steps.pop()}"


# ----------------------------------------------------------------------------- the cache's noise stays secret


def _without_seed(args: list[str]) -> list[str]:
    i = args.index("--seed")
    return args[:i] + args[i + 2:]


def test_the_training_seed_does_not_reveal_the_cache_noise(monkeypatch, tmp_path, tiny_pipeline_dir, image_folder):
    """The in-trainer cache draws its own secret noise seed: it is written nowhere in the output folder
    (settings, trainer state, cache), and the same --seed in another folder gets other noise."""
    import secrets

    from sdxl_ambient.cache import LatentCache

    monkeypatch.setattr(secrets, "token_hex", lambda n: "5eed" * (n // 2))
    out = tmp_path / "out"
    assert run_inprocess(tiny_args(tiny_pipeline_dir, image_folder, out, steps=3, noise_seed=None)) == 0
    for path in _files_under(out):
        assert b"5eed" * 8 not in path.read_bytes(), path
    settings = json.loads((out / "training_settings.json").read_text())
    assert settings["resolved"]["seed"] == 0 and not any("noise_seed" in k for k in (*settings, *settings["resolved"]))
    assert json.loads((out / "checkpoint-3" / checkpointing.STATE_FILE).read_text())["seed"] == 0

    monkeypatch.setattr(secrets, "token_hex", lambda n: "abcd" * (n // 2))
    other = tmp_path / "other"
    assert run_inprocess(tiny_args(tiny_pipeline_dir, image_folder, other, steps=1, noise_seed=None)) == 0
    first, second = LatentCache(out / "latent_cache"), LatentCache(other / "latent_cache")
    assert not torch.allclose(first[0]["observed"], second[0]["observed"], atol=1e-3)


def test_overwrite_without_a_seed_reuses_the_cache(caplog, tmp_path, tiny_pipeline_dir, image_folder):
    """--overwrite_output_dir without --seed draws a new training seed; the cache does not depend on it
    and is reused as it is, not refused or rebuilt."""
    out = tmp_path / "out"
    args = _without_seed(tiny_args(tiny_pipeline_dir, image_folder, out, steps=1, noise_seed=None))
    with caplog.at_level(logging.INFO, logger="sdxl_ambient"):
        assert run_inprocess(args) == 0
    assert "encoding 1 of 1 shard(s)" in caplog.text
    shard = out / "latent_cache" / "shard-00000.safetensors"
    before, seed = shard.read_bytes(), json.loads((out / "training_settings.json").read_text())["resolved"]["seed"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sdxl_ambient"):
        assert run_inprocess(args + ["--overwrite_output_dir"]) == 0
    assert "encoding" not in caplog.text and shard.read_bytes() == before
    assert json.loads((out / "training_settings.json").read_text())["resolved"]["seed"] != seed


class _SavingAccelerator:
    """The part of accelerate that save_checkpoint uses, on one process."""

    is_main_process, process_index = True, 0

    def wait_for_everyone(self):
        pass

    def save_state(self, folder):
        (Path(folder) / "optimizer.bin").write_bytes(b"state")


def test_checkpoint_renames_are_flushed_to_their_folder(monkeypatch, tmp_path):
    """A rename is durable only once its folder is flushed: after each checkpoint is renamed into place,
    and after an old one is renamed away, the output folder is fsynced."""
    events = []
    real_replace, real_fsync = os.replace, os.fsync
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("rename", Path(b).name)) or real_replace(a, b))
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or real_fsync(fd))
    generator = torch.Generator()
    for step in (1, 2):
        checkpointing.save_checkpoint(_SavingAccelerator(), tmp_path, step, {"global_step": step}, generator, total_limit=1)
    renames = [i for i, e in enumerate(events) if e[0] == "rename"]
    assert [events[i][1] for i in renames] == ["checkpoint-1", "checkpoint-2", ".tmp-checkpoint-1-old"]
    for i in renames:
        assert events[i + 1] == ("fsync", str(tmp_path)), events[i:i + 2]
    assert [p.name for p in checkpointing.list_checkpoints(tmp_path)] == ["checkpoint-2"]


@pytest.mark.parametrize("status, what", [(143, "SIGTERM"), (130, "Ctrl-C"), (2, None)])
def test_the_demo_stops_when_its_training_stops(monkeypatch, tmp_path, capsys, status, what):
    """A training run that ends early must not be followed by sampling and a report. Stopped by a signal
    (130: Ctrl-C, 143: SIGTERM, a checkpoint saved), the demo exits with the same status and one line
    saying how to resume; a failed training (2) is the demo's one-line error."""
    from diffusers import StableDiffusionXLPipeline  # noqa: F401  (a first import warns of optional packages)

    from sdxl_ambient import train
    from sdxl_ambient.cli import main

    monkeypatch.setattr(train, "main", lambda argv: status)
    capsys.readouterr()
    got = main(["demo", "--output_dir", str(tmp_path / "demo")])
    if what is None:
        assert_one_line_error(capsys, got, "exit status 2", "--resume_from_checkpoint latest")
    else:
        err = capsys.readouterr().err
        lines = message_lines(err)
        assert got == status and len(lines) == 1, err
        assert lines[0].startswith("stopped:") and what in lines[0] and "--resume_from_checkpoint latest" in lines[0]
    assert not (tmp_path / "demo" / "demo_grid.png").exists() and not (tmp_path / "demo" / "memorization").exists()
