"""Every real-size GPU measurement of BENCHMARKS.md in one call of a GPU machine, within a time budget.

    python3 benchmarks/gpu_run.py                 # on the GPU machine: real-size SDXL-base, results in $OUT
    python benchmarks/gpu_run.py --tiny           # here on the CPU: the same parts on the tiny model, minutes

Parts, in order of what they settle (each a subprocess with its log in ``$OUT`` and a time limit taken
from what is left of ``--budget_s``):

    build            the random real-size SDXL-base folder (benchmarks/real_size.py build) and 4 images;
                     the real CLIP vocabulary when .whl/bpe/open_clip_torch-*.whl was carried, else the
                     synthetic one of the same size
    train-ckpt       accelerate launch train_sdxl_ambient.py: LoRA r4, bf16, 1024 px, batch 1, cached
                     latents and embeddings, --gradient_checkpointing, 20 steps; peak CUDA memory of the
                     training steps (after the first; the whole run's peak beside it) and the median step
                     time (benchmarks/peak_memory.py), host syncs counted after step 3
    step-compiled    step_benchmark.py with the UNet's blocks compiled (--compile default): LoRA, baseline
                     (eager) against the project's ambient step, batch 1 and 8: the speed targets
    step-benchmark   benchmarks/step_benchmark.py on the real UNet, eager: baseline, plain-loss, ambient,
                     ambient+consistency; LoRA and full; batch 1 and 8 (its JSON survives a cut-off run)
    train-zero2      the same as train-ckpt under DeepSpeed ZeRO-2 (configs/accelerate_deepspeed_zero2.yaml),
                     one process, 5 steps; skipped with a message where deepspeed is not installed
    train-nockpt     train-ckpt without --gradient_checkpointing (the memory it saves), if time is left

``$OUT/gpu_run.json`` holds every part's return code, wall time and measurements, rewritten after each
part; ``$OUT/gpu_run.md`` the tables to paste into BENCHMARKS.md. Ten files at most come back from the
device machine: gpu_run.json, gpu_run.md, the two step benchmarks' JSON and a log per part.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(ROOT))


PARTS = ("build", "train-ckpt", "step-compiled", "step-benchmark", "train-zero2", "train-nockpt")


def env_for_children(work: Path) -> dict:
    path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path + [str(ROOT)]), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", PEAK_MEMORY_SYNC_DEBUG="1")


def run_part(name: str, cmd: list[str], out: Path, env: dict, limit_s: float) -> dict:
    """Run ``cmd`` with its output in ``out/name.log``; stopped after ``limit_s``."""
    log = out / f"{name}.log"
    start = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        try:
            rc = subprocess.run(list(map(str, cmd)), stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                timeout=max(1.0, limit_s), check=False).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    return {"part": name, "returncode": rc, "wall_s": round(time.perf_counter() - start, 1), "limit_s": round(limit_s),
            "log": log.name}


def launch(peak_json: Path, *train_args, config_file: str | None = None) -> list:
    head = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file:
        head += ["--config_file", config_file, "--num_processes", 1]
    else:
        head += ["--num_machines", 1, "--num_processes", 1, "--dynamo_backend", "no"]
    return head + ["--mixed_precision", "bf16", BENCH / "peak_memory.py", ROOT / "train_sdxl_ambient.py", *train_args]


def train_args(work: Path, name: str, steps: int, resolution: int, *extra) -> list:
    return ["--pretrained_model_name_or_path", work / "pipeline", "--train_data_dir", work / "images",
            "--output_dir", work / name, "--overwrite_output_dir", "--cache_dir", work / f"cache-{resolution}",
            "--resolution", resolution, "--center_crop", "--ambient_timestep", 100, "--rank", 4,
            "--train_batch_size", 1, "--max_train_steps", steps, "--learning_rate", 1e-4, "--lr_warmup_steps", 0,
            "--mixed_precision", "bf16", "--allow_tf32", "--seed", 0, "--report_to", "none",
            "--logging_steps", 10, "--checkpointing_steps", 100_000, *extra]


def deepspeed_missing() -> str | None:
    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed here (pip install deepspeed, or carry its wheel): ZeRO-2 run skipped"
    return None


def environment(tiny: bool) -> dict:
    import torch

    info = {"date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "tiny": tiny,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    for name in ("diffusers", "transformers", "peft", "accelerate", "deepspeed"):
        try:
            info[name] = __import__(name).__version__
        except (ImportError, AttributeError, RuntimeError, OSError):  # not installed, or fails to import
            info[name] = None
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                             "--format=csv,noheader"], capture_output=True, text=True, timeout=30,
                                            check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        info["nvidia_smi"] = None
    return info


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [(f"{env['device']} ({env.get('nvidia_smi') or 'no nvidia-smi'}), torch {env['torch']} (CUDA {env['cuda']}), "
              f"diffusers {env['diffusers']}, transformers {env['transformers']}, peft {env['peft']}, "
              f"accelerate {env['accelerate']}, deepspeed {env['deepspeed']}; {env['date_utc']} UTC"), "",
             ("| part | result | wall (s) | optimizer steps | median step (s) | peak allocated, training steps (GiB) | "
              "peak reserved, training steps (GiB) | peak allocated, whole run (GiB) | host syncs after step 3 |"),
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for part in report["parts"]:
        peak = part.get("peak") or {}
        result = part.get("skipped") or ("ok" if part.get("returncode") == 0 else f"rc={part.get('returncode')}")
        syncs = peak.get("host_syncs_after_step_3")
        lines.append(f"| {part['part']} | {result} | {part.get('wall_s', '')} | {peak.get('optimizer_steps', '')} | "
                     f"{peak.get('median_step_s', '')} | {peak.get('max_memory_allocated_gib', '')} | "
                     f"{peak.get('max_memory_reserved_gib', '')} | {peak.get('run_max_memory_allocated_gib', '')} | "
                     f"{'' if syncs is None else (sum(syncs.values()), list(syncs)[:3])} |")
    trained = {part["part"]: (part.get("peak") or {}).get("max_memory_allocated_gib") for part in report["parts"]}
    for part in ("train-ckpt", "train-nockpt"):
        if trained.get(part) is not None:
            lines.append(f"\nTarget, LoRA at batch 1 (1024 px, cached latents and embeddings) within 8 GiB: {part} "
                         f"peak allocated {trained[part]:.2f} GiB: {'met' if trained[part] <= 8 else 'NOT met'}")
    for key, title in (("step_benchmark_table", "Step benchmark, eager"),
                       ("step_compiled_table", "Step benchmark, the project's cases compiled (--compile default)")):
        if report.get(key):
            lines += ["", f"{title}:", "", report[key]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the tiny model on the CPU (a rehearsal of the GPU run)")
    p.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "gpu_out")), help="results and logs (default $OUT)")
    p.add_argument("--workdir", default="/tmp/sdxl-gpu-run", help="pipeline, images, training outputs (about 8 GB)")
    p.add_argument("--budget_s", type=float, default=420.0, help="wall-clock budget of the whole run")
    p.add_argument("--steps", type=int, default=20, help="trainer steps of train-ckpt and train-nockpt")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    args = p.parse_args(argv)
    start = time.perf_counter()
    out, work = Path(args.out), Path(args.workdir)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    env = env_for_children(work)
    resolution = 64 if args.tiny else 1024
    report = {"environment": environment(args.tiny), "settings": vars(args), "parts": []}

    def left(cap: float) -> float:
        return min(cap, args.budget_s - (time.perf_counter() - start))

    def save():
        (out / "gpu_run.json").write_text(json.dumps(report, indent=2, default=str))
        (out / "gpu_run.md").write_text(markdown(report))

    def record(row: dict, peak_json: Path | None = None):
        if peak_json is not None and peak_json.is_file():
            row["peak"] = json.loads(peak_json.read_text())
        report["parts"].append(row)
        save()
        peak = row.get("peak") or {}
        print(f"[{row['part']}] {row.get('skipped') or row.get('returncode')} {row.get('wall_s', '')} s "
              f"{peak.get('median_step_s', '')} s/step {peak.get('max_memory_allocated_gib', '')} GiB", flush=True)

    for part in args.parts:
        if left(1e9) < 20:
            record({"part": part, "skipped": "out of time budget"})
            continue
        peak_json = work / f"{part}.peak.json"
        peak_json.unlink(missing_ok=True)
        part_env = dict(env, PEAK_MEMORY_OUT=str(peak_json))
        if part == "build":
            if args.tiny:
                cmd = [sys.executable, "-c", ("import sys; sys.path.insert(0, sys.argv[3]); "
                       "from sdxl_ambient.tiny import save_tiny_pipeline; import real_size; save_tiny_pipeline(sys.argv[1]); "
                       "real_size.write_images(sys.argv[2], sizes=((96, 96), (64, 112), (112, 80), (96, 96)))"),
                       work / "pipeline", work / "images", BENCH]
            else:
                cmd = [sys.executable, BENCH / "real_size.py", "build", "--workdir", work, "--device", "cuda", "--num_images", 4]
                wheels = sorted((ROOT / ".whl" / "bpe").glob("open_clip_torch-*.whl"))  # the real BPE vocabulary, if carried
                cmd += ["--bpe", wheels[-1]] if wheels else []
            record(run_part(part, cmd, out, part_env, left(120)))
        elif part in ("train-ckpt", "train-nockpt"):
            extra = ["--gradient_checkpointing"] if part == "train-ckpt" else []
            cmd = launch(peak_json, *train_args(work, part, args.steps if not args.tiny else 4, resolution, *extra))
            record(run_part(part, cmd, out, part_env, left(150)), peak_json)
        elif part == "train-zero2":
            missing = deepspeed_missing()
            if missing:
                print(missing, flush=True)
                record({"part": part, "skipped": missing})
                continue
            cmd = launch(peak_json, *train_args(work, part, 5, resolution, "--gradient_checkpointing"),
                         config_file=str(ROOT / "configs" / "accelerate_deepspeed_zero2.yaml"))
            record(run_part(part, cmd, out, part_env, left(120)), peak_json)
        elif part in ("step-benchmark", "step-compiled"):
            size = ["--tiny", "--steps", 2, "--warmup", 1] if args.tiny else \
                ["--config", BENCH / "sdxl_base_config.json", "--steps", 5, "--warmup", 2]
            if part == "step-compiled":  # on the CPU rehearsal without inductor's C++ toolchain
                size += ["--compile", "default", "--modes", "lora", "--cases", "baseline", "ambient",
                         *(["--compile_backend", "aot_eager"] if args.tiny else [])]
            name = part.replace("-", "_")
            cmd = [sys.executable, BENCH / "step_benchmark.py", *size, "--out", out / f"{name}.json"]
            row = run_part(part, cmd, out, part_env, left(240 if part == "step-benchmark" else 150))
            log = (out / row["log"]).read_text(errors="replace")
            table_start = log.find("| mode | batch | case |")
            report[f"{name}_table"] = log[table_start:].strip() if table_start >= 0 else None
            record(row)
        else:
            raise SystemExit(f"unknown part {part!r}")
    print(markdown(report))
    return 0 if all(r.get("skipped") or r.get("returncode") == 0 for r in report["parts"]) else 1


if __name__ == "__main__":
    sys.exit(main())
