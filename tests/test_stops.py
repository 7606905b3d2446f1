"""Every stop saves: Ctrl-C (SIGINT) like SIGTERM saves at the next step and exits with 128 + the
signal's number (130, 143), a second Ctrl-C aborts at once; a failure during training saves the last
completed step before the error goes on; a save the disk refuses is one line and never leaves a
partial checkpoint-N. Each resume afterwards is shown to start from what was saved."""

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import DEMO_IMAGES, ROOT, assert_one_line_error
from helpers.training import cli_inprocess, launch_command, lora_weights, record_steps, run_inprocess, subprocess_env, tiny_args
from sdxl_ambient import checkpointing
from sdxl_ambient.cli import main

NEVER = ("--checkpointing_steps", "1000")  # checkpoints come only from the stop or the failure under test


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_pipeline_dir):
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    assert run_inprocess(tiny_args(tiny_pipeline_dir, DEMO_IMAGES, out, *NEVER, steps=6)) == 0
    return out


def saved_steps(out) -> list[int]:
    """The steps of the complete checkpoints; and no partial one is left, under either name."""
    assert not list(out.glob(".tmp-checkpoint-*"))
    found = checkpointing.list_checkpoints(out)
    assert len(found) == len(list(out.glob("checkpoint-*")))  # every checkpoint-N is complete
    for path in found:
        checkpointing.check_files(path)
    return [checkpointing.read_state(p)["global_step"] for p in found]


def resumes_from(monkeypatch, tiny_pipeline_dir, out, step, uninterrupted=None, steps=6):
    """`--resume_from_checkpoint latest` runs exactly the steps after ``step`` and, given the
    uninterrupted run, ends with its weights bit for bit."""
    ran = record_steps(monkeypatch)
    assert run_inprocess(tiny_args(tiny_pipeline_dir, DEMO_IMAGES, out, *NEVER, "--resume_from_checkpoint", "latest",
                                   steps=steps)) == 0
    assert ran == list(range(step + 1, steps + 1))
    if uninterrupted is not None:
        expected, got = lora_weights(uninterrupted), lora_weights(out)
        assert all(torch.equal(expected[k], got[k]) for k in expected)


# ----------------------------------------------------------------------------- signals


def _default_sigint():
    """As a terminal's foreground job: SIGINT delivered (a script's background job has it ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow  # subprocess / accelerate launch, or seconds of training
@pytest.mark.parametrize("launcher, signum", [
    ("accelerate", signal.SIGINT),  # Ctrl-C in a terminal reaches the launcher and the training process
    ("python", signal.SIGINT),
    ("python", signal.SIGTERM),
])
def test_a_signal_saves_at_the_next_step_and_exits_with_128_plus_its_number(monkeypatch, tmp_path, tiny_pipeline_dir,
                                                                             launcher, signum):
    out, log = tmp_path / "out", tmp_path / "run.log"
    args = tiny_args(tiny_pipeline_dir, DEMO_IMAGES, out, *NEVER, steps=100000)
    command = launch_command(args) if launcher == "accelerate" else [sys.executable, str(ROOT / "train_sdxl_ambient.py"), *args]
    with open(log, "w") as fh:
        proc = subprocess.Popen(command, cwd=ROOT, env=subprocess_env(), stdout=fh, stderr=fh, start_new_session=True,
                                preexec_fn=_default_sigint)
        deadline = time.monotonic() + 120
        while "steps per epoch" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # some steps into training, long before a scheduled checkpoint
        assert proc.poll() is None, log.read_text()[-3000:]
        os.killpg(proc.pid, signum)  # the whole group, as a terminal (or a scheduler) does
        status = proc.wait(timeout=120)
    text = log.read_text()
    assert status == 128 + signum, text[-3000:]
    (step,) = saved_steps(out)
    stops = [line for line in text.splitlines() if "stopped by signal" in line]
    assert len(stops) == 1 and f"stopped by signal {signum} ({signal.Signals(signum).name}) at step {step};" in stops[0]
    assert "Traceback" not in text.split("steps per epoch")[1]
    resumes_from(monkeypatch, tiny_pipeline_dir, out, step, steps=step + 2)


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_stops_after_the_step_and_a_second_one_aborts_without_saving(monkeypatch, capsys, tmp_path,
                                                                            tiny_pipeline_dir, uninterrupted, presses):
    """Ctrl-C pressed during step 3: once, the run saves checkpoint-3 (the step under way, although
    step 3 is no sync point: --logging_steps 10, --max_nonfinite_steps 5) and exits 130, and the resume
    ends as the uninterrupted run; twice, it aborts at once with one line, saving nothing."""
    from sdxl_ambient import train

    real, previous = train.forward_backward, signal.getsignal(signal.SIGINT)

    def pressed(run, batch, step):
        if step == 2:  # the forward of step 3
            for _ in range(presses):
                signal.raise_signal(signal.SIGINT)
        return real(run, batch, step)

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(train, "forward_backward", pressed)
        status = cli_inprocess(tiny_args(tiny_pipeline_dir, DEMO_IMAGES, out, *NEVER))
    assert status == 130 and signal.getsignal(signal.SIGINT) is previous
    if presses == 1:
        assert saved_steps(out) == [3]
        resumes_from(monkeypatch, tiny_pipeline_dir, out, 3, uninterrupted)
    else:
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("interrupted: ")]
        assert lines == ["interrupted: aborted by a second Ctrl-C, without saving; resume from the last checkpoint with "
                         "--resume_from_checkpoint latest"] and "Traceback" not in err
        assert saved_steps(out) == []


# ----------------------------------------------------------------------------- failures


def _fail_in_forward(patch):
    from sdxl_ambient.step import AmbientObjective

    real, calls = AmbientObjective.__call__, []

    def failing(self, *args, **kwargs):
        calls.append(1)
        losses = real(self, *args, **kwargs)  # step 5's timesteps and noise are drawn: its generator moved on
        if len(calls) == 5:
            raise RuntimeError("planted failure in step 5, after its noise was drawn")
        return losses

    patch.setattr(AmbientObjective, "__call__", failing)


def _fail_in_validation(patch):
    from sdxl_ambient import train

    def failing(run, step, final=False):
        raise RuntimeError(f"planted failure in the validation of step {step}")

    patch.setattr(train, "validate", failing)


def _fail_in_model_card(patch):
    from sdxl_ambient import hub

    def failing(*args, **kwargs):
        raise RuntimeError("planted failure writing the model card")

    patch.setattr(hub, "model_card", failing)


def _fail_in_update(patch):
    from sdxl_ambient import train

    real = train.optimizer_step

    def failing(run, micro, step):
        result = real(run, micro, step)
        if step == 5:
            raise RuntimeError("planted failure in the update of step 5")
        return result

    patch.setattr(train, "optimizer_step", failing)


@pytest.mark.parametrize("plant, saved", [
    (_fail_in_forward, [4]),  # steps 1-4 done: step 4 is saved, exactly (the generator put back to where step 4 left it)
    (_fail_in_validation, [4]),  # validation after step 4
    (_fail_in_model_card, [6]),  # training done, the model card failed: the last step is saved
    (_fail_in_update, []),  # in the middle of an update no consistent state exists: nothing is saved
])
def test_a_failure_during_training_saves_the_last_completed_step(monkeypatch, tmp_path, tiny_pipeline_dir, uninterrupted,
                                                                 plant, saved):
    out = tmp_path / "out"
    extra = ("--validation_prompt", "a cat", "--validation_steps", "4") if plant is _fail_in_validation else ()
    with monkeypatch.context() as patch:
        plant(patch)
        with pytest.raises(RuntimeError, match="planted failure"):  # an unexpected error keeps its traceback
            run_inprocess(tiny_args(tiny_pipeline_dir, DEMO_IMAGES, out, *NEVER, *extra))
    assert saved_steps(out) == saved
    if saved:
        resumes_from(monkeypatch, tiny_pipeline_dir, out, saved[0], uninterrupted)


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """Writes past ``nbytes`` in a file fail (EFBIG), as they do on a full disk (ENOSPC)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


@pytest.mark.parametrize("when, fragment, saved", [
    ("second checkpoint", "could not write {out}/checkpoint-6: a write was cut short", [3]),
    ("final weights", "could not write to {out}: File too large", [3, 6]),
])
def test_a_full_disk_is_one_line_and_leaves_no_partial_checkpoint(monkeypatch, capsys, tmp_path, tiny_pipeline_dir,
                                                                  uninterrupted, when, fragment, saved):
    from sdxl_ambient import train

    out = tmp_path / "out"
    if when == "second checkpoint":  # optimizer.bin (~180 kB) no longer fits; the first checkpoint was saved
        real, calls = checkpointing.save_checkpoint, []

        def limited(*args, **kwargs):
            calls.append(1)
            with file_size_limit(150_000) if len(calls) == 2 else contextlib.nullcontext():
                return real(*args, **kwargs)

        monkeypatch.setattr(checkpointing, "save_checkpoint", limited)
    else:  # the final LoRA file (~76 kB) no longer fits
        real = train.finish

        def limited(*args, **kwargs):
            with file_size_limit(50_000):
                return real(*args, **kwargs)

        monkeypatch.setattr(train, "finish", limited)
    status = cli_inprocess(tiny_args(tiny_pipeline_dir, DEMO_IMAGES, out))
    line = assert_one_line_error(capsys, status, fragment.format(out=out), "free some space",
                                 "--resume_from_checkpoint latest")
    assert f"the last complete checkpoint is checkpoint-{saved[-1]}" in line
    assert saved_steps(out) == saved
    # no final weight file at all rather than a partial one (which `push` would upload), nor a temporary one
    assert not [p.name for p in out.iterdir() if "pytorch_lora_weights" in p.name]
    assert_one_line_error(capsys, main(["push", "--output_dir", str(out)]), "holds no finished weights")
    monkeypatch.undo()
    resumes_from(monkeypatch, tiny_pipeline_dir, out, saved[-1])
    assert json.loads((out / "training_settings.json").read_text())["resolved"]["seed"] == 0


def _limited(monkeypatch, module, name, nbytes):
    """``module.name`` runs with writes past ``nbytes`` per file refused, as on a full disk."""
    real = getattr(module, name)

    def limited(*args, **kwargs):
        with file_size_limit(nbytes):
            return real(*args, **kwargs)

    monkeypatch.setattr(module, name, limited)


def test_a_full_disk_in_the_trainers_cache_build_is_one_line_naming_the_cache(monkeypatch, capsys, tmp_path,
                                                                              tiny_pipeline_dir):
    from sdxl_ambient import cache

    out, cache_dir = tmp_path / "out", tmp_path / "cache"
    _limited(monkeypatch, cache, "build_cache", 20_000)  # the manifest fits, a shard does not
    status = cli_inprocess(tiny_args(tiny_pipeline_dir, DEMO_IMAGES, out, "--cache_dir", cache_dir))
    assert_one_line_error(capsys, status, f"could not write {cache_dir}: File too large", "MiB free there",
                          "free some space, then run the same command again (the shards written are kept)")
    assert not [p.name for p in cache_dir.iterdir() if ".tmp-" in p.name or p.name.endswith(".safetensors")]
    assert not (out / "training_settings.json").exists()
    monkeypatch.undo()
    assert run_inprocess(tiny_args(tiny_pipeline_dir, DEMO_IMAGES, out, "--cache_dir", cache_dir, steps=1)) == 0


def test_a_full_disk_in_corrupt_is_one_line_and_the_same_command_completes(monkeypatch, capsys, tmp_path,
                                                                           tiny_pipeline_dir):
    from sdxl_ambient import cache, corrupt

    out = tmp_path / "noisy"
    argv = ["corrupt", "--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--train_data_dir", str(DEMO_IMAGES),
            "--ambient_timestep", "100", "--resolution", "64", "--output_dir", str(out), "--device", "cpu",
            "--shard_size", "4"]
    _limited(monkeypatch, corrupt, "build_cache", 20_000)
    assert_one_line_error(capsys, main(argv), f"could not write {out}: File too large",
                          "free some space, then run the same command again")
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name or p.name.endswith(".safetensors")]
    monkeypatch.undo()
    assert main(argv) == 0
    assert len(cache.LatentCache(out)) == 8  # every shard there and whole (checksums verified)


def test_a_full_disk_in_generate_is_one_line_naming_the_folder(monkeypatch, capsys, tmp_path, tiny_pipeline_dir):
    from sdxl_ambient import generate

    out = tmp_path / "samples"
    argv = ["generate", "--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--prompt", "a cat",
            "--resolution", "64", "--num_inference_steps", "2", "--output_dir", str(out)]
    _limited(monkeypatch, generate, "write_images", 1_000)
    assert_one_line_error(capsys, main(argv), f"could not write {out}: File too large",
                          "free some space, then run the same command again with --overwrite_output_dir")
    monkeypatch.undo()
    assert main([*argv, "--overwrite_output_dir"]) == 0 and (out / "00000.png").is_file()


def test_a_full_disk_while_a_full_fine_tune_is_saved_leaves_no_partial_pipeline(tmp_path, tiny_pipeline_dir):
    """The final pipeline of a full fine-tune is written beside its place and renamed into place,
    model_index.json last: a folder holding one is a whole pipeline, and nothing temporary stays."""
    from helpers.training import snapshot
    from sdxl_ambient import models
    from sdxl_ambient.durable import write_failure

    components = models.load_components(str(tiny_pipeline_dir))
    out = tmp_path / "full"
    with pytest.raises(Exception) as failed, file_size_limit(200_000):
        models.save_full_pipeline(out, components, components.unet)
    assert write_failure(failed.value) is not None
    assert list(out.iterdir()) == []  # no part of it, no model_index.json, nothing temporary
    models.save_full_pipeline(out, components, components.unet)
    assert sorted(p.name for p in out.iterdir()) == sorted(["model_index.json", "unet", "vae", "text_encoder",
                                                            "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"])
    models.check_pipeline_files(str(out))
    before = snapshot(out)
    with pytest.raises(Exception) as failed, file_size_limit(200_000):  # a second save cut short: the first stays
        models.save_full_pipeline(out, components, components.unet)
    assert write_failure(failed.value) is not None and snapshot(out) == before
    models.save_full_pipeline(out, components, components.unet)  # again, over the earlier one
    assert not list(out.glob(".tmp-*"))
    models.check_pipeline_files(str(out))


def test_a_lora_save_cut_short_leaves_the_earlier_files_whole(monkeypatch, tmp_path):
    """Each final LoRA file is written under a temporary name and renamed into place: a write cut short
    (the disk full half-way, or a kill) never leaves a partial file under its name, nor a temporary one;
    each file there is whole (the earlier save's, or this one's: the same weights, the same bytes)."""
    import errno
    from pathlib import Path

    import safetensors
    import safetensors.torch
    from diffusers import UNet2DConditionModel

    from sdxl_ambient import models
    from sdxl_ambient.tiny import tiny_unet_config

    unet = UNet2DConditionModel(**tiny_unet_config())
    models.add_unet_lora(unet, rank=4)
    out = tmp_path / "lora"
    def whole_files():
        """Each file there, read whole: its metadata and tensors (a partial file does not load)."""
        found = {}
        for path in sorted(out.iterdir()):
            with safetensors.safe_open(str(path), "pt") as f:
                found[path.name] = (f.metadata(), {k: f.get_tensor(k).tolist() for k in f.keys()})
        return found

    models.save_lora(out, unet)
    before = whole_files()
    real = safetensors.torch.save_file
    for victim in ("kohya", "diffusers"):
        def cut_short(tensors, filename, metadata=None, victim=victim):
            real(tensors, filename, metadata=metadata)
            if (victim == "kohya") == ("kohya" in Path(filename).name):  # half of it reached the disk
                data = Path(filename).read_bytes()
                Path(filename).write_bytes(data[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(safetensors.torch, "save_file", cut_short)
        monkeypatch.setattr(models, "save_file", cut_short)
        with pytest.raises(OSError):
            models.save_lora(out, unet)
        assert whole_files() == before, victim  # both files whole, nothing else there
