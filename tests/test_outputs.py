"""Nothing a user has is overwritten or deleted, and one run at a time per folder: every command
refuses an output folder that overlaps an input or holds files it did not write (before any work,
naming both paths), replaces its own earlier results only when asked, and locks the folder."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import DEMO_IMAGES, ROOT, assert_one_line_error, fake_hf_api
from helpers.training import cli_inprocess, lora_weights, record_steps, snapshot, subprocess_env, tiny_args
from sdxl_ambient.cli import main
from sdxl_ambient.files import LOCK_FILE, OUTPUT_RECORD


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if any command starts its work (loads a model, samples, measures, trains)."""
    from sdxl_ambient import demo, generate, models
    from sdxl_ambient.evaluation import memorization, quality

    def refuse(*args, **kwargs):
        raise AssertionError("work started before the output folder was checked")

    for module, name in ((models, "load_components"), (generate, "load_pipeline"), (memorization, "evaluate_models"),
                         (quality, "measure"), (demo, "run_demo")):
        monkeypatch.setattr(module, name, refuse)


@pytest.fixture
def places(tmp_path, tiny_pipeline_dir, image_folder):
    """A model folder, an image folder and a LoRA folder, each a copy the test may write beside."""
    import shutil

    model, images, lora = tmp_path / "model", tmp_path / "data" / "images", tmp_path / "lora"
    shutil.copytree(tiny_pipeline_dir, model)
    shutil.copytree(image_folder, images)
    lora.mkdir()
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"not read")
    return {"model": model, "images": images, "lora": lora}


def train(p, out, *extra, steps=6):
    return ["train", *tiny_args(p["model"], p["images"], out, *extra, steps=steps)]


def corrupt(p, out, *extra):
    return ["corrupt", "--pretrained_model_name_or_path", str(p["model"]), "--train_data_dir", str(p["images"]),
            "--ambient_timestep", "100", "--resolution", "64", "--output_dir", str(out), "--device", "cpu", *extra]


def generate(p, out, *extra, lora=True):
    """``generate`` with the LoRA folder as an input (an empty stand-in: only tests that stop before work use it)."""
    return ["generate", "--pretrained_model_name_or_path", str(p["model"]), *(["--lora_path", str(p["lora"])] if lora else []),
            "--prompt", "a cat", "--resolution", "64", "--num_inference_steps", "2", "--output_dir", str(out), *extra]


def memorization(p, out, *extra):
    return ["memorization", "--train_data_dir", str(p["images"]), "--model", f"m={p['model']}:{p['lora']}",
            "--output_dir", str(out), *extra]


def quality(p, out, *extra):
    return ["quality", "--generated", str(p["lora"]), "--reference", str(p["images"]), "--output_dir", str(out), *extra]


def run(argv) -> int:
    """A command as the command line runs it (the trainer with a fresh accelerate state)."""
    return cli_inprocess(argv[1:]) if argv[0] == "train" else main(argv)


# ----------------------------------------------------------------------------- apart from the inputs


@pytest.mark.parametrize("command, where, input_flag, relation", [
    (train, lambda p: p["images"], "--train_data_dir", "is"),
    (train, lambda p: p["images"] / "samples", "--train_data_dir", "is inside"),  # its samples would become training data
    (train, lambda p: p["images"].parent, "--train_data_dir", "contains"),
    (train, lambda p: p["model"] / "lora", "--pretrained_model_name_or_path", "is inside"),
    (corrupt, lambda p: p["images"], "--train_data_dir", "is"),  # the example: shards beside the images
    (corrupt, lambda p: p["images"] / "noisy", "--train_data_dir", "is inside"),
    (corrupt, lambda p: p["images"].parent, "--train_data_dir", "contains"),
    (generate, lambda p: p["lora"], "--lora_path", "is"),
    (memorization, lambda p: p["images"] / "report", "--train_data_dir", "is inside"),
    (memorization, lambda p: p["model"], "--model", "is"),
    (quality, lambda p: p["images"], "--reference", "is"),
    (quality, lambda p: p["lora"] / "q", "--generated", "is inside"),
])
def test_an_output_folder_overlapping_an_input_is_refused_before_any_work(no_work, capsys, places, command, where,
                                                                          input_flag, relation):
    out = where(places)
    before = {name: snapshot(folder) for name, folder in places.items()}
    line = assert_one_line_error(capsys, run(command(places, out)), f"--output_dir {out} {relation} {input_flag}")
    given = {"--train_data_dir": places["images"], "--pretrained_model_name_or_path": places["model"],
             "--lora_path": places["lora"], "--model": places["model"], "--reference": places["images"],
             "--generated": places["lora"]}[input_flag]
    assert str(given) in line and "delete" not in line
    assert {name: snapshot(folder) for name, folder in places.items()} == before  # not even a lock file
    if relation == "is inside":
        assert not out.exists()


def test_the_cache_folder_stays_apart_from_the_inputs_and_the_output(no_work, capsys, places, tmp_path):
    out, runs = tmp_path / "out", tmp_path / "runs"
    for cache, output, fragment in (
            (places["images"] / "cache", out, f"--cache_dir {places['images'] / 'cache'} is inside "
                                              f"--train_data_dir {places['images']}"),
            (out, out, f"--cache_dir {out} is --output_dir {out}"),
            (runs, runs / "out", f"--cache_dir {runs} contains --output_dir {runs / 'out'}")):
        before = snapshot(tmp_path)
        assert_one_line_error(capsys, run(train(places, output, "--cache_dir", cache)), fragment)
        assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- files the command did not write


USER_FILE = "notes.txt"


@pytest.mark.parametrize("command", [train, corrupt, generate, memorization, quality])
def test_a_folder_holding_files_the_command_did_not_write_is_refused(no_work, capsys, places, tmp_path, command):
    out = tmp_path / "mine"
    out.mkdir()
    (out / USER_FILE).write_text("my notes")
    before = snapshot(out)
    line = assert_one_line_error(capsys, run(command(places, out)), f"--output_dir {out} holds files sdxl-ambient",
                                 "did not write", USER_FILE, "--overwrite_output_dir" if command is not corrupt else "")
    assert "delete" not in line
    assert snapshot(out) == before


@pytest.mark.parametrize("command, taken", [
    (train, "README.md"),  # the model card would replace the user's README
    (train, "checkpoint-500"),  # e.g. a diffusers run's checkpoint: never resumed, pruned or replaced
    (generate, "metadata.jsonl"),  # the example: generate replaced an image folder's captions
    (generate, "00000.png"),
    (memorization, "memorization.md"),
    (quality, "quality.json"),
])
def test_even_with_the_flag_a_file_the_command_would_replace_is_refused(no_work, capsys, places, tmp_path, command,
                                                                        taken):
    out = tmp_path / "mine"
    out.mkdir()
    (out / taken).write_text("the user's own")
    before = snapshot(out)
    line = assert_one_line_error(capsys, run(command(places, out, "--overwrite_output_dir")), f"--output_dir {out} holds",
                                 taken, "did not write and would replace")
    assert "--overwrite_output_dir" not in line
    assert snapshot(out) == before


def test_the_demo_refuses_a_folder_of_the_users(no_work, capsys, tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "lora").mkdir()
    (out / "lora" / "mine.safetensors").write_bytes(b"the user's LoRA")
    before = snapshot(out)
    assert_one_line_error(capsys, main(["demo", "--output_dir", str(out), "--overwrite_output_dir"]), "holds lora",
                          "would replace")
    assert snapshot(out) == before


def test_the_tiny_pipeline_writes_nothing_beside_its_folder(tmp_path):
    """`make-tiny` (and so the demo) wrote scratch tokenizer files into the folder above its own,
    over a user's `tokenizer/` there."""
    mine = tmp_path / "mine"
    (mine / "tokenizer").mkdir(parents=True)
    (mine / "tokenizer" / "vocab.json").write_text("the user's vocabulary")
    before = snapshot(mine)
    assert main(["make-tiny", str(mine / "tiny")]) == 0
    assert {k: v for k, v in snapshot(mine).items() if not k.startswith("tiny")} == before


def test_with_the_flag_a_command_writes_beside_the_users_files_and_never_touches_them(capsys, places, tmp_path):
    """generate and train into a folder holding the user's files, with --overwrite_output_dir: their own
    outputs are written, the user's files are byte for byte and time for time as they were."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / USER_FILE).write_text("my notes")
    (out / "photos").mkdir()
    (out / "photos" / "holiday.png").write_bytes(next(DEMO_IMAGES.glob("*.jpg")).read_bytes())
    before = snapshot(out)
    assert run(generate(places, out, "--overwrite_output_dir", lora=False)) == 0
    assert run(train(places, out, "--overwrite_output_dir", steps=1)) == 0
    assert {k: v for k, v in snapshot(out).items() if k in before} == before
    assert (out / "00000.png").is_file() and (out / "pytorch_lora_weights.safetensors").is_file()
    written_by = json.loads((out / OUTPUT_RECORD).read_text())["written_by"]
    assert written_by["metadata.jsonl"] == "generate" and written_by["README.md"] == "train"
    assert USER_FILE not in written_by and "photos" not in written_by


def test_a_push_to_the_hub_leaves_out_the_users_files(monkeypatch, places, tmp_path):
    """Trained with --overwrite_output_dir into a folder of the user's images: the final push, and
    `sdxl-ambient push` afterwards, upload the run's weights, card and samples, never the user's images."""
    import huggingface_hub

    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    uploaded = []
    monkeypatch.setattr(huggingface_hub, "HfApi", fake_hf_api(lambda *, allow_patterns, **kwargs: uploaded.extend(allow_patterns)))
    out = tmp_path / "mine"
    (out / "photos").mkdir(parents=True)
    for name in ("photos/holiday.jpg", "portrait.png"):
        (out / name).write_bytes(next(DEMO_IMAGES.glob("*.jpg")).read_bytes())
    assert run(train(places, out, "--overwrite_output_dir", "--push_to_hub", "--hub_model_id", "me/m",
                     "--validation_prompt", "a cat", "--num_validation_images", "1", "--validation_steps", "100",
                     "--validation_inference_steps", "1", steps=1)) == 0
    assert "pytorch_lora_weights.safetensors" in uploaded and "samples/sample_0.png" in uploaded
    assert not [f for f in uploaded if f.startswith(("photos", "portrait"))]
    first, uploaded[:] = list(uploaded), []
    assert main(["push", "--output_dir", str(out), "--hub_model_id", "me/m"]) == 0
    assert sorted(uploaded) == sorted(first)


def test_a_rerun_replaces_its_earlier_results_only_when_asked_and_leaves_nothing_stale(capsys, caplog, places, tmp_path):
    out = tmp_path / "gen"
    assert run(generate(places, out, "--prompt", "a dog", "--prompt", "a bird", lora=False)) == 0
    assert sorted(p.name for p in out.glob("0*.png")) == ["00000.png", "00001.png", "00002.png"]
    first = snapshot(out)
    assert_one_line_error(capsys, run(generate(places, out, lora=False)), "holds the results of an earlier sdxl-ambient generate",
                          "--overwrite_output_dir")
    assert snapshot(out) == first
    assert run(generate(places, out, "--overwrite_output_dir", lora=False)) == 0
    assert sorted(p.name for p in out.glob("0*.png")) == ["00000.png"]  # the earlier run's other images are gone
    assert [json.loads(line)["file_name"] for line in (out / "metadata.jsonl").read_text().splitlines()] == ["00000.png"]
    assert "--overwrite_output_dir: removed 00000.png, 00001.png, 00002.png" in caplog.text  # and says so


# ----------------------------------------------------------------------------- one run per folder


def _hold_lock(folder):
    """Another process holding ``folder``'s lock, as a running command does; returns it once it holds it."""
    code = ("import sys, time; from sdxl_ambient.outputs import FolderLock; "
            "FolderLock(sys.argv[1], '--output_dir').acquire(); print('locked', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=ROOT, env=subprocess_env(),
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


@pytest.fixture
def holders():
    started = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.mark.parametrize("locked, command", [
    ("out", train),  # the output folder of a run in progress
    ("cache", lambda p, out: train(p, out, "--cache_dir", out.parent / "cache")),  # the latent cache of another run
    ("out", corrupt),
    ("out", generate),
    ("out", memorization),
])
def test_a_second_run_on_a_folder_in_use_is_refused_naming_the_holder(no_work, capsys, places, tmp_path, holders, locked,
                                                                      command):
    out = tmp_path / "out"
    folder = out if locked == "out" else tmp_path / "cache"
    holders.append(_hold_lock(folder))
    before = snapshot(tmp_path)
    line = assert_one_line_error(capsys, run(command(places, out)), "is in use by another run",
                                 f"(PID {holders[-1].pid})")
    assert str(folder) in line
    assert snapshot(tmp_path) == before  # the holder's lock file is left as it is


@pytest.mark.slow  # subprocess / accelerate launch, or seconds of training
def test_a_run_in_progress_keeps_a_second_one_out_and_a_killed_one_does_not_block_the_resume(places, tmp_path, capsys):
    """A real training run holds its output folder: a second start is refused naming its PID; after kill -9
    the stale lock file is still there, and `--resume_from_checkpoint latest` takes the folder and continues."""
    out = tmp_path / "out"
    args = tiny_args(places["model"], places["images"], out, "--checkpointing_steps", "2", steps=100000)
    script = str(ROOT / "train_sdxl_ambient.py")
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([sys.executable, script, *args], cwd=ROOT, env=subprocess_env(), stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("checkpoint-*")) and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert list(out.glob("checkpoint-*")), (tmp_path / "first.log").read_text()[-3000:]
        assert_one_line_error(capsys, cli_inprocess(tiny_args(places["model"], places["images"], out,
                                                              "--resume_from_checkpoint", "latest", steps=100000)),
                              f"--output_dir {out} is in use by another run (PID {first.pid})")
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    assert (out / LOCK_FILE).read_text().strip() == str(first.pid)  # stale: its holder is gone
    last = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert cli_inprocess(tiny_args(places["model"], places["images"], out, "--resume_from_checkpoint", "latest",
                                   steps=last + 2)) == 0
    assert lora_weights(out) and not (out / LOCK_FILE).exists()


# ----------------------------------------------------------------------------- a resume into a folder of another run


def test_a_resume_from_outside_into_a_folder_of_another_run_is_refused_unless_asked(monkeypatch, capsys, places,
                                                                                      tmp_path):
    """`--output_dir A --resume_from_checkpoint B/checkpoint-3`, A holding a finished run X: refused before any
    model loads, naming X's files, and A is left as it was; with --overwrite_output_dir X's results (its
    checkpoints too, so that `latest` cannot pick one later) are replaced by the resumed run's. A resume
    from a checkpoint inside the folder needs no flag."""
    from sdxl_ambient import models

    a, b = tmp_path / "a", tmp_path / "b"
    assert run(train(places, a, "--seed", "1")) == 0  # run X: checkpoints 3 and 6, its LoRA, card and settings
    assert run(train(places, b, steps=3)) == 0  # another run, stopped at its checkpoint-3
    before = snapshot(a)
    resume = ("--resume_from_checkpoint", str(b / "checkpoint-3"))
    with monkeypatch.context() as patch:
        patch.setattr(models, "load_components", lambda *a, **k: pytest.fail("a model loaded before the folder check"))
        line = assert_one_line_error(capsys, run(train(places, a, *resume)), f"--output_dir {a} already holds another run's",
                                     "pytorch_lora_weights.safetensors", "checkpoint-3", "--overwrite_output_dir")
    assert str(b / "checkpoint-3") in line
    assert snapshot(a) == before

    ran = record_steps(monkeypatch)
    assert run(train(places, a, *resume, "--overwrite_output_dir")) == 0
    assert ran == [4, 5, 6]  # B's checkpoint was read
    assert sorted(p.name for p in a.glob("checkpoint-*")) == ["checkpoint-6"]  # X's checkpoint-3 is gone
    assert json.loads((a / "training_settings.json").read_text())["resolved"]["seed"] == 0  # the resumed run's
    ran.clear()
    assert run(train(places, a, "--resume_from_checkpoint", str(a / "checkpoint-6"), steps=7)) == 0  # inside: no flag
    assert ran == [7]


# ----------------------------------------------------------------------------- the logs of a replaced run


@pytest.mark.parametrize("logs_inside", [True, False])
def test_an_overwrite_clears_the_replaced_runs_logs_and_only_its_own(places, tmp_path, logs_inside):
    """The TensorBoard logs of a run replaced with --overwrite_output_dir go with its other results, so
    that its curves do not mix with the new run's; a logs folder outside the output folder is not touched."""
    out, elsewhere = tmp_path / "out", tmp_path / "my_logs"
    logs = ["--report_to", "tensorboard"] + ([] if logs_inside else ["--logging_dir", str(elsewhere)])
    assert run(train(places, out, *logs, steps=1)) == 0
    folder = out / "logs" if logs_inside else elsewhere
    old = sorted(p.relative_to(folder) for p in folder.rglob("events.out.tfevents.*"))
    assert old
    (folder / "sdxl-ambient" / "curves-of-the-old-run").write_text("old")
    assert run(train(places, out, *logs, "--overwrite_output_dir", steps=1)) == 0
    now = sorted(p.relative_to(folder) for p in folder.rglob("events.out.tfevents.*"))
    if logs_inside:
        assert not (folder / "sdxl-ambient" / "curves-of-the-old-run").exists()
        assert now and not set(old) & set(now)  # only the new run's curves
    else:
        assert (folder / "sdxl-ambient" / "curves-of-the-old-run").read_text() == "old" and set(old) < set(now)


# ----------------------------------------------------------------------------- make-tiny and push


@pytest.mark.parametrize("held", ["an earlier pipeline", "the user's files", "a file"])
def test_make_tiny_writes_only_into_a_new_or_empty_folder(capsys, tmp_path, held):
    """`make-tiny` into a folder that holds anything (even a pipeline it wrote) is one line and writes
    nothing; it never says "written" when it did not write."""
    out = tmp_path / "tiny"
    if held == "an earlier pipeline":
        assert main(["make-tiny", str(out), "--seed", "1"]) == 0
        assert "written to" in capsys.readouterr().out
    elif held == "the user's files":
        out.mkdir()
        (out / "model_index.json").write_text("{\"mine\": true}")
    else:
        out.write_text("a file")
    before = snapshot(tmp_path)
    assert_one_line_error(capsys, main(["make-tiny", str(out)]), f"make-tiny OUTPUT_DIR {out}", "new or empty folder")
    assert "written" not in capsys.readouterr().out
    assert snapshot(tmp_path) == before


def test_make_tiny_is_refused_while_another_command_holds_the_folder(capsys, tmp_path, holders):
    out = tmp_path / "tiny"
    holders.append(_hold_lock(out))
    assert_one_line_error(capsys, main(["make-tiny", str(out)]), f"{out} is in use by another run",
                          f"(PID {holders[-1].pid})")
    assert not (out / "model_index.json").exists()


def test_push_holds_the_folder_so_no_run_writes_there_meanwhile(monkeypatch, capsys, places, tmp_path, holders):
    """`push` takes the output folder's lock: refused while a run holds it (naming its PID), and while
    `push` uploads, a training run on the folder is refused."""
    import huggingface_hub

    out = tmp_path / "out"
    assert run(train(places, out, steps=1)) == 0
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    seen = []

    def upload(**kwargs):  # a training start while the upload runs
        seen.append(run(train(places, out, "--resume_from_checkpoint", "latest", steps=2)))
        seen.append(capsys.readouterr().err)

    monkeypatch.setattr(huggingface_hub, "HfApi", fake_hf_api(upload))
    holder = _hold_lock(out)
    holders.append(holder)
    assert_one_line_error(capsys, main(["push", "--output_dir", str(out), "--hub_model_id", "me/m"]),
                          f"--output_dir {out} is in use by another run (PID {holder.pid})")
    holder.kill()
    holder.wait()
    assert main(["push", "--output_dir", str(out), "--hub_model_id", "me/m"]) == 0
    assert seen[0] == 2 and "is in use by another run" in seen[1] and f"PID {os.getpid()}" in seen[1]
    assert not (out / LOCK_FILE).exists()
