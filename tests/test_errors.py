"""Checks before work, errors as one line: every input the trainer takes (each image and caption, the
model folder, the checkpoint to resume) is checked before any model loads and before anything is
written, so that a failed start can be rerun as it is; each expected error is one line naming the file
or flag, exit status 2, also under `accelerate launch`."""

import json
import shutil
import subprocess
from pathlib import Path

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


# ----------------------------------------------------------------------------- one line in every command


def test_a_user_error_is_always_one_line():
    """A library's message quoted in an error (a Hub error spans several lines) is folded into one line."""
    from sdxl_ambient.errors import UserError, exit_code_of

    assert str(UserError("--pretrained_model_name_or_path x: cannot read it (OSError: first\n  second\r\nthird)")) == \
        "--pretrained_model_name_or_path x: cannot read it (OSError: first second third)"

    def fails():
        raise UserError("a\n\nb")

    assert exit_code_of(fails) == 2


@pytest.fixture(scope="module")
def other_loras(tmp_path_factory):
    """LoRA folders: a truncated file of the tiny model's LoRA, a LoRA of a model of another shape, and one
    whose keys name layers no SDXL model has."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from sdxl_ambient import models
    from sdxl_ambient.tiny import save_tiny_dinov2, tiny_unet_config

    root = tmp_path_factory.mktemp("loras")
    unet = UNet2DConditionModel(**tiny_unet_config())
    models.add_unet_lora(unet, rank=4)
    models.save_lora(root / "good", unet)
    (root / "truncated").mkdir()
    whole = (root / "good" / "pytorch_lora_weights.safetensors").read_bytes()
    (root / "truncated" / "pytorch_lora_weights.safetensors").write_bytes(whole[: len(whole) // 2])
    other = UNet2DConditionModel(**{**tiny_unet_config(), "block_out_channels": (16, 32)})
    models.add_unet_lora(other, rank=4)
    models.save_lora(root / "other_model", other)
    (root / "foreign").mkdir()
    save_file({"unet.no_such_block.to_q.lora_A.weight": torch.zeros(4, 8),
               "unet.no_such_block.to_q.lora_B.weight": torch.zeros(8, 4)},
              str(root / "foreign" / "pytorch_lora_weights.safetensors"))
    save_tiny_dinov2(root / "dinov2")
    return root


@pytest.mark.parametrize("lora, fragment, before_loading", [
    ("truncated", "cannot be read (SafetensorError", True),
    ("other_model", "does not fit the model", False),
    ("foreign", "give a LoRA trained on this base model", False),
])
def test_a_damaged_lora_or_one_of_another_model_is_one_line_naming_it(monkeypatch, capsys, tmp_path,
                                                                      tiny_pipeline_dir, other_loras, lora, fragment,
                                                                      before_loading):
    import logging

    from diffusers import StableDiffusionXLPipeline

    from sdxl_ambient.cli import main

    logged = []

    class Recorder(logging.Handler):
        def emit(self, record):
            logged.append(record.getMessage())

    recorder = Recorder(logging.WARNING)
    logging.getLogger("diffusers").addHandler(recorder)  # diffusers prints its own loggers' records: none here
    file = other_loras / lora / "pytorch_lora_weights.safetensors"
    if before_loading:
        monkeypatch.setattr(StableDiffusionXLPipeline, "from_pretrained",
                            lambda *a, **k: pytest.fail("the model loaded before the LoRA file was read"))
    assert_one_line_error(capsys, main(["generate", "--pretrained_model_name_or_path", str(tiny_pipeline_dir),
                                        "--lora_path", str(other_loras / lora), "--prompt", "a cat", "--resolution", "64",
                                        "--num_inference_steps", "2", "--output_dir", str(tmp_path / "gen")]),
                          f"--lora_path {file}", fragment)
    assert not (tmp_path / "gen").exists()
    assert_one_line_error(capsys, main(["memorization", "--train_data_dir", str(DEMO_IMAGES), "--model",
                                        f"m={tiny_pipeline_dir}:{other_loras / lora}", "--embedder",
                                        str(other_loras / "dinov2"), "--num_images", "1", "--num_attack_images", "0",
                                        "--resolution", "64", "--num_inference_steps", "2", "--device", "cpu",
                                        "--output_dir", str(tmp_path / "mem")]),
                          f"--model m {file}", fragment)
    logging.getLogger("diffusers").removeHandler(recorder)
    assert not [m for m in logged if "unsuccessful" in m or "size mismatch" in m], logged[:1]


def test_the_demo_names_a_damaged_lora_in_one_line(monkeypatch, capsys, tmp_path, other_loras):
    from sdxl_ambient import train
    from sdxl_ambient.cli import main

    def trained_a_truncated_lora(argv):
        lora = Path(argv[argv.index("--output_dir") + 1])
        lora.mkdir(parents=True)
        shutil.copy(other_loras / "truncated" / "pytorch_lora_weights.safetensors", lora)
        return 0

    monkeypatch.setattr(train, "main", trained_a_truncated_lora)
    assert_one_line_error(capsys, main(["demo", "--output_dir", str(tmp_path / "demo")]),
                          f"{tmp_path / 'demo' / 'lora' / 'pytorch_lora_weights.safetensors'} cannot be read")


def _without_images(args):
    i = args.index("--train_data_dir")
    return args[:i] + args[i + 2:]


@pytest.mark.parametrize("name", ["no-such-user/no-such-dataset", "typo_dataset", "a b c"])
def test_a_dataset_that_cannot_be_loaded_is_one_line_naming_the_flag(no_models, capsys, tmp_path, tiny_pipeline_dir,
                                                                     name):
    """Offline (as in every test), a Hub dataset id or a typo: one line naming --dataset_name, before any model loads."""
    from sdxl_ambient.cli import main

    out = tmp_path / "out"
    args = _without_images(tiny_args(tiny_pipeline_dir, DEMO_IMAGES, out)) + ["--dataset_name", name]
    assert_one_line_error(capsys, cli_inprocess(args), f"--dataset_name {name} cannot be loaded")
    assert not out.exists()
    assert_one_line_error(capsys, main(["memorization", "--dataset_name", name, "--model", f"m={tiny_pipeline_dir}",
                                        "--output_dir", str(tmp_path / "mem")]), f"--dataset_name {name} cannot be loaded")


def test_an_invalid_hub_repo_id_is_one_line_naming_the_flag_before_any_model_loads(no_models, monkeypatch, capsys,
                                                                                   tmp_path, tiny_pipeline_dir):
    """--push_to_hub pushes to --hub_model_id, by default the output folder's name: a folder such as
    "my run (v2)" is no repo id. One line naming --hub_model_id, at the start; and in `push`."""
    from sdxl_ambient.cli import main

    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    out = tmp_path / "my run (v2)"
    assert_one_line_error(capsys, cli_inprocess(tiny_args(tiny_pipeline_dir, DEMO_IMAGES, out, "--push_to_hub")),
                          "--hub_model_id 'my run (v2)' is not a valid Hub repo id")
    assert not out.exists()
    assert_one_line_error(capsys, cli_inprocess(tiny_args(tiny_pipeline_dir, DEMO_IMAGES, tmp_path / "o", "--push_to_hub",
                                                          "--hub_model_id", "me/bad name")),
                          "--hub_model_id 'me/bad name' is not a valid Hub repo id")
    out.mkdir()
    (out / "pytorch_lora_weights.safetensors").write_bytes(b"weights")
    assert_one_line_error(capsys, main(["push", "--output_dir", str(out)]),
                          "--hub_model_id 'my run (v2)' is not a valid Hub repo id")


def test_a_damaged_settings_file_is_one_line_naming_it(capsys, tmp_path, tiny_pipeline_dir, other_loras):
    """training_settings.json, read by `push` (the repo) and by generate (the trained t_n), through one reader."""
    from sdxl_ambient.cli import main

    out = shutil.copytree(other_loras / "good", tmp_path / "run")
    for damaged in ('{"resolved": {"ambient_timestep": 1', "[1, 2]"):
        (out / "training_settings.json").write_text(damaged)
        assert_one_line_error(capsys, main(["push", "--output_dir", str(out)]), str(out / "training_settings.json"))
        assert_one_line_error(capsys, main(["generate", "--pretrained_model_name_or_path", str(tiny_pipeline_dir),
                                            "--lora_path", str(out), "--prompt", "a cat", "--output_dir",
                                            str(tmp_path / "gen")]), str(out / "training_settings.json"))


def test_a_hub_model_that_cannot_be_read_is_one_line(no_models, capsys, tmp_path):
    """Offline, a Hub id: the libraries' messages span several lines; the error is still one line, in
    the trainer's check of the model and in generate's loading."""
    from sdxl_ambient.cli import main

    assert_one_line_error(capsys, cli_inprocess(tiny_args("no-one/no-such-model", DEMO_IMAGES, tmp_path / "out")),
                          "--pretrained_model_name_or_path no-one/no-such-model: cannot read model_index.json")
    assert_one_line_error(capsys, main(["generate", "--pretrained_model_name_or_path", "no-one/no-such-model", "--prompt",
                                        "a cat", "--output_dir", str(tmp_path / "gen")]),
                          "--pretrained_model_name_or_path no-one/no-such-model: cannot read model_index.json")
