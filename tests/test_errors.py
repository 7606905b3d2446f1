"""Checks before work, errors as one line: every input the trainer takes (each image and caption, the
model folder, the checkpoint to resume) is checked before any model loads and before anything is
written, so that a failed start can be rerun as it is; each expected error is one line naming the file
or flag, exit status 2, also under `accelerate launch`."""

import json
import shutil
import subprocess

import pytest

from helpers import DEMO_IMAGES, ROOT, assert_one_line_error
from helpers.training import cli_inprocess, launch_command, run_inprocess, snapshot, subprocess_env, tiny_args
from sdxl_ambient import checkpointing


@pytest.fixture
def no_models(monkeypatch):
    from sdxl_ambient import models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(models, "load_components", refuse)


def _rows(folder):
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def _write_rows(folder, rows):
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def _row_without_file_name(folder):
    rows = _rows(folder)
    rows[1] = {"text": rows[1]["text"]}
    _write_rows(folder, rows)
    return "metadata.jsonl, row 2: no 'file_name'"


def _row_not_an_object(folder):
    (folder / "metadata.jsonl").write_text((folder / "metadata.jsonl").read_text() + '["cat.png", "a cat"]\n')
    return f"metadata.jsonl, row {len(_rows(folder))}: expected an object"


def _broken_last_image(folder):
    rows = _rows(folder)
    last = folder / rows[-1]["file_name"]
    last.write_bytes(last.read_bytes()[:200])  # truncated: the last image read, so every image is read first
    return str(last)


def _empty_caption(folder):
    rows = _rows(folder)
    rows[-1]["text"] = " "
    _write_rows(folder, rows)
    return "have an empty caption"


def _no_unet_weights(folder, model):
    for weights in (model / "unet").glob("*.safetensors"):
        weights.unlink()
    return "--pretrained_model_name_or_path", "unet/ holds no safetensors weights"


@pytest.mark.parametrize("break_input", [_row_without_file_name, _row_not_an_object, _broken_last_image, _empty_caption,
                                         _no_unet_weights])
def test_a_bad_input_is_one_line_before_any_model_loads_and_the_fixed_start_runs_as_is(monkeypatch, capsys, tmp_path,
                                                                                        tiny_pipeline_dir, image_folder,
                                                                                        break_input):
    model, out = tmp_path / "model", tmp_path / "out"
    shutil.copytree(tiny_pipeline_dir, model)
    shutil.copytree(image_folder, tmp_path / "pristine")
    args = tiny_args(model, image_folder, out, steps=1)
    fragments = break_input(image_folder, model) if break_input is _no_unet_weights else (break_input(image_folder),)
    with monkeypatch.context() as patch:
        from sdxl_ambient import models

        patch.setattr(models, "load_components", lambda *a, **k: pytest.fail("a model loaded before the check"))
        assert_one_line_error(capsys, cli_inprocess(args), *fragments)
    assert not out.exists()  # nothing written: not the settings, not a lock, not the folder
    shutil.rmtree(image_folder)  # fixed, the very same command runs
    shutil.copytree(tmp_path / "pristine", image_folder)
    shutil.rmtree(model / "unet")
    shutil.copytree(tiny_pipeline_dir / "unet", model / "unet")
    assert cli_inprocess(args) == 0


def test_integer_flags_given_as_floats_in_yaml_are_one_line_before_any_model_loads(no_models, capsys, tmp_path,
                                                                                   tiny_pipeline_dir, image_folder):
    config = tmp_path / "run.yaml"
    for line in ("train_batch_size: 2.0", "max_train_steps: 100.0", "rank: 4.5"):
        config.write_text(line + "\n")
        assert_one_line_error(capsys, cli_inprocess(["--config", str(config), *tiny_args(tiny_pipeline_dir, image_folder,
                                                                                         tmp_path / "out")]),
                              f"--config {config}: {line.split(':')[0]}: ", "is not a valid int")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the sampling commands and corrupt


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a command starts loading a model: an SDXL pipeline or VAE, SDXL's parts, an embedder."""
    import diffusers

    from sdxl_ambient import models
    from sdxl_ambient.evaluation import features

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    for owner, name in ((diffusers.StableDiffusionXLPipeline, "from_pretrained"), (diffusers.AutoencoderKL, "from_pretrained"),
                        (models, "load_components"), (features, "DinoV2Embedder"), (features, "ClipImageEmbedder")):
        monkeypatch.setattr(owner, name, refuse)


def _model_without_weights(tmp_path, tiny_pipeline_dir, part="unet"):
    model = shutil.copytree(tiny_pipeline_dir, tmp_path / "broken" / "pipeline")
    for weights in (model / part).glob("*.safetensors"):
        weights.unlink()
    return model


def _generate(tmp_path, *extra):
    return ["generate", "--prompt", "a cat", "--resolution", "64", "--output_dir", str(tmp_path / "out"), *map(str, extra)]


def _memorization(images, tmp_path, *models):
    return ["memorization", "--train_data_dir", str(images), *[a for m in models for a in ("--model", m)],
            "--output_dir", str(tmp_path / "out")]


def _corrupt(model, images, tmp_path):
    return ["corrupt", "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(images), "--ambient_timestep",
            "100", "--resolution", "64", "--output_dir", str(tmp_path / "out"), "--device", "cpu"]


def _generate_without_unet_weights(tmp_path, model, images):
    broken = _model_without_weights(tmp_path, model)
    return (_generate(tmp_path, "--pretrained_model_name_or_path", broken),
            [f"--pretrained_model_name_or_path {broken}: unet/ holds no safetensors weights"])


def _generate_without_its_lora(tmp_path, model, images):
    return (_generate(tmp_path, "--pretrained_model_name_or_path", model, "--lora_path", tmp_path / "gone"),
            [f"--lora_path {tmp_path / 'gone'}: no such file or folder"])


def _memorization_second_model_without_unet_weights(tmp_path, model, images):
    broken = _model_without_weights(tmp_path, model)  # checked before the first model is measured
    return (_memorization(images, tmp_path, f"base={model}", f"tuned={broken}"),
            [f"--model {broken}: unet/ holds no safetensors weights"])


def _memorization_second_lora_missing(tmp_path, model, images):
    return (_memorization(images, tmp_path, f"base={model}", f"tuned={model}:{tmp_path / 'gone'}"),
            [f"--model {tmp_path / 'gone'}: no such file or folder"])


def _memorization_row_without_file_name(tmp_path, model, images):
    return _memorization(images, tmp_path, f"base={model}"), [_row_without_file_name(images)]


def _memorization_row_not_an_object(tmp_path, model, images):
    return _memorization(images, tmp_path, f"base={model}"), [_row_not_an_object(images)]


def _corrupt_without_vae_weights(tmp_path, model, images):
    broken = _model_without_weights(tmp_path, model, "vae")
    return _corrupt(broken, images, tmp_path), [f"--pretrained_model_name_or_path {broken}: vae/ holds no safetensors weights"]


def _corrupt_row_without_file_name(tmp_path, model, images):
    return _corrupt(model, images, tmp_path), [_row_without_file_name(images)]


def _corrupt_row_not_an_object(tmp_path, model, images):
    return _corrupt(model, images, tmp_path), [_row_not_an_object(images)]


@pytest.mark.parametrize("case", [_generate_without_unet_weights, _generate_without_its_lora,
                                  _memorization_second_model_without_unet_weights, _memorization_second_lora_missing,
                                  _memorization_row_without_file_name, _memorization_row_not_an_object,
                                  _corrupt_without_vae_weights, _corrupt_row_without_file_name, _corrupt_row_not_an_object])
def test_generate_memorization_and_corrupt_check_their_inputs_before_any_model_loads(no_loading, capsys, tmp_path,
                                                                                     tiny_pipeline_dir, image_folder, case):
    """The issue's examples (a model folder without weights, a bad metadata row) in the other commands that load
    models: one line naming the flag or file, exit status 2, before any model loads (in `memorization`, before
    the first model's report), and no output folder left behind."""
    from sdxl_ambient.cli import main

    argv, fragments = case(tmp_path, tiny_pipeline_dir, image_folder)
    assert_one_line_error(capsys, main(argv), *fragments)
    assert not (tmp_path / "out").exists()


def test_corrupt_into_a_dataset_of_other_settings_is_refused_before_any_model_loads(monkeypatch, capsys, tmp_path,
                                                                                    tiny_pipeline_dir, image_folder):
    """`corrupt` completes only its own dataset: one made with other settings in --output_dir is refused, naming the
    setting, before the model loads (today: once it is loaded)."""
    from sdxl_ambient import models
    from sdxl_ambient.cli import main

    assert main(_corrupt(tiny_pipeline_dir, image_folder, tmp_path)) == 0
    before = snapshot(tmp_path / "out")
    monkeypatch.setattr(models, "load_components", lambda *a, **k: pytest.fail("a model loaded before the check"))
    assert_one_line_error(capsys, main([*_corrupt(tiny_pipeline_dir, image_folder, tmp_path), "--resolution", "128"]),
                          f"the latent cache in {tmp_path / 'out'} was made with other settings",
                          "resolution: cache has 64, now 128")
    assert snapshot(tmp_path / "out") == before


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_pipeline_dir):
    out = tmp_path_factory.mktemp("finished") / "out"
    assert run_inprocess(tiny_args(tiny_pipeline_dir, DEMO_IMAGES, out, steps=6)) == 0
    return out


def _other_images(tmp_path, other_model):
    folder = shutil.copytree(DEMO_IMAGES, tmp_path / "images")
    image = sorted(folder.glob("*.jpg"))[0]
    from PIL import Image

    Image.open(image).rotate(90).save(image)
    return ["--train_data_dir", folder], f"{image.name}: content"


@pytest.mark.parametrize("change", [
    lambda tmp, other: (["--resolution", "128"], "resolution: cache has 64, now 128"),
    lambda tmp, other: (["--center_crop"], "center_crop: cache has False, now True"),
    _other_images,
    lambda tmp, other: (["--pretrained_model_name_or_path", other], "model_id: cache has 'pipeline (files sha256 "),
], ids=["resolution", "center_crop", "images", "model_of_the_same_folder_name"])
def test_a_new_run_on_a_cache_of_other_settings_or_data_is_refused_before_any_model_loads(
        no_models, capsys, finished, tmp_path, tiny_pipeline_dir, other_pipeline_dir, change):
    """A fresh run given a --cache_dir that holds a cache made with other settings, images or model is refused in
    one line naming what differs, before any model loads (today: only once the models are loaded), writing nothing."""
    cache = shutil.copytree(finished / "latent_cache", tmp_path / "cache")
    extra, fragment = change(tmp_path, other_pipeline_dir)
    before = snapshot(cache)
    assert_one_line_error(capsys, cli_inprocess(tiny_args(tiny_pipeline_dir, DEMO_IMAGES, tmp_path / "out", "--cache_dir",
                                                          cache, *extra)),
                          f"the latent cache in {cache} was made with other", fragment, "Use another --cache_dir")
    assert snapshot(cache) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage, fragment", [
    (lambda c: c / "optimizer.bin", "optimizer.bin is truncated or damaged"),
    (lambda c: c / "pytorch_lora_weights.safetensors", "pytorch_lora_weights.safetensors is truncated or damaged"),
    (lambda c: c / "rng-0.safetensors", "rng-0.safetensors is truncated or damaged"),
    (lambda c: c / checkpointing.STATE_FILE, f"{checkpointing.STATE_FILE} is damaged"),
])
def test_a_truncated_checkpoint_file_is_named_before_any_model_loads(no_models, capsys, finished, tmp_path,
                                                                     tiny_pipeline_dir, damage, fragment):
    out = shutil.copytree(finished, tmp_path / "out")
    file = damage(out / "checkpoint-6")
    file.write_bytes(file.read_bytes()[: len(file.read_bytes()) // 2])
    before = snapshot(out)
    line = assert_one_line_error(capsys, cli_inprocess(tiny_args(tiny_pipeline_dir, DEMO_IMAGES, out, "--resume_from_checkpoint",
                                                                 "latest")), str(file.parent), fragment)
    assert "--resume_from_checkpoint checkpoint-3" in line  # the way out: the checkpoint before it
    assert snapshot(out) == before


def test_a_damaged_checkpoint_of_the_same_size_is_one_line_naming_it(capsys, finished, tmp_path, tiny_pipeline_dir):
    out = shutil.copytree(finished, tmp_path / "out")
    optimizer = out / "checkpoint-6" / "optimizer.bin"
    optimizer.write_bytes(bytes(len(optimizer.read_bytes())))  # zeros: the size matches, the content is gone
    assert_one_line_error(capsys, cli_inprocess(tiny_args(tiny_pipeline_dir, DEMO_IMAGES, out, "--resume_from_checkpoint",
                                                          "latest")),
                          f"{out / 'checkpoint-6'} cannot be loaded into this run", "checkpoint-3")


def test_a_checkpoint_without_a_fingerprint_and_another_rank_is_one_line(capsys, caplog, finished, tmp_path,
                                                                        tiny_pipeline_dir):
    """A checkpoint of an older version records no fingerprint: it is compared as far as it can be, and
    weights of another shape are one line naming it (today: a size-mismatch traceback)."""
    out = shutil.copytree(finished, tmp_path / "out")
    state_file = out / "checkpoint-6" / checkpointing.STATE_FILE
    state = json.loads(state_file.read_text())
    del state["fingerprint"]
    state_file.write_text(json.dumps(state))
    assert_one_line_error(capsys, cli_inprocess(tiny_args(tiny_pipeline_dir, DEMO_IMAGES, out, "--resume_from_checkpoint",
                                                          "latest", "--rank", "8")),
                          f"{out / 'checkpoint-6'} cannot be loaded into this run")
    assert "records no run fingerprint" in caplog.text


# ----------------------------------------------------------------------------- under accelerate launch


@pytest.mark.slow  # subprocess / accelerate launch, or seconds of training
def test_under_accelerate_launch_quiet_the_error_is_one_line(tmp_path, tiny_pipeline_dir, image_folder):
    """accelerate's launcher adds its own traceback after a failed training process unless --quiet:
    with it, the user's whole output is the one line."""
    args = tiny_args(tiny_pipeline_dir, image_folder, tmp_path / "out", "--resolution", "63")
    command = launch_command(args)
    command.insert(command.index("--num_machines"), "--quiet")
    proc = subprocess.run(command, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and lines == ["error: --resolution 63 must be a positive multiple of 8 (the VAE "
                                              "downsamples by 8)"], proc.stderr


@pytest.mark.slow  # subprocess / accelerate launch, or seconds of training
def test_under_accelerate_launch_with_two_processes_the_summary_names_the_error(tmp_path, tiny_pipeline_dir, image_folder):
    """With several processes torch's launcher prints a failure summary: its root cause is our line (not
    "To enable traceback see ..."); the main process prints the line once, the others exit quietly."""
    _row_without_file_name(image_folder)
    args = tiny_args(tiny_pipeline_dir, image_folder, tmp_path / "out")
    command = launch_command(args, num_processes=2)
    command.insert(command.index("--num_machines"), "--quiet")
    proc = subprocess.run(command, cwd=ROOT, env=subprocess_env(ACCELERATE_USE_CPU="true"), capture_output=True, text=True,
                          timeout=300)
    cause = proc.stderr.split("Root Cause (first observed failure):")[1]
    assert "traceback : error: " in cause and "row 2: no 'file_name'" in cause, proc.stderr
    assert "Traceback (most recent call last)" not in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.startswith("error: ")]) == 1  # the main process's
    assert not (tmp_path / "out").exists()
