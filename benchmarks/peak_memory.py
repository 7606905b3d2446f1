"""Run a Python script (the trainer) and record its optimizer steps and peak CUDA memory.

    accelerate launch [...] benchmarks/peak_memory.py train_sdxl_ambient.py --flag value ...

At exit it writes JSON to ``$PEAK_MEMORY_OUT``: wall time, the time of each optimizer step (read
on the host, without synchronising: once the device's queue is full the host waits for it, so the
median interval after warm-up is the device's step time), ``torch.cuda.max_memory_allocated``
(weights, optimizer state, activations) and ``max_memory_reserved`` (the caching allocator's hold),
and the exit code. Nothing is recorded on a CPU but the times. The peaks are taken twice: over the
whole run (``run_max_memory_*``: model loading and a latent cache built in the same process
included) and from the end of the first optimizer step on (``max_memory_*``: the steady training
step, which every later step repeats, with cached latents and embeddings).

With ``PEAK_MEMORY_SYNC_DEBUG=1`` it also turns on ``torch.cuda.set_sync_debug_mode("warn")`` after
the third optimizer step and counts each operation that made the host wait for the device, by the
file and line that called it (the trainer reads losses back every ``--logging_steps``: expect those).
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import runpy
import statistics
import sys
import time
import warnings
from collections import Counter

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

GIB = 2**30


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: peak_memory.py SCRIPT [ARGS ...]")
    script, args = sys.argv[1], sys.argv[2:]
    out = os.environ.get("PEAK_MEMORY_OUT")
    start = time.perf_counter()
    steps: list[float] = []
    state = {"exit": None}
    syncs: Counter = Counter()
    sync_debug = os.environ.get("PEAK_MEMORY_SYNC_DEBUG") == "1" and torch.cuda.is_available()

    run_peak = {"allocated": 0, "reserved": 0}

    def on_step(optimizer, args_, kwargs_):
        steps.append(time.perf_counter() - start)
        if len(steps) == 1 and torch.cuda.is_available() and torch.cuda.is_initialized():
            run_peak.update(allocated=torch.cuda.max_memory_allocated(), reserved=torch.cuda.max_memory_reserved())
            torch.cuda.reset_peak_memory_stats()  # from here on: the training steps only
        if sync_debug and len(steps) == 3:
            show = warnings.showwarning

            def count(message, category, filename, lineno, *rest):
                if "synchroniz" in str(message):
                    syncs[f"{filename}:{lineno}"] += 1
                else:
                    show(message, category, filename, lineno, *rest)

            warnings.showwarning = count
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    register_optimizer_step_post_hook(on_step)

    def report():
        intervals = [b - a for a, b in itertools.pairwise(steps)]
        settled = intervals[3:] or intervals
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        result = {
            "script": script, "args": args, "exit": state["exit"], "wall_s": round(time.perf_counter() - start, 2),
            "optimizer_steps": len(steps), "first_step_at_s": round(steps[0], 2) if steps else None,
            "median_step_s": round(statistics.median(settled), 4) if settled else None,
            "step_times_s": [round(t, 3) for t in steps],
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "max_memory_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 3) if cuda else None,
            "max_memory_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 3) if cuda else None,
            "run_max_memory_allocated_gib": round(max(run_peak["allocated"], torch.cuda.max_memory_allocated()) / GIB, 3)
            if cuda else None,
            "run_max_memory_reserved_gib": round(max(run_peak["reserved"], torch.cuda.max_memory_reserved()) / GIB, 3)
            if cuda else None,
            "torch": torch.__version__,
            "host_syncs_after_step_3": dict(syncs.most_common(20)) if sync_debug else None,
        }
        if sync_debug:
            torch.cuda.set_sync_debug_mode(0)
        if out:
            with open(out, "w") as f:
                json.dump(result, f, indent=2)
        print("peak_memory: " + json.dumps({k: v for k, v in result.items() if k not in ("args", "step_times_s")}),
              file=sys.stderr, flush=True)

    atexit.register(report)
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
        state["exit"] = 0
    except SystemExit as exc:
        state["exit"] = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        raise


if __name__ == "__main__":
    main()
