"""Time one SDXL training step: diffusers' plain eager step beside the project's ambient steps.

Builds the real-size SDXL-base UNet from its public config with random weights (or, with
``--tiny``, the tiny UNet of ``sdxl_ambient.tiny`` on the CPU) and, for LoRA and full
fine-tuning at each batch size, times these cases on the same freshly built model:

    baseline             diffusers' train_text_to_image(_lora)_sdxl.py step: randn noise, t ~ U{0..T-1},
                         scheduler.add_noise, UNet under autocast, MSE to the noise, loss.item() (the
                         script logs it), backward, clip, AdamW (not fused), zero_grad
    plain-loss           the project's step with t_n = 0 (its ordinary epsilon loss)
    ambient              the project's step (conditioned_unet + AmbientObjective) at t_n, fused AdamW on CUDA
    ambient+consistency  the same with the consistency loss on (weight 0.1, otherwise the trainer's defaults:
                         a quarter of the batch, at batch 1 one step in four)

Figures per case: median step time after warm-up (CUDA synchronised), images/s = batch / time,
peak memory (torch.cuda.max_memory_allocated, reset per case), FLOPs of one step
(torch.utils.flop_counter.FlopCounterMode: matmuls, convolutions and attention, forward and
backward) and MFU = FLOPs / time / peak FLOP/s. Prints a Markdown table, writes JSON (``--out``).

    python benchmarks/step_benchmark.py --config benchmarks/sdxl_base_config.json --out results.json
    python benchmarks/step_benchmark.py --tiny --steps 2 --warmup 1
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sdxl_ambient.compile import block_kinds, compile_unet, configure_static_shapes, mark_step_begin  # noqa: E402
from sdxl_ambient.models import UNET_ATTENTION_TARGETS, add_unet_lora, cast_training_params  # noqa: E402
from sdxl_ambient.step import AmbientObjective, ObjectiveSettings, conditioned_unet  # noqa: E402
from sdxl_ambient.tiny import SDXL_SCHEDULER_CONFIG  # noqa: E402

CASES = ("baseline", "plain-loss", "ambient", "ambient+consistency")
MODES = ("lora", "full")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
H100_BF16_DENSE_TFLOPS = 989.0
GIB = 2**30


@dataclass
class ModelSpec:
    """What to build: the UNet config, the training scheduler config and the conditioning shapes."""

    name: str
    unet_config: dict
    scheduler_config: dict
    latent_shape: tuple[int, int, int]
    text_shape: tuple[int, int]
    pooled_dim: int
    image_size: int


def spec_from_unet_config(name: str, unet_config: dict, scheduler_config: dict) -> ModelSpec:
    """Conditioning shapes as SDXL's UNet expects them: 77 text tokens of cross_attention_dim, the pooled
    embedding fills projection_class_embeddings_input_dim beside 6 micro-conditioning embeddings."""
    pooled = unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]
    size = unet_config["sample_size"]
    return ModelSpec(name, unet_config, scheduler_config, (unet_config["in_channels"], size, size),
                     (77, unet_config["cross_attention_dim"]), pooled, 8 * size)


def load_spec(config_path: str) -> ModelSpec:
    """The real-size spec from a JSON file: either {"unet": {...}, "scheduler": {...}} (SDXL-base's public
    configs) or a diffusers unet/config.json (then SDXL's scheduler config)."""
    path = Path(config_path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {config_path}: no such file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"--config {config_path}: not JSON ({exc})") from exc
    unet = data.get("unet", data)
    needed = ("projection_class_embeddings_input_dim", "addition_time_embed_dim", "cross_attention_dim", "sample_size")
    missing = [key for key in needed if key not in unet]
    if missing:
        raise ValueError(f"--config {config_path}: not an SDXL UNet config (missing {', '.join(missing)})")
    return spec_from_unet_config(path.name, unet, data.get("scheduler", SDXL_SCHEDULER_CONFIG))


def tiny_spec() -> ModelSpec:
    """The tiny SDXL-shaped UNet of ``sdxl_ambient.tiny`` (8x8 latents)."""
    from sdxl_ambient.tiny import tiny_unet_config

    return spec_from_unet_config("tiny", tiny_unet_config(), SDXL_SCHEDULER_CONFIG)


# ----------------------------------------------------------------------------- model, data, optimizer


def build_unet(spec: ModelSpec, mode: str, device, weight_dtype, rank: int, gradient_checkpointing: bool, seed: int):
    """A fresh random UNet on ``device``; returns (unet, trainable parameters).

    lora: base weights in ``weight_dtype``, LoRA on to_q/k/v/out.0 in fp32. full: every weight trains, fp32 masters."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(spec.unet_config)
    if mode == "lora":
        unet.requires_grad_(False)
        with quiet_diffusers():  # ModelMixin.to(dtype) warns about fp32 modules even when there are none
            unet.to(dtype=weight_dtype)
        add_unet_lora(unet, rank=rank, target_modules=UNET_ATTENTION_TARGETS)
        cast_training_params(unet, torch.float32)
    else:
        unet.requires_grad_(True)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    return unet, [p for p in unet.parameters() if p.requires_grad]


@contextlib.contextmanager
def quiet_diffusers():
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def make_batch(spec: ModelSpec, batch_size: int, device, embed_dtype, seed: int) -> dict:
    """Random latents, text embeddings and SDXL micro-conditioning (original size, crop (0, 0), target size)."""
    g = torch.Generator().manual_seed(seed)
    size = spec.image_size
    batch = {
        "latents": torch.randn((batch_size, *spec.latent_shape), generator=g),
        "prompt_embeds": torch.randn((batch_size, *spec.text_shape), generator=g).to(embed_dtype),
        "pooled_prompt_embeds": torch.randn((batch_size, spec.pooled_dim), generator=g).to(embed_dtype),
        "time_ids": torch.tensor([size, size, 0, 0, size, size], dtype=torch.float32).repeat(batch_size, 1),
    }
    return {k: v.to(device) for k, v in batch.items()}


def autocast(device, weight_dtype):
    """Mixed precision as accelerate applies it: autocast to the weight dtype (off for fp32)."""
    if weight_dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=weight_dtype)


# ----------------------------------------------------------------------------- the steps


def baseline_step(unet, params, batch, noise_scheduler, device, weight_dtype, max_grad_norm, lr):
    """diffusers' SDXL training step, eager: the loss is read with .item() after the forward pass (the
    script logs ``avg_loss.item()`` before ``accelerator.backward``), torch's default (not fused) AdamW."""
    optimizer = torch.optim.AdamW(params, lr=lr)
    num_timesteps = noise_scheduler.config.num_train_timesteps
    latents = batch["latents"]
    cond = {"text_embeds": batch["pooled_prompt_embeds"], "time_ids": batch["time_ids"].to(weight_dtype)}

    def step() -> float:
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, num_timesteps, (latents.shape[0],), device=device).long()
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        with autocast(device, weight_dtype):
            pred = unet(noisy, timesteps, batch["prompt_embeds"], added_cond_kwargs=cond, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        value = loss.detach().item()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        return value

    return step


def project_step(unet, params, batch, objective: AmbientObjective, observed_timestep: int, device, weight_dtype,
                 max_grad_norm, lr, seed, cudagraphs: bool = False):
    """The project's step (as sdxl_ambient.train runs it): conditioned_unet + AmbientObjective under autocast,
    fused AdamW on CUDA, no host sync. ``cudagraphs``: mark each step's start for compiled CUDA graphs."""
    optimizer = torch.optim.AdamW(params, lr=lr, fused=device.type == "cuda")
    generator = torch.Generator(device=device).manual_seed(seed)
    observed = batch["latents"]
    observed_timesteps = torch.full((observed.shape[0],), observed_timestep, dtype=torch.long, device=device)
    steps = itertools.count()  # the optimizer step, as the trainer passes it (the consistency term's step schedule)

    def step() -> torch.Tensor:
        if cudagraphs:
            mark_step_begin()
        net = conditioned_unet(unet, batch["prompt_embeds"], batch["pooled_prompt_embeds"], batch["time_ids"],
                               dtype=weight_dtype)
        with autocast(device, weight_dtype):
            losses = objective(net, observed, observed_timesteps, generator=generator, step=next(steps))
        loss = losses["loss"].mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def make_objective(case: str, noise_scheduler, device, args) -> tuple[AmbientObjective, int]:
    """(objective, t_n) of a project case."""
    plain = case == "plain-loss"
    t_n = 0 if plain else args.ambient_timestep
    objective = AmbientObjective(
        alphas_cumprod=noise_scheduler.alphas_cumprod.to(device),
        prediction_type=noise_scheduler.config.prediction_type,
        consistency_weight=args.consistency_weight if case == "ambient+consistency" else 0.0,
        consistency_max_delta=max(t_n, 1),
        consistency_fraction=args.consistency_fraction,
        consistency_one_sided=args.consistency_one_sided,
        num_train_timesteps=noise_scheduler.config.num_train_timesteps,
    )
    return objective, t_n


# ----------------------------------------------------------------------------- measuring


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, warmup: int, steps: int, device) -> list[float]:
    """Wall-clock seconds of ``steps`` calls after ``warmup`` calls, each bracketed by device syncs."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def count_flops(step, calls: int = 1) -> int:
    """FLOPs of one call (matmuls, convolutions, attention; forward and backward) by FlopCounterMode,
    averaged over ``calls`` calls (a whole period of the consistency term's step schedule)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        for _ in range(calls):
            step()
    return int(counter.get_total_flops()) // calls


def free_memory(device) -> None:
    """Release the last case's CUDA memory (cycles included) and start a new peak."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure_case(spec: ModelSpec, mode: str, batch_size: int, case: str, device, weight_dtype, args) -> dict:
    """Build a fresh model, warm up, time, read peak memory, count one step's FLOPs."""
    from diffusers import DDPMScheduler

    unet, params = build_unet(spec, mode, device, weight_dtype, args.rank, args.gradient_checkpointing, args.seed)
    noise_scheduler = DDPMScheduler.from_config(spec.scheduler_config)
    batch = make_batch(spec, batch_size, device, weight_dtype, args.seed)
    compiled = args.compile != "none" and case != "baseline"
    if compiled:  # regional compilation, static shapes: B, and 2B for the consistency chains
        configure_static_shapes(2, block_kinds(unet))
        compile_unet(unet, mode=args.compile, backend=args.compile_backend)
    period = 1
    if case == "baseline":
        step = baseline_step(unet, params, batch, noise_scheduler, device, weight_dtype, args.max_grad_norm, args.learning_rate)
    else:
        objective, t_n = make_objective(case, noise_scheduler, device, args)
        period = objective.consistency_period(batch_size) if objective.consistency_weight > 0 else 1
        step = project_step(unet, params, batch, objective, t_n, device, weight_dtype, args.max_grad_norm,
                            args.learning_rate, args.seed, cudagraphs=compiled and args.compile == "reduce-overhead")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # the consistency term on some steps only (f B not a whole number): time whole periods, report the mean
    timed = args.steps if period == 1 else period * math.ceil(args.steps / period)
    times = time_steps(step, period * math.ceil(args.warmup / period), timed, device)
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    reserved = torch.cuda.max_memory_reserved(device) / GIB if device.type == "cuda" else None
    flops = None if compiled else count_flops(step, period)  # compiled graphs run past the counting mode
    median = statistics.median(times) if period == 1 else statistics.fmean(times)
    mfu = flops / median / (args.peak_tflops * 1e12) if device.type == "cuda" and flops else None
    return {
        "status": "ok",
        "step_time_s": median,
        "step_times_s": times,
        "images_per_s": batch_size / median,
        "peak_memory_gib": peak,
        "peak_reserved_gib": reserved,
        "flops_per_step": flops,
        "mfu": mfu,
        "trainable_params": sum(p.numel() for p in params),
        "compiled": args.compile if compiled else None,
    }


def run_case(spec, mode, batch_size, case, device, weight_dtype, args) -> dict:
    """``measure_case``, recording an out-of-memory failure as status "OOM" and freeing memory after."""
    row = {"mode": mode, "batch_size": batch_size, "case": case}
    try:
        row.update(measure_case(spec, mode, batch_size, case, device, weight_dtype, args))
    except torch.OutOfMemoryError:
        row["status"] = "OOM"
    free_memory(device)
    return row


# ----------------------------------------------------------------------------- summary


def find(results: list[dict], mode: str, batch_size: int, case: str) -> dict | None:
    for row in results:
        if (row["mode"], row["batch_size"], row["case"]) == (mode, batch_size, case) and row["status"] == "ok":
            return row
    return None


def time_ratio(results, mode, batch_size, numerator: str, denominator: str) -> float | None:
    """step time of ``numerator`` / step time of ``denominator`` (None if either is missing or OOM)."""
    a, b = find(results, mode, batch_size, numerator), find(results, mode, batch_size, denominator)
    return a["step_time_s"] / b["step_time_s"] if a and b else None


def ratios(results: list[dict]) -> dict:
    """Per mode and batch: speedup of the ambient step over the baseline, the ambient loss's cost over the
    plain loss (ambient / plain-loss - 1) and the consistency step's cost (ambient+consistency / ambient)."""
    out = {}
    for mode, batch_size in dict.fromkeys((r["mode"], r["batch_size"]) for r in results):
        overhead = time_ratio(results, mode, batch_size, "ambient", "plain-loss")
        out[f"{mode}/b{batch_size}"] = {
            "ambient_speedup_vs_baseline": time_ratio(results, mode, batch_size, "baseline", "ambient"),
            "ambient_overhead_vs_plain_loss": None if overhead is None else overhead - 1.0,
            "consistency_vs_ambient": time_ratio(results, mode, batch_size, "ambient+consistency", "ambient"),
        }
    return out


def targets(results: list[dict], ratio_table: dict) -> list[dict]:
    """The issue's targets, each with its measured value and whether it is met (None if not measured)."""
    def check(name, value, bound, at_least):
        met = None if value is None else (value >= bound if at_least else value <= bound)
        return {"target": name, "value": value, "bound": bound, "met": met}

    def worst(key, pick):
        values = [r[key] for r in ratio_table.values() if r[key] is not None]
        return pick(values) if values else None

    lora_b1 = find(results, "lora", 1, "ambient")
    return [
        check("ambient LoRA step at batch 1: speedup vs baseline >= 3", ratio_table.get("lora/b1", {}).get("ambient_speedup_vs_baseline"), 3.0, True),
        check("ambient LoRA step at batch 8: speedup vs baseline >= 1.8",
              ratio_table.get("lora/b8", {}).get("ambient_speedup_vs_baseline"), 1.8, True),
        check("ambient loss over plain loss <= 3% (worst case)", worst("ambient_overhead_vs_plain_loss", max), 0.03, False),
        check("ambient+consistency / ambient <= 2 (worst case)", worst("consistency_vs_ambient", max), 2.0, False),
        # The memory plan (BENCHMARKS.md) needs --gradient_checkpointing for this bound; the trainer's own run in
        # gpu_run.py checks it too.
        check("ambient LoRA at batch 1: peak memory <= 8 GiB", lora_b1["peak_memory_gib"] if lora_b1 else None, 8.0, False),
    ]


def _fmt(value, spec: str, none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def format_table(results: list[dict]) -> str:
    """Markdown table of every case; "vs baseline" is the baseline's step time over this case's."""
    lines = ["| mode | batch | case | step time (ms) | images/s | peak mem (GiB) | TFLOP/step | MFU | vs baseline |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        head = f"| {r['mode']} | {r['batch_size']} | {r['case']} |"
        if r["status"] != "ok":
            lines.append(head + f" {r['status']} | | | | | |")
            continue
        speed = time_ratio(results, r["mode"], r["batch_size"], "baseline", r["case"])
        lines.append(head + f" {r['step_time_s'] * 1e3:.1f} | {r['images_per_s']:.3g} | {_fmt(r['peak_memory_gib'], '.2f')} |"
                     f" {_fmt(r['flops_per_step'] and r['flops_per_step'] / 1e12, '.4g')} | {_fmt(r['mfu'], '.1%')} |"
                     f" {_fmt(speed, '.2f')}x |")
    return "\n".join(lines)


def format_targets(target_rows: list[dict]) -> str:
    lines = ["| target | measured | met |", "| --- | ---: | --- |"]
    for t in target_rows:
        met = "not measured" if t["met"] is None else ("yes" if t["met"] else "NO")
        lines.append(f"| {t['target']} | {_fmt(t['value'], '.4g')} | {met} |")
    return "\n".join(lines)


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else the machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def environment(device, weight_dtype, spec: ModelSpec, argv: list[str]) -> dict:
    import diffusers
    import peft

    return {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(["python", "benchmarks/step_benchmark.py", *argv]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cuda": torch.version.cuda,
        "torch_threads": torch.get_num_threads(),
        "weight_dtype": str(weight_dtype).removeprefix("torch."),
        "model": spec.name,
        "latent_shape": list(spec.latent_shape),
    }


# ----------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the tiny UNet of sdxl_ambient.tiny (8x8 latents), for CPU smoke runs")
    p.add_argument("--config", help="SDXL-base config JSON ({'unet': ..., 'scheduler': ...} or a diffusers unet config.json)")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    p.add_argument("--steps", type=int, default=10, help="timed steps per case (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per case before timing")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="base-weight / autocast dtype (default bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank")
    p.add_argument("--ambient_timestep", type=int, default=100, help="t_n of the ambient cases")
    p.add_argument("--consistency_weight", type=float, default=0.1, help="of the ambient+consistency case")
    p.add_argument("--consistency_fraction", type=float, default=ObjectiveSettings().consistency_fraction,
                   help="ambient+consistency: the term on this fraction of the batch (default: the trainer's)")
    p.add_argument("--consistency_one_sided", action="store_true",
                   help="ambient+consistency: gradient through one chain only (AmbientObjective.consistency_one_sided)")
    p.add_argument("--gradient_checkpointing", action="store_true", help="in every case")
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping in every case (the scripts' default)")
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--peak_tflops", type=float, default=H100_BF16_DENSE_TFLOPS, help="device peak for MFU (H100 SXM bf16 dense: 989)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", default="none", choices=["none", "default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                   help="regional torch.compile of the UNet (sdxl_ambient.compile) in the project's cases; the "
                        "warm-up steps include the compilation; FLOPs are not counted then")
    p.add_argument("--compile_backend", default="inductor", help="torch.compile backend of --compile")
    p.add_argument("--out", help="write the results as JSON here (rewritten after every case)")
    args = p.parse_args(argv)
    if not args.tiny and not args.config:
        p.error("--config PATH (SDXL-base's config JSON) is needed unless --tiny")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.compile != "none" and args.warmup < 1:
        p.error("--compile needs --warmup >= 1 (the first step compiles)")
    if min(args.batch_sizes) < 1:
        p.error("--batch_sizes must be >= 1")
    if not 0 < args.ambient_timestep < 1000:
        p.error("--ambient_timestep must be in [1, 999]")
    return args


def write_json(path: str, report: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available")
    weight_dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    spec = tiny_spec() if args.tiny else load_spec(args.config)
    report = {"environment": environment(device, weight_dtype, spec, argv),
              "settings": {k: v for k, v in vars(args).items() if k != "out"}, "results": []}
    for mode in args.modes:
        for batch_size in args.batch_sizes:
            for case in args.cases:
                row = run_case(spec, mode, batch_size, case, device, weight_dtype, args)
                report["results"].append(row)
                print(f"{mode} b{batch_size} {case}: " + (f"{row['step_time_s'] * 1e3:.1f} ms" if row["status"] == "ok" else row["status"]),
                      file=sys.stderr, flush=True)
                report["ratios"] = ratios(report["results"])
                report["targets"] = targets(report["results"], report["ratios"])
                if args.out:
                    write_json(args.out, report)
    env = report["environment"]
    print(f"{env['model']} UNet, latents {'x'.join(map(str, spec.latent_shape))}, {env['weight_dtype']}, "
          f"{env['device_name']}, torch {env['torch']}, diffusers {env['diffusers']}\n")
    print(format_table(report["results"]))
    print()
    print(format_targets(report["targets"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
