"""benchmarks/step_benchmark.py: the same code as the GPU run, on the tiny UNet on the CPU."""

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_benchmark.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("step_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["step_benchmark"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("step_benchmark", None)


@pytest.mark.slow  # subprocess / accelerate launch, or seconds of training
def test_tiny_run_times_every_case_and_prints_the_table(bench, tmp_path, capsys):
    out = tmp_path / "results.json"
    assert bench.main(["--tiny", "--steps", "2", "--warmup", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())

    rows = {(r["mode"], r["batch_size"], r["case"]): r for r in report["results"]}
    assert set(rows) == {(m, b, c) for m in bench.MODES for b in (1, 8) for c in bench.CASES}
    for key, row in rows.items():
        assert row["status"] == "ok"
        # batch 1 at the default fraction 0.25: the term on one step in four, timed over a whole period, mean
        scheduled = key[1] == 1 and key[2] == "ambient+consistency"
        assert len(row["step_times_s"]) == (4 if scheduled else 2) and min(row["step_times_s"]) > 0
        assert row["step_time_s"] == pytest.approx((statistics.fmean if scheduled else statistics.median)(row["step_times_s"]))
        assert row["images_per_s"] == pytest.approx(row["batch_size"] / row["step_time_s"])
        assert row["flops_per_step"] > 0
        assert row["mfu"] is None and row["peak_memory_gib"] is None  # CPU: no device peak
    # LoRA trains a small part of the UNet, full fine-tuning all of it
    assert 0 < rows[("lora", 1, "ambient")]["trainable_params"] < rows[("full", 1, "ambient")]["trainable_params"]
    # same network work in the plain and ambient losses; consistency on a quarter of the batch (k = 2 of 8) adds
    # 2k samples forward and backward (the two chains' final predictions) and a k-sample anchor forward without
    # gradients; at batch 1 it runs on one step in four, the same cost on average
    for mode in bench.MODES:
        plain, ambient, cons = (rows[(mode, 8, c)]["flops_per_step"] for c in ("plain-loss", "ambient", "ambient+consistency"))
        assert plain == ambient == rows[(mode, 8, "baseline")]["flops_per_step"]
        assert 1.5 * ambient < cons < 1.7 * ambient
        one = rows[(mode, 1, "ambient+consistency")]["flops_per_step"] / rows[(mode, 1, "ambient")]["flops_per_step"]
        assert one == pytest.approx(cons / ambient, rel=0.05)
        assert rows[(mode, 8, "ambient")]["flops_per_step"] > rows[(mode, 1, "ambient")]["flops_per_step"]

    ratio = report["ratios"]["lora/b1"]
    assert ratio["ambient_speedup_vs_baseline"] == pytest.approx(
        rows[("lora", 1, "baseline")]["step_time_s"] / rows[("lora", 1, "ambient")]["step_time_s"])
    time = {case: rows[("lora", 1, case)]["step_time_s"] for case in bench.CASES}
    assert ratio["consistency_vs_ambient"] == pytest.approx(time["ambient+consistency"] / time["ambient"])
    assert ratio["ambient_overhead_vs_plain_loss"] == pytest.approx(time["ambient"] / time["plain-loss"] - 1)
    assert len(report["targets"]) == 5
    assert report["environment"]["torch"] == torch.__version__ and report["environment"]["model"] == "tiny"

    printed = capsys.readouterr().out
    assert "| mode | batch | case | step time (ms)" in printed
    assert printed.count("| lora |") == 8 and printed.count("| full |") == 8
    assert "| ambient LoRA at batch 1: peak memory <= 8 GiB | n/a | not measured |" in printed


def test_out_of_memory_is_recorded_and_the_run_goes_on(bench, tmp_path, capsys, monkeypatch):
    measure = bench.measure_case

    def ooms_on_ambient(spec, mode, batch_size, case, *rest):
        if case == "ambient":
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return measure(spec, mode, batch_size, case, *rest)

    monkeypatch.setattr(bench, "measure_case", ooms_on_ambient)
    out = tmp_path / "results.json"
    bench.main(["--tiny", "--steps", "1", "--warmup", "0", "--modes", "lora", "--batch_sizes", "1",
                "--cases", "baseline", "ambient", "ambient+consistency", "--out", str(out)])
    report = json.loads(out.read_text())

    status = {r["case"]: r["status"] for r in report["results"]}
    assert status == {"baseline": "ok", "ambient": "OOM", "ambient+consistency": "ok"}
    assert report["ratios"]["lora/b1"] == {"ambient_speedup_vs_baseline": None,
                                           "ambient_overhead_vs_plain_loss": None, "consistency_vs_ambient": None}
    assert all(t["met"] is None for t in report["targets"])
    assert "| lora | 1 | ambient | OOM |" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    ([], "--config PATH"),
    (["--tiny", "--steps", "0"], "--steps must be >= 1"),
    (["--tiny", "--ambient_timestep", "0"], "--ambient_timestep"),
])
def test_bad_flags_are_named(bench, argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert message in capsys.readouterr().err


def test_config_file_errors_name_the_file(bench, tmp_path):
    with pytest.raises(FileNotFoundError, match="--config .*missing.json"):
        bench.load_spec(str(tmp_path / "missing.json"))
    bad = tmp_path / "vae.json"
    bad.write_text(json.dumps({"latent_channels": 4}))
    with pytest.raises(ValueError, match="vae.json: not an SDXL UNet config"):
        bench.load_spec(str(bad))


def test_sdxl_base_config_gives_the_real_size_shapes(bench, tmp_path):
    """The conditioning shapes follow from SDXL-base's public UNet config (values as in its config.json)."""
    unet = {"in_channels": 4, "sample_size": 128, "cross_attention_dim": 2048,
            "projection_class_embeddings_input_dim": 2816, "addition_time_embed_dim": 256}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(unet))
    spec = bench.load_spec(str(path))
    assert (spec.latent_shape, spec.text_shape, spec.pooled_dim, spec.image_size) == ((4, 128, 128), (77, 2048), 1280, 1024)
    assert spec.scheduler_config["num_train_timesteps"] == 1000
