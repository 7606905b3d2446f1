"""Flags and YAML configs: a YAML value passes exactly the checks of the same value on the command
line, every error names the file and key (or the flag) before any model loads, and resolved values
are computed once and saved as such."""

import json
import re

import pytest

from helpers import assert_one_line_error
from sdxl_ambient import config
from sdxl_ambient.errors import UserError


@pytest.fixture
def no_models(monkeypatch):
    """Fail the test if anything loads a model: flag errors must come first."""
    from sdxl_ambient import models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the flags were checked")

    monkeypatch.setattr(models, "load_components", refuse)


def required(tmp_path) -> list[str]:
    return ["--pretrained_model_name_or_path", str(tmp_path / "model"), "--train_data_dir", str(tmp_path / "images"),
            "--output_dir", str(tmp_path / "out")]


def write_yaml(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("line, fragment", [
    ("finetune: ful", "'ful' is not one of lora, full"),
    ("loss_weighting: epsilonn", "'epsilonn' is not one of epsilon, observation"),
    ("lr_scheduler: cosin", "'cosin' is not one of"),
    ("mixed_precision: no", 'write it in quotes ("no")'),
    ('random_flip: "false"', "expected true or false"),
    ('center_crop: "false"', "expected true or false"),
    ("ambient_timestep: 99.5", "99.5 is not a valid int"),
    ("train_batch_size: 1.5", "1.5 is not a valid int"),
    ("max_train_steps: 100.0", "100.0 is not a valid int"),
    ("learning_rate: fast", "'fast' is not a valid float"),
    ("resolution: [512, 512]", "expected one value"),
])
def test_a_bad_yaml_value_names_the_file_and_key_before_any_model_loads(tmp_path, no_models, line, fragment):
    from sdxl_ambient.train import main

    path = write_yaml(tmp_path, line + "\n")
    key = line.split(":")[0]
    with pytest.raises(UserError) as err:
        main(["--config", str(path), *required(tmp_path)])
    assert f"--config {path}: {key}: " in str(err.value) and fragment in str(err.value)
    assert not (tmp_path / "out").exists()  # a failed start writes nothing


@pytest.mark.parametrize("line, flag, command_line", [
    ("finetune: ful", "finetune", ["--finetune", "ful"]),
    ("ambient_timestep: 99.5", "ambient_timestep", ["--ambient_timestep", "99.5"]),
    ("train_batch_size: 1.5", "train_batch_size", ["--train_batch_size", "1.5"]),
])
def test_yaml_and_command_line_refuse_the_same_values(tmp_path, line, flag, command_line):
    with pytest.raises(UserError, match=re.escape(flag)):
        config.parse_args(["--config", str(write_yaml(tmp_path, line + "\n")), *required(tmp_path)])
    with pytest.raises(UserError, match=re.escape(flag)):
        config.parse_args([*required(tmp_path), *command_line])


def test_yaml_values_arrive_with_the_flags_types_and_the_command_line_wins(tmp_path):
    path = write_yaml(tmp_path, "mixed_precision: \"no\"\nrandom_flip: true\nambient_timestep: 100\nlearning_rate: 1.0e-4\n"
                                "pretrained_vae_model_name_or_path: null\nrank: 8\n")
    args = config.parse_args(["--config", str(path), *required(tmp_path), "--rank", "16"])
    assert args.mixed_precision == "no" and args.random_flip is True and args.ambient_timestep == 100
    assert args.learning_rate == pytest.approx(1e-4) and args.pretrained_vae_model_name_or_path is None
    assert args.rank == 16 and type(args.ambient_timestep) is int


def test_a_bad_flag_is_one_line_and_exit_status_2(tmp_path, capsys, no_models):
    from sdxl_ambient.train import cli

    path = write_yaml(tmp_path, "train_batch_size: 1.5\n")
    assert_one_line_error(capsys, cli(["--config", str(path), *required(tmp_path)]), f"--config {path}: train_batch_size")
    assert_one_line_error(capsys, cli([*required(tmp_path), "--rank", "four"]), "--rank", "'four'")
    assert_one_line_error(capsys, cli([*required(tmp_path), "--loss_weight_cap", "0"]), "--loss_weight_cap 0")


@pytest.mark.parametrize("value", ["0", "-1", "0.5", "nan"])
def test_loss_weight_cap_below_one_is_refused(tmp_path, value, no_models):
    """0 used to become the default through `or`, and a negative cap turned the cap off."""
    from sdxl_ambient.train import main

    with pytest.raises(UserError, match=re.escape(f"--loss_weight_cap {float(value)} must be >= 1")):
        main([*required(tmp_path), "--loss_weight_cap", value])


def test_resolved_objective_fills_in_the_defaults_and_keeps_given_values():
    from sdxl_ambient.objectives import DEFAULT_WEIGHT_CAP
    from sdxl_ambient.step import ObjectiveSettings

    assert ObjectiveSettings().resolved(200)["loss_weight_cap"] == DEFAULT_WEIGHT_CAP
    assert ObjectiveSettings().resolved(200)["consistency_max_delta"] == 200
    given = ObjectiveSettings(weight_cap=1.0, consistency_max_delta=50).resolved(200)
    assert given["loss_weight_cap"] == 1.0 and given["consistency_max_delta"] == 50


def test_config_file_errors_name_the_file(tmp_path, no_models):
    from sdxl_ambient.train import main

    for text, fragment in (("a: [", "not valid YAML"), ("- 1\n- 2\n", "expected a mapping")):
        path = write_yaml(tmp_path, text)
        with pytest.raises(UserError, match=re.escape(f"--config {path}: {fragment}")):
            main(["--config", str(path), *required(tmp_path)])
    with pytest.raises(UserError, match="--config .*missing.yaml: no such file"):
        main(["--config", str(tmp_path / "missing.yaml"), *required(tmp_path)])


def test_corrupt_shares_the_training_flags():
    """corrupt defines none of the model, data and noise flags itself: one definition each."""
    import argparse

    from sdxl_ambient import corrupt

    parser = argparse.ArgumentParser()
    corrupt.add_arguments(parser)
    train_flags = {a.dest: a for a in config.build_parser()._actions}
    shared = [a for a in parser._actions if a.dest in train_flags and a.dest not in ("help", "output_dir")]
    assert len(shared) >= 19
    for action in shared:
        twin = train_flags[action.dest]
        assert (action.type, action.choices, action.nargs) == (twin.type, twin.choices, twin.nargs), action.dest
    assert "seed" not in {a.dest for a in parser._actions}  # the noise seed is --noise_seed, a secret


def test_settings_record_holds_the_flags_and_the_resolved_values_but_no_secret(tmp_path):
    from sdxl_ambient import hub

    args = config.parse_args([*required(tmp_path), "--noise_seed", "s3cr3t", "--scale_lr"])
    record = hub.public_settings({**vars(args), "resolved": {"seed": 5, "learning_rate": 2e-4}})
    text = json.dumps(record)
    assert "s3cr3t" not in text and "noise_seed" not in text
    assert record["learning_rate"] == pytest.approx(1e-4) and record["resolved"]["learning_rate"] == pytest.approx(2e-4)
