"""The GPU run's parts rehearsed on the CPU: the compiled cases of step_benchmark.py, the peak-memory
wrapper around a script, and gpu_run.py's bookkeeping (a part skipped with its reason)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def bench():
    yield _load("step_benchmark")
    sys.modules.pop("step_benchmark", None)


@pytest.mark.slow
def test_step_benchmark_compiled_cases(bench, tmp_path, capsys):
    """--compile compiles the UNet's blocks in the project's cases (not the eager baseline); their FLOPs
    are not counted (compiled graphs bypass the counter) and the table says n/a."""
    out = tmp_path / "results.json"
    bench.main(["--tiny", "--compile", "default", "--compile_backend", "aot_eager", "--modes", "lora", "--batch_sizes", "1",
                "--cases", "baseline", "ambient", "--steps", "1", "--warmup", "1", "--out", str(out)])
    rows = {r["case"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["baseline"]["compiled"] is None and rows["baseline"]["flops_per_step"] > 0
    assert rows["ambient"]["compiled"] == "default" and rows["ambient"]["flops_per_step"] is None
    assert "| lora | 1 | ambient |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.parse_args(["--tiny", "--compile", "default", "--warmup", "0"])


@pytest.mark.slow
def test_peak_memory_wrapper_records_steps_and_exit(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("import sys, torch\n"
                      "p = torch.nn.Parameter(torch.zeros(2)); opt = torch.optim.SGD([p], lr=0.1)\n"
                      "for _ in range(6):\n    p.sum().backward(); opt.step()\n"
                      "sys.exit(int(sys.argv[1]))\n")
    out = tmp_path / "peak.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "peak_memory.py"), str(script), "3"],
                          env={"PEAK_MEMORY_OUT": str(out), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, check=False)
    assert proc.returncode == 3, proc.stderr
    result = json.loads(out.read_text())
    assert result["exit"] == 3 and result["optimizer_steps"] == 6 and result["args"] == ["3"]
    assert result["median_step_s"] is not None and result["max_memory_allocated_gib"] is None  # no GPU here


def test_gpu_run_skips_zero2_without_deepspeed(tmp_path, monkeypatch):
    gpu_run = _load("gpu_run")
    monkeypatch.setattr(gpu_run, "deepspeed_missing", lambda: "deepspeed is not installed here")
    assert gpu_run.main(["--tiny", "--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "work"),
                         "--parts", "train-zero2"]) == 0
    report = json.loads((tmp_path / "out" / "gpu_run.json").read_text())
    assert report["parts"] == [{"part": "train-zero2", "skipped": "deepspeed is not installed here"}]
    assert "| train-zero2 | deepspeed is not installed here |" in (tmp_path / "out" / "gpu_run.md").read_text()
    sys.modules.pop("gpu_run", None)


@pytest.mark.slow
def test_gpu_run_rehearsal_measures_each_part(tmp_path):
    """The one GPU call rehearsed on the tiny model: the trainer's part records its optimizer steps through
    peak_memory.py, the compiled step benchmark its table, and the report says which parts ran."""
    gpu_run = _load("gpu_run")
    try:
        code = gpu_run.main(["--tiny", "--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "work"),
                             "--parts", "build", "train-ckpt", "step-compiled"])
    finally:
        sys.modules.pop("gpu_run", None)
    report = json.loads((tmp_path / "out" / "gpu_run.json").read_text())
    assert code == 0, [(p["part"], p.get("returncode")) for p in report["parts"]]
    parts = {p["part"]: p for p in report["parts"]}
    assert list(parts) == ["build", "train-ckpt", "step-compiled"]
    assert parts["train-ckpt"]["peak"]["optimizer_steps"] == 4 and parts["train-ckpt"]["peak"]["exit"] == 0
    assert "| lora | 8 | ambient |" in report["step_compiled_table"]
    text = (tmp_path / "out" / "gpu_run.md").read_text()
    assert "| train-ckpt | ok |" in text and "the project's cases compiled" in text
