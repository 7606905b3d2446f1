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


@pytest.mark.parametrize("extra, fragment", [
    (["--noise_offset", "0.05"], "--noise_offset 0.05 is refused: offset noise"),
    (["--snr_gamma", "5"], "--snr_gamma 5.0 is refused: the ambient loss sets its own weight per timestep"),
    (["--min_snr_gamma", "5"], "--snr_gamma 5.0 is refused"),  # kohya's spelling
    (["--input_perturbation", "0.1"], "--input_perturbation 0.1 is refused: input perturbation"),
    (["--ip_noise_gamma", "0.1"], "--input_perturbation 0.1 is refused"),  # kohya's spelling
])
def test_flags_that_contradict_the_ambient_math_are_refused_before_any_model_loads(tmp_path, capsys, no_models, extra, fragment):
    from sdxl_ambient.train import cli

    line = assert_one_line_error(capsys, cli([*required(tmp_path), *extra]), fragment)
    assert "isotropic" in line or "replaces min-SNR" in line
    key = {"--min_snr_gamma": "snr_gamma", "--ip_noise_gamma": "input_perturbation"}.get(extra[0], extra[0][2:])
    path = write_yaml(tmp_path, f"{key}: {extra[1]}\n")
    assert_one_line_error(capsys, cli(["--config", str(path), *required(tmp_path)]), fragment.split(":")[0])
    assert not (tmp_path / "out").exists()


def test_the_off_values_of_refused_flags_are_accepted(tmp_path):
    """diffusers' defaults (noise_offset 0, input_perturbation 0) switch the tricks off: a config copied from
    diffusers that spells them out still runs."""
    path = write_yaml(tmp_path, "noise_offset: 0\ninput_perturbation: 0.0\nsnr_gamma: null\n")
    args = config.parse_args(["--config", str(path), *required(tmp_path)])
    assert args.noise_offset == 0 and args.snr_gamma is None


def test_data_sources_inline_in_yaml_or_in_a_file(tmp_path):
    """--data_sources: the list inline in a --config file, or a YAML/JSON file on the command line; each entry's
    keys over the flags' values; a source on the command line replaces the file's."""
    entries = [{"name": "clean", "train_data_dir": "a", "ambient_timestep": 0, "repeats": 3},
               {"train_data_dir": "b", "ambient_timestep": 500, "caption_column": "prompt"}]
    base = ["--pretrained_model_name_or_path", "m", "--output_dir", str(tmp_path / "out")]
    inline = write_yaml(tmp_path, json.dumps({"data_sources": entries, "caption_column": "text"}))  # JSON is YAML
    listed = tmp_path / "sources.json"
    listed.write_text(json.dumps(entries))
    for argv in (["--config", str(inline), *base], ["--data_sources", str(listed), *base]):
        sources = config.load_train_config(argv).sources
        assert [(s.label, s.train_data_dir, s.ambient_timestep, s.repeats, s.caption_column) for s in sources] == [
            ("clean", "a", 0, 3, "text"), ("b", "b", 500, 1, "prompt")]
    (only,) = config.load_train_config(["--config", str(inline), *base, "--train_data_dir", "c"]).sources
    assert only.train_data_dir == "c" and only.ambient_timestep is None


@pytest.mark.parametrize("entries, fragment", [
    ([], "expected a list of data sources"),
    (["a"], "source 1 is a str"),
    ([{"train_data_dir": "a", "repeat": 2}], "source 1: unknown keys ['repeat']"),
    ([{"train_data_dir": "a", "repeats": "2"}], "source 1: repeats '2' is not a valid int"),
    ([{"train_data_dir": "a", "repeats": 0}], "source 1: repeats 0 of a must be >= 1"),
    ([{"ambient_timestep": 5}], "source 1: give --dataset_name or --train_data_dir"),
    ([{"train_data_dir": "a"}, {"train_data_dir": "x/a"}], "both named 'a'"),
    ([{"train_data_dir": "a", "ambient_timestep": 1000}], "source 1: a: ambient_timestep 1000 must be in [0, 1000)"),
])
def test_bad_data_sources_name_the_source_before_any_model_loads(tmp_path, capsys, no_models, entries, fragment):
    from sdxl_ambient.train import cli

    path = write_yaml(tmp_path, json.dumps({"data_sources": entries}))
    status = cli(["--config", str(path), "--pretrained_model_name_or_path", "m", "--output_dir", str(tmp_path / "out")])
    assert_one_line_error(capsys, status, fragment)
    assert not (tmp_path / "out").exists()


def test_data_sources_and_a_single_source_flag_contradict(tmp_path, no_models):
    listed = tmp_path / "sources.yaml"
    listed.write_text("- train_data_dir: a\n")
    with pytest.raises(UserError, match="--data_sources lists every source"):
        config.load_train_config(["--pretrained_model_name_or_path", "m", "--data_sources", str(listed), "--train_data_dir", "b"])


def test_consistency_with_a_clean_source_and_a_dataset_of_unknown_level_is_not_refused_early(tmp_path, no_models):
    """A clean source beside a noisy-latent dataset whose t_n is read from it later: the consistency term is
    refused only once the levels are known (after the data is read), not from the clean source alone."""
    path = write_yaml(tmp_path, json.dumps({"consistency_weight": 1.0, "data_sources": [
        {"train_data_dir": "clean", "ambient_timestep": 0}, {"train_data_dir": "noisy_dataset"}]}))
    cfg = config.load_train_config(["--config", str(path), "--pretrained_model_name_or_path", "m"])
    assert [s.ambient_timestep for s in cfg.sources] == [0, None]
