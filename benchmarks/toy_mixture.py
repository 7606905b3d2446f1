"""Measure the ambient objectives' settings on the 2-D Gaussian-mixture toy (CPU, seconds per run).

Trains the small MLP of ``sdxl_ambient/toy.py`` on noisy observations at t_n and reports the mean distance
of its DDIM samples (ending with one Tweedie jump) to the exact clean-mixture denoiser's DDIM samples
from the same starting noise. Prints a table and writes JSON.

    python benchmarks/toy_mixture.py weighting --observed-timestep 100 --seeds 0 1 2
    python benchmarks/toy_mixture.py margin --observed-timestep 100
    python benchmarks/toy_mixture.py consistency --observed-timestep 100

The measured tables (--steps 4000 for weighting and margin, 3000 for consistency) are in docs/toy_results.md.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from sdxl_ambient.toy import (
    TrainConfig,
    ddim_sample,
    exact_denoiser,
    model_denoiser,
    ring_mixture,
    sample_distance,
    sdxl_alphas_cumprod,
    train,
)

NUM_SAMPLES = 4000
DDIM_STEPS = 50
MARGINS = (0, 10, 25, 50, 100, 200)


def weighting_runs(t_n: int, steps: int) -> list[tuple[str, TrainConfig, int]]:
    """(label, config, jump timestep) for the weighting comparison."""
    base = TrainConfig(observed_timestep=t_n, steps=steps)
    runs = [("oracle (clean data), to t=0", replace(base, objective="oracle"), 0),
            ("naive (noisy as clean), to t=0", replace(base, objective="naive"), 0),
            ("observation", replace(base, weighting="observation"), t_n)]
    runs += [(f"epsilon cap {cap:g}", replace(base, weighting="epsilon", weight_cap=cap), t_n) for cap in (4.0, 16.0, 64.0, 256.0)]
    return runs


def consistency_runs(t_n: int, steps: int) -> list[tuple[str, TrainConfig, int]]:
    """Ambient training with and without the consistency term (max_delta = t_n), sampled to t = 0.

    "window": only samples with t < 2 t_n get the term, so the chains reach below t_n. "trainer": the term
    as the trainer applies it (step.AmbientObjective: its own t_c in [t_n, 2 t_n), no-grad anchor and chains,
    on the whole batch here)."""
    base = TrainConfig(observed_timestep=t_n, steps=steps)
    windowed = replace(base, consistency_window=t_n, anchor_grad=False)
    return [("no consistency", base, 0),
            ("all t, w=1, anchor_grad", replace(base, consistency_weight=1.0), 0),
            ("window, w=1", replace(windowed, consistency_weight=1.0), 0),
            ("window, w=10", replace(windowed, consistency_weight=10.0), 0),
            ("window, w=100", replace(windowed, consistency_weight=100.0), 0),
            ("window, w=10, num_steps=2", replace(windowed, consistency_weight=10.0, consistency_steps=2), 0),
            ("trainer, w=1", replace(base, consistency_weight=1.0, trainer_objective=True), 0)]


def evaluate(model, alphas_cumprod, noise, reference, jumps) -> dict[int, float]:
    h = model_denoiser(model, alphas_cumprod)
    return {j: sample_distance(ddim_sample(h, noise, alphas_cumprod, j, DDIM_STEPS), reference) for j in jumps}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", choices=("weighting", "margin", "consistency"))
    parser.add_argument("--observed-timestep", type=int, default=100)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--only", nargs="*", default=None, help="run only the labels containing one of these strings")
    parser.add_argument("--output", type=Path, default=None, help="JSON file (default benchmarks/toy_<study>_<t_n>.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    t_n = args.observed_timestep
    ac = sdxl_alphas_cumprod()
    mixture = ring_mixture()
    noise = torch.randn(NUM_SAMPLES, 2, generator=torch.Generator().manual_seed(1234))
    reference = ddim_sample(exact_denoiser(mixture, ac), noise, ac, 0, DDIM_STEPS)
    margins = [m for m in MARGINS if t_n + m < 1000]

    rows = [{"label": "exact clean denoiser (floor)", "seed": None, "seconds": 0.0, "per_step_ms": 0.0,
             "distance": {t_n + m: sample_distance(ddim_sample(exact_denoiser(mixture, ac), noise, ac, t_n + m, DDIM_STEPS), reference)
                          for m in margins}}]
    if args.study == "weighting":
        runs = weighting_runs(t_n, args.steps)
    elif args.study == "margin":
        runs = [("ambient epsilon (default cap)", TrainConfig(observed_timestep=t_n, steps=args.steps), t_n)]
    else:
        runs = consistency_runs(t_n, args.steps)
    if args.only:
        runs = [r for r in runs if any(s in r[0] for s in args.only)]

    for seed in args.seeds:
        for label, config, jump in runs:
            config = replace(config, seed=seed)
            start = time.perf_counter()
            model = train(mixture, config, ac)
            seconds = time.perf_counter() - start
            jumps = [t_n + m for m in margins] if args.study == "margin" else sorted({jump, 0, t_n})
            row = {"label": label, "seed": seed, "seconds": seconds, "per_step_ms": 1000 * seconds / config.steps,
                   "config": asdict(config), "distance": evaluate(model, ac, noise, reference, jumps)}
            rows.append(row)
            dist = "  ".join(f"jump@{j}: {d:.4f}" for j, d in row["distance"].items())
            print(f"{label:38s} seed {seed}  {row['per_step_ms']:.1f} ms/step  {dist}", flush=True)
    print(f"{rows[0]['label']:38s} " + "  ".join(f"jump@{j}: {d:.4f}" for j, d in rows[0]["distance"].items()))

    output = args.output or Path(__file__).with_name(f"toy_{args.study}_{t_n}.json")
    output.write_text(json.dumps({"observed_timestep": t_n, "steps": args.steps, "ddim_steps": DDIM_STEPS,
                                  "num_samples": NUM_SAMPLES, "rows": rows}, indent=1))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
