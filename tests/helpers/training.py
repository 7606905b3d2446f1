"""Running the training script on the tiny pipeline: under `accelerate launch` in a subprocess, or in-process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from helpers import ROOT
from sdxl_ambient.files import LORA_WEIGHT_NAME as LORA_FILE

SCRIPT = ROOT / "train_sdxl_ambient.py"


def tiny_args(pipeline_dir, data_dir, output_dir, *extra, steps=6, noise_seed="0") -> list[str]:
    """A short LoRA run on the tiny pipeline; ``noise_seed`` fixes the cache's noise so that runs in
    different folders are comparable bit for bit (None: a fresh secret one, as users get)."""
    noise = ["--noise_seed", noise_seed] if noise_seed is not None else []
    return ["--pretrained_model_name_or_path", str(pipeline_dir), "--train_data_dir", str(data_dir),
            "--output_dir", str(output_dir), "--resolution", "64", "--train_batch_size", "2",
            "--max_train_steps", str(steps), "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--rank", "4",
            "--ambient_timestep", "100", "--seed", "0", "--checkpointing_steps", "3", "--report_to", "none",
            "--mixed_precision", "no", *noise, *map(str, extra)]


def subprocess_env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def launch_command(args: list[str], num_processes: int = 1, script: Path = SCRIPT) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--num_processes", str(num_processes)]
    if num_processes > 1:
        cmd.append("--multi_gpu")
    return cmd + [str(script)] + args


def launch(args: list[str], num_processes: int = 1, timeout: int = 300, check: bool = True, script: Path = SCRIPT, **env):
    """`accelerate launch train_sdxl_ambient.py ARGS` (or another ``script``); returns the CompletedProcess (output captured)."""
    extra = {"ACCELERATE_USE_CPU": "true"} if num_processes > 1 else {}
    proc = subprocess.run(launch_command(args, num_processes, script), cwd=ROOT, env=subprocess_env(**extra, **env),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def run_inprocess(args: list[str]) -> int:
    """train.main in this process (a fresh accelerate state each time)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    from sdxl_ambient.train import main

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    return main(args)


def lora_weights(output_dir) -> dict:
    return load_file(str(Path(output_dir) / LORA_FILE))
