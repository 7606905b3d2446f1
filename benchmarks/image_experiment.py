"""The ambient objectives on real images: scikit-learn's 8x8 digit scans, a small
pixel-space UNet (diffusers' UNet2DModel), SDXL's noise schedule, trained with the project's
``step.AmbientObjective`` and sampled with ``sdxl_ambient.sampling`` (see ``digits.py``).

    python benchmarks/image_experiment.py            # all parts, 2 worker processes
    python benchmarks/image_experiment.py --quick    # ambient vs naive at one t_n (the test suite's check)

Part 1, clean from noisy: for each t_n, models trained on the clean images (oracle), on the noisy
images as if clean (naive), with the ambient loss, and with ambient + consistency; quality is the
Frechet distance to held-out clean images in a fixed classifier's feature space, and its confidence.
Also the loss-weight cap and the jump margin.

Part 2, copying in a fine-tune: a base model pretrained on clean digits 0-7 is fine-tuned (LoRA
through peft, and full) on 64 images of 8s and 9s, clean or noisy at t_n; each sample's top-1
similarity to the fine-tuning set and to 64 held-out 8s and 9s, and quality, for the samplers that
can finish below t_n (full, Tweedie jump, hand-off to the base model).

Part 3, consistency: the forms of the term (weight, chain steps, max delta, part of the batch,
one-sided gradient), their benefit with full sampling and the jump, and their FLOPs per step.

Writes OUT/results.json, OUT/tables.md and the PNG figures (default OUT: docs/image_results).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits as D  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN_CLASSES = tuple(range(8))
FINETUNE_CLASSES = (8, 9)


# ----------------------------------------------------------------------------- settings


def consistency_default(t_n: int) -> dict:
    """The consistency form Part 1 and Part 2 use at t_n (AmbientObjective fields)."""
    return {"consistency_weight": 1.0, "consistency_max_delta": t_n, "consistency_steps": 1, "consistency_fraction": 0.25}


# Forms compared in Part 3 besides none and the default. "shipped": what configs/lora_tn500.yaml shipped before
# these measurements (no config ships the term now).
SHIPPED = "shipped: w 1, 1 step, max delta t_n, whole batch"
SMALL_STEPS = "w 1, chain steps of 100, max delta t_n, whole batch"
SHORT_REACH = "w 1, 1 step, max delta 100, whole batch"
HEAVY = "w 10, 1 step, max delta t_n, whole batch"
LIGHT = "w 0.1, 1 step, max delta t_n, whole batch"
ONE_SIDED = "w 1, 1 step, max delta t_n, half the batch, one-sided gradient"
HALF_REACH = "w 1, 1 step, max delta t_n / 2, whole batch"
CONSISTENCY_FORMS = (SHIPPED, SMALL_STEPS, SHORT_REACH, HEAVY, LIGHT, ONE_SIDED)  # the run of record
FORMS = {"shipped": SHIPPED, "small-steps": SMALL_STEPS, "short-reach": SHORT_REACH, "heavy": HEAVY, "light": LIGHT,
         "one-sided": ONE_SIDED, "half-reach": HALF_REACH}  # --forms


def consistency_form(name: str, t_n: int) -> dict | None:
    """The AmbientObjective fields of a Part 3 form at t_n; None where the form is not run at t_n
    (it equals another form there, or is measured at one noise level only)."""
    shipped = {"consistency_weight": 1.0, "consistency_max_delta": t_n, "consistency_steps": 1, "consistency_fraction": 1.0}
    if name == SHIPPED:
        return shipped
    if name == SMALL_STEPS:  # is one reverse step across up to t_n timesteps the trouble at t_n = 500?
        return {**shipped, "consistency_steps": t_n // 100} if t_n == 500 else None
    if name == SHORT_REACH:
        return {**shipped, "consistency_max_delta": 100} if t_n == 500 else None
    if name == HEAVY:  # the 2-D toy's best weight (docs/toy_results.md)
        return {**shipped, "consistency_weight": 10.0} if t_n == 100 else None
    if name == LIGHT:
        return {**shipped, "consistency_weight": 0.1} if t_n == 500 else None
    if name == ONE_SIDED:
        return {**shipped, "consistency_fraction": 0.5, "consistency_one_sided": True} if t_n == 200 else None
    if name == HALF_REACH:  # is max delta t_n the right reach where the term helps?
        return {**shipped, "consistency_max_delta": t_n // 2} if t_n in (100, 200) else None
    raise ValueError(f"unknown consistency form {name!r}")


@dataclass
class Settings:
    t_ns: tuple = (100, 200, 500)
    seeds: tuple = (0, 1, 2)
    width: int = 16  # UNet channels at 8x8 (twice that at 4x4)
    batch_size: int = 64
    steps: int = 1500  # optimizer steps of every Part 1 / Part 3 model
    lr: float = 2e-3
    num_samples: int = 500  # samples per (model, sampler)
    sampler_step: int = 20  # DDIM step in timesteps
    jump_margin: int = 25
    margins: tuple = (0, 10, 25, 50, 100)  # jump margins measured on the ambient models (no consistency)
    oracle: bool = True  # Part 1's model trained on the clean images
    part1_consistency: bool = True  # Part 1's ambient + consistency models (the default form)
    caps: tuple = (16.0, 256.0)  # loss-weight caps measured besides the default, seed 0
    cap_t_ns: tuple = (100, 500)
    # Part 2
    base_steps: int = 3000
    finetune_per_class: int = 32
    finetune_steps: int = 1000
    finetune_batch_size: int = 32
    lora_rank: int = 8
    lora_lr: float = 5e-3
    full_lr: float = 1e-3
    finetune_seeds: tuple = (0,)
    # Part 3 forms besides "none" and the default (see consistency_form), first seed
    consistency_forms: tuple = CONSISTENCY_FORMS
    parts: tuple = ("clean", "finetune", "consistency")


QUICK = Settings(t_ns=(200,), seeds=(0,), steps=500, num_samples=300, margins=(25,), caps=(), parts=("clean",),
                 oracle=False, part1_consistency=False)


# ----------------------------------------------------------------------------- jobs


@dataclass
class Job:
    """One model to train and measure. ``data``: "oracle" (clean images), "naive" (noisy images
    as if clean), "ambient" (noisy images at t_n); ``finetune``: None, "base" (Part 2's
    pretraining), "lora" or "full"."""

    part: str
    label: str
    seed: int
    t_n: int
    data: str
    objective: dict = field(default_factory=dict)
    finetune: str | None = None
    samplers: tuple = ("full",)

    @property
    def key(self) -> str:
        return f"{self.part}|{self.label}|t_n={self.t_n}|seed={self.seed}"

    def cost(self, s: Settings) -> float:
        """Rough cost in Part 1 model trainings, for the progress bar and the job order."""
        c = self.objective
        term = 0.0
        if c.get("consistency_weight", 0) > 0:
            one = 5 if c.get("consistency_one_sided") else 7
            term = c.get("consistency_fraction", 1.0) * (one + 2 * (c.get("consistency_steps", 1) - 1)) / 3
        steps = {"base": s.base_steps, "lora": s.finetune_steps, "full": s.finetune_steps}.get(self.finetune, s.steps)
        batch = s.batch_size if self.finetune in (None, "base") else s.finetune_batch_size
        return (1 + term) * steps * batch / (s.steps * s.batch_size) + 0.1 * len(self.samplers)


def part1_jobs(s: Settings) -> list[Job]:
    """Oracle, naive, ambient and ambient + consistency models of every seed and t_n; the cap study."""
    jobs = []
    all_margins = tuple(f"jump{m}" for m in s.margins)
    for seed in s.seeds:
        if s.oracle:
            jobs.append(Job("clean", "oracle", seed, 0, "oracle"))
        for t_n in s.t_ns:
            jobs.append(Job("clean", "naive", seed, t_n, "naive"))
            jobs.append(Job("clean", "ambient", seed, t_n, "ambient", samplers=("full",) + all_margins))
            if s.part1_consistency:
                jobs.append(Job("clean", "ambient + consistency", seed, t_n, "ambient", consistency_default(t_n),
                                samplers=("full", f"jump{s.jump_margin}")))
    for cap in s.caps:
        for t_n in s.cap_t_ns:
            jobs.append(Job("cap", f"cap {cap:g}", s.seeds[0], t_n, "ambient", {"weight_cap": cap},
                            samplers=("full", f"jump{s.jump_margin}")))
    return jobs


def part3_jobs(s: Settings) -> list[Job]:
    """The consistency forms of ``consistency_form`` at the t_n each is run at (first seed)."""
    jobs = []
    for label in s.consistency_forms:
        for t_n in s.t_ns:
            objective = consistency_form(label, t_n)
            if objective is not None:
                jobs.append(Job("consistency", label, s.seeds[0], t_n, "ambient", objective,
                                samplers=("full", f"jump{s.jump_margin}")))
    return jobs


def part2_jobs(s: Settings, seed: int) -> list[Job]:
    """The fine-tunes of one base model (clean, and ambient with / without consistency at each t_n)."""
    handoff = ("full", f"jump{s.jump_margin}", f"handoff{s.jump_margin}")
    jobs = []
    for kind in ("lora", "full"):
        jobs.append(Job("finetune", f"{kind}, clean", seed, 0, "oracle", finetune=kind))
        for t_n in s.t_ns:
            jobs.append(Job("finetune", f"{kind}, ambient", seed, t_n, "ambient", finetune=kind, samplers=handoff))
            jobs.append(Job("finetune", f"{kind}, ambient + consistency", seed, t_n, "ambient", consistency_default(t_n),
                            finetune=kind, samplers=handoff))
    return jobs


# ----------------------------------------------------------------------------- the worker side


class Context:
    """What every job reads: the data, the schedule, the fixed classifier and the reference sets."""

    def __init__(self, classifier_state: dict, settings: Settings):
        torch.set_num_threads(1)
        self.s = settings
        self.ac = D.sdxl_alphas_cumprod()
        self.data = D.load_digits()
        self.classifier = D.DigitClassifier()
        self.classifier.load_state_dict(classifier_state)
        self.classifier.eval()
        self.quality = D.Quality(self.classifier, self.data.reference.images)
        self.finetune_set = self.data.train.of_classes(FINETUNE_CLASSES).first_per_class(settings.finetune_per_class)
        # 8s and 9s seen by no model (training split, after the fine-tuning set): "similar but not copied"
        self.heldout_set = self.data.train.of_classes(FINETUNE_CLASSES).first_per_class(settings.finetune_per_class,
                                                                                      skip=settings.finetune_per_class)
        self.finetune_quality = D.Quality(self.classifier, self.data.reference.of_classes(FINETUNE_CLASSES).images)
        self.mean_image = self.data.train.images.mean(0)


_CONTEXT: Context | None = None


def _init_worker(classifier_state: dict, settings: Settings) -> None:
    global _CONTEXT
    _CONTEXT = Context(classifier_state, settings)


def training_set(job: Job, ctx: Context) -> tuple[torch.Tensor, int]:
    """(observations, their t_n as the objective sees them) for a job; the noise is fixed per image."""
    if job.finetune == "base":
        images = ctx.data.train.of_classes(PRETRAIN_CLASSES).images
    elif job.finetune in ("lora", "full"):
        images = ctx.finetune_set.images
    else:
        images = ctx.data.train.images
    if job.data == "oracle":
        return images, 0
    noisy = D.observations(images, job.t_n, seed=10_000 + job.t_n, alphas_cumprod=ctx.ac)
    return noisy, (job.t_n if job.data == "ambient" else 0)


def run_job(job: Job, base_state: dict | None = None) -> dict:
    """Train the job's model and measure each of its samplers (in a worker)."""
    cpu_start = time.process_time()
    result = _train_and_measure(job, base_state)
    result["cpu_seconds"] = time.process_time() - cpu_start
    return result


def _train_and_measure(job: Job, base_state: dict | None) -> dict:
    from sdxl_ambient.step import AmbientObjective

    ctx, s = _CONTEXT, _CONTEXT.s
    observed, t_obs = training_set(job, ctx)
    unet = D.make_unet(s.width, seed=job.seed)
    params, steps, batch, lr = None, s.steps, s.batch_size, s.lr
    if job.finetune == "base":
        steps = s.base_steps
    elif job.finetune in ("lora", "full"):
        unet.load_state_dict(base_state)
        steps, batch = s.finetune_steps, s.finetune_batch_size
        lr = s.full_lr if job.finetune == "full" else s.lora_lr
        if job.finetune == "lora":
            params = D.add_lora(unet, s.lora_rank)
    objective = AmbientObjective(ctx.ac, **job.objective)
    info = D.train(unet, observed, t_obs, objective, steps=steps, batch_size=batch, lr=lr, seed=job.seed, params=params)
    result = {"job": asdict(job), "train": info}
    if job.finetune == "base":
        result["state"] = {k: v.clone() for k, v in unet.state_dict().items()}
        result["samplers"] = {"full": measure(ctx, job, D.sample(D.unet_denoiser(unet, ctx.ac), s.num_samples, ctx.ac,
                                                                      step_size=s.sampler_step))}
        return result
    base = None
    if job.finetune == "full":
        base = D.make_unet(s.width)
        base.load_state_dict(base_state)
        base.eval()
    result["samplers"] = {name: measure(ctx, job, draw(ctx, unet, job, name, base)) for name in job.samplers}
    return result


def draw(ctx: Context, unet, job: Job, sampler: str, base=None) -> torch.Tensor:
    """Samples of one sampler: "full" (DDIM to t = 0), "jumpM" (DDIM to t_n + M, then the Tweedie
    jump), "handoffM" (the model down to t_n + M, the base model below: for a LoRA the same UNet
    with its adapter switched off)."""
    from sdxl_ambient.sampling import handoff_denoiser

    s = ctx.s
    model = D.unet_denoiser(unet, ctx.ac)
    kwargs = {"step_size": s.sampler_step, "seed": 1234}
    if sampler == "full":
        return D.sample(model, s.num_samples, ctx.ac, **kwargs)
    if sampler.startswith("jump"):
        return D.sample(model, s.num_samples, ctx.ac, stop=job.t_n + int(sampler[4:]), **kwargs)
    if sampler.startswith("handoff"):
        below = job.t_n + int(sampler[7:])
        if job.finetune == "lora":
            def base_denoiser(x, t):
                with D.adapter_disabled(unet):
                    return model(x, t)
        else:
            base_denoiser = D.unet_denoiser(base, ctx.ac)
        return D.sample(handoff_denoiser(model, base_denoiser, below), s.num_samples, ctx.ac, **kwargs)
    raise ValueError(f"unknown sampler {sampler!r}")


def measure(ctx: Context, job: Job, samples: torch.Tensor) -> dict:
    """Quality, and for fine-tunes the copying measures, of one sampler's samples."""
    from sdxl_ambient.evaluation.similarity import similarity_stats, top1_similarity

    finetune = job.finetune in ("lora", "full")
    out = (ctx.finetune_quality if finetune else ctx.quality)(samples)
    out["grid"] = samples[:32].clone()
    if finetune:
        probs = ctx.classifier(samples).softmax(-1)
        out["on_target"] = float(torch.isin(probs.argmax(-1), torch.tensor(FINETUNE_CLASSES)).float().mean())
        feats = D.copy_features(samples, ctx.mean_image)
        to_train, match = top1_similarity(feats, D.copy_features(ctx.finetune_set.images, ctx.mean_image))
        to_heldout, _ = top1_similarity(feats, D.copy_features(ctx.heldout_set.images, ctx.mean_image))
        out["copy"] = {"to_finetune_set": similarity_stats(to_train), "to_heldout_set": similarity_stats(to_heldout),
                       "top1_finetune": to_train.tolist(), "top1_heldout": to_heldout.tolist(), "match_index": match.tolist()}
    return out


# ----------------------------------------------------------------------------- running


def run_all(jobs: list[Job], settings: Settings, classifier_state: dict, workers: int) -> dict[str, dict]:
    """Run the jobs on ``workers`` processes (one torch thread each; 1: a thread of this process),
    longest first; Part 2's base
    models first, and their fine-tunes as soon as each base is trained. A tqdm bar in cost units."""
    from tqdm import tqdm

    bases = [Job("finetune", "base (clean 0-7)", seed, 0, "oracle", finetune="base") for seed in settings.finetune_seeds] \
        if "finetune" in settings.parts else []
    pending_finetunes = {b.seed: part2_jobs(settings, b.seed) for b in bases}
    total = sum(j.cost(settings) for j in bases + jobs + [f for fs in pending_finetunes.values() for f in fs])
    results: dict[str, dict] = {}
    if workers == 1:  # in this process (the test suite's quick check)
        pool = cf.ThreadPoolExecutor(1, initializer=_init_worker, initargs=(classifier_state, settings))
    else:
        pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                                      initargs=(classifier_state, settings))
    with pool, \
            tqdm(total=round(total, 1), unit="model", bar_format="{l_bar}{bar}| {n:.1f}/{total} [{elapsed}<{remaining}] {postfix}") as bar:
        running = {pool.submit(run_job, b): b for b in bases}
        for job in sorted(jobs, key=lambda j: -j.cost(settings)):
            running[pool.submit(run_job, job)] = job
        while running:
            done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                job = running.pop(fut)
                result = fut.result()
                results[job.key] = result
                bar.set_postfix_str(f"{job.label}, t_n={job.t_n}, seed {job.seed}", refresh=False)
                bar.update(round(job.cost(settings), 1))
                if job.finetune == "base":
                    for ft in pending_finetunes.pop(job.seed):
                        running[pool.submit(run_job, ft, result["state"])] = ft
    return results


def step_flops(settings: Settings, fields: dict, t_n: int = 200) -> int:
    """FLOPs of one training step (forward and backward, torch.utils.flop_counter) of the digit UNet
    at the experiment's batch size with these AmbientObjective fields."""
    from torch.utils.flop_counter import FlopCounterMode

    from sdxl_ambient.step import AmbientObjective

    unet = D.make_unet(settings.width)
    y = torch.randn(settings.batch_size, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    objective = AmbientObjective(D.sdxl_alphas_cumprod(), **fields)
    with FlopCounterMode(display=False) as counter:
        losses = objective(D.unet_net(unet), y, torch.full((settings.batch_size,), t_n), generator=torch.Generator().manual_seed(0))
        losses["loss"].mean().backward()
    return counter.get_total_flops()


def consistency_flops(settings: Settings) -> list[dict]:
    """Step FLOPs of every consistency form run, and their ratio to the ambient step."""
    forms = [("none", 200, {})] + [("default", t_n, consistency_default(t_n)) for t_n in settings.t_ns]
    forms += [(label, t_n, consistency_form(label, t_n)) for label in settings.consistency_forms for t_n in settings.t_ns
              if consistency_form(label, t_n) is not None]
    forms += [("shipped, one-sided gradient", 200, {**consistency_form(SHIPPED, 200), "consistency_one_sided": True}),
              ("default, one-sided gradient", 200, {**consistency_default(200), "consistency_one_sided": True})]
    rows = [{"form": label, "t_n": t_n, "fields": fields, "flops": step_flops(settings, fields, t_n)} for label, t_n, fields in forms]
    for r in rows:
        r["ratio"] = r["flops"] / rows[0]["flops"]
    return rows


# ----------------------------------------------------------------------------- summaries


def aggregate(results: dict[str, dict]) -> dict:
    """{(part, label, t_n, sampler): {"fd": [per seed], "confidence": [...], ...}}, keyed as strings."""
    table: dict[str, dict] = {}
    for r in results.values():
        job = r["job"]
        for sampler, m in r.get("samplers", {}).items():
            key = f"{job['part']}|{job['label']}|{job['t_n']}|{sampler}"
            row = table.setdefault(key, {"fd": [], "confidence": [], "seconds": [], "seeds": []})
            row["fd"].append(m["fd"])
            row["confidence"].append(m["confidence"])
            row["seconds"].append(r["train"]["seconds"])
            row["seeds"].append(job["seed"])
            if "copy" in m:
                for k in ("on_target",):
                    row.setdefault(k, []).append(m[k])
                for k in ("to_finetune_set", "to_heldout_set"):
                    for stat in ("mean", "frac_above_0.9", "frac_above_0.95"):
                        row.setdefault(f"{k}.{stat}", []).append(m["copy"][k][stat])
    return table


def mean_spread(values: list[float], digits: int = 1) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def tables_markdown(agg: dict, settings: Settings, flops: list[dict], meta: dict) -> str:
    s = settings
    lines = [f"# Image experiment: measured tables ({meta['command']})", "",
             (f"{meta['date']}, {meta['wall_minutes']:.1f} min wall, {meta['workers']} worker processes of one torch thread, "
              f"load average before / after: {meta['load_before']} / {meta['load_after']}; {meta['versions']}; "
              f"CPU time of the jobs {meta.get('cpu_minutes', float('nan')):.1f} min, i.e. "
              f"{meta.get('cpu_minutes', float('nan')) / meta['workers']:.1f} min per worker."), "",
             ("FD: Frechet distance to held-out clean digits in the classifier's 32-d feature space (lower is better); "
              "conf: the classifier's mean largest probability. Mean ± standard deviation over seeds "
              f"{', '.join(map(str, s.seeds))} where there are several."), ""]

    def row(part, label, t_n, sampler):
        return agg.get(f"{part}|{label}|{t_n}|{sampler}")

    jump = f"jump{s.jump_margin}"
    if any(k.startswith("clean|") for k in agg):
        lines += ["## Part 1: clean samples from noisy data", "",
                  ("| t_n | oracle (clean data), full | naive, full | ambient, jump | ambient, full | "
                   "ambient + consistency, jump | ambient + consistency, full |"),
                  "|---|---|---|---|---|---|---|"]
        oracle = row("clean", "oracle", 0, "full")
        for t_n in s.t_ns:
            cells = [oracle, row("clean", "naive", t_n, "full"), row("clean", "ambient", t_n, jump), row("clean", "ambient", t_n, "full"),
                     row("clean", "ambient + consistency", t_n, jump), row("clean", "ambient + consistency", t_n, "full")]
            lines.append(f"| {t_n} | " + " | ".join(
                f"{mean_spread(c['fd'])} (conf {mean_spread(c['confidence'], 3)})" if c else "-" for c in cells) + " |")
        lines += ["", f"Jump at t_n + {s.jump_margin}. The consistency term in these rows (the default of Part 3): weight 1, "
                  + "one chain step, max delta t_n, on a quarter of the batch (consistency_fraction 0.25).", ""]
        lines += ["### Jump margin (FD of the jump from t_n + margin)", "",
                  "| model | t_n | " + " | ".join(f"+{m}" for m in s.margins) + " |", "|---|---|" + "---|" * len(s.margins)]
        for t_n in s.t_ns:
            cells = [row("clean", "ambient", t_n, f"jump{m}") for m in s.margins]
            if any(cells):
                lines.append(f"| ambient | {t_n} | " + " | ".join(mean_spread(c["fd"]) if c else "-" for c in cells) + " |")
        lines.append("")
    if s.caps:
        lines += ["### Loss-weight cap (seed 0; the default 64 is the Part 1 ambient model of seed 0)", "",
                  "| cap | t_n | jump FD | full FD |", "|---|---|---|---|"]
        for t_n in s.cap_t_ns:
            default = [row("clean", "ambient", t_n, jump), row("clean", "ambient", t_n, "full")]
            if all(default):
                lines.append(f"| 64 | {t_n} | {default[0]['fd'][0]:.1f} | {default[1]['fd'][0]:.1f} |")
            for cap in s.caps:
                j, f = row("cap", f"cap {cap:g}", t_n, jump), row("cap", f"cap {cap:g}", t_n, "full")
                if j:
                    lines.append(f"| {cap:g} | {t_n} | {j['fd'][0]:.1f} | {f['fd'][0]:.1f} |")
        lines.append("")
    if "consistency" in s.parts:
        lines += ["## Part 3: consistency forms", "",
                  ("Seed 0 (for none and the default also the mean ± sd over all seeds, from Part 1). "
                   "Cost: FLOPs of one training step over the ambient step's (torch.utils.flop_counter)."), "",
                  "| t_n | form | jump FD, seed 0 | full FD, seed 0 | jump FD, all seeds | full FD, all seeds | step FLOPs / ambient |",
                  "|---|---|---|---|---|---|---|"]
        ratio = {(r["form"], r["t_n"]): r["ratio"] for r in flops}
        for t_n in s.t_ns:
            entries = [("none", "clean", "ambient", 1.0),
                       ("default: " + ", ".join(f"{k.removeprefix('consistency_')} {v:g}" for k, v in consistency_default(t_n).items()),
                        "clean", "ambient + consistency", ratio.get(("default", t_n)))]
            entries += [(label, "consistency", label, ratio.get((label, t_n))) for label in s.consistency_forms]
            for name, part, label, cost in entries:
                j, f = row(part, label, t_n, jump), row(part, label, t_n, "full")
                if not j:
                    continue
                several = len(j["fd"]) > 1
                cost_text = f"{cost:.2f}" if cost else "-"
                lines.append(f"| {t_n} | {name} | {j['fd'][0]:.1f} | {f['fd'][0]:.1f} | "
                             f"{mean_spread(j['fd']) if several else ''} | {mean_spread(f['fd']) if several else ''} | {cost_text} |")
        lines += ["", f"### FLOPs of one training step (forward + backward, batch {s.batch_size})", "",
                  "| form | t_n | GFLOP | / ambient step |", "|---|---|---|---|"]
        lines += [f"| {r['form']} | {r['t_n']} | {r['flops'] / 1e9:.2f} | {r['ratio']:.2f} |" for r in flops]
        lines.append("")
    if any(k.startswith("finetune|") for k in agg):
        lines += ["## Part 2: copying in a fine-tune", "",
                  (f"Base: clean digits 0-7, {s.base_steps} steps. Fine-tuning set: {2 * s.finetune_per_class} images of 8 and 9 "
                   f"({s.finetune_steps} steps, batch {s.finetune_batch_size}). Copying: each sample's top-1 cosine similarity "
                   "(pixels minus the mean training image) to the fine-tuning set and to as many held-out 8s and 9s. "
                   "FD against the held-out 8s and 9s; on-target: the fraction the classifier calls 8 or 9."), "",
                  "| fine-tune | t_n | sampler | top-1 to fine-tuning set | > 0.9 | > 0.95 | top-1 to held-out | FD | on-target |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for key, r in sorted(agg.items()):
            part, label, t_n, sampler = key.split("|")
            if part != "finetune" or "to_finetune_set.mean" not in r:
                continue
            lines.append(f"| {label} | {t_n} | {sampler} | {mean_spread(r['to_finetune_set.mean'], 3)} | "
                         f"{mean_spread(r['to_finetune_set.frac_above_0.9'], 2)} | {mean_spread(r['to_finetune_set.frac_above_0.95'], 2)} | "
                         f"{mean_spread(r['to_heldout_set.mean'], 3)} | {mean_spread(r['fd'])} | {mean_spread(r['on_target'], 2)} |")
        lines += ["", f"Held-out real 8s and 9s against the fine-tuning set: {meta['heldout_baseline']}.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- figures


def to_pil(images: torch.Tensor, cell: int = 32):
    """(N, 1, 8, 8) in [-1, 1] -> PIL images (dark ink on white, as the scans)."""
    from PIL import Image

    pixels = ((1 - (images.clamp(-1, 1) + 1) / 2) * 255).round().to(torch.uint8)[:, 0].numpy()
    return [Image.fromarray(p, mode="L").resize((cell, cell), Image.NEAREST) for p in pixels]


def labelled_rows(rows: dict[str, torch.Tensor], per_row: int = 16, cell: int = 28, label_width: int = 300):
    """One row of samples per label, the label on the left."""
    from PIL import Image, ImageDraw

    from sdxl_ambient.images import image_grid

    height = cell + 4
    sheet = Image.new("RGB", (label_width + per_row * cell, height * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (label, images) in enumerate(rows.items()):
        draw.text((4, i * height + cell // 2 - 6), label, fill=(0, 0, 0))
        sheet.paste(image_grid(to_pil(images[:per_row], cell), cols=per_row), (label_width, i * height))
    return sheet


COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (23, 190, 207)]


def scatter(points: list[dict], xlabel: str, ylabel: str, size=(760, 500)):
    """Labelled points {x, y, label, group} (x > 0, on a log scale), one colour per group, with a legend."""
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 60, 16, 16, 44
    lx, ys = [math.log10(p["x"]) for p in points], [p["y"] for p in points]
    x0, x1, y0, y1 = min(lx), max(lx), min(ys), max(ys)
    pad_x, pad_y = 0.06 * (x1 - x0 or 1), 0.08 * (y1 - y0 or 1)
    x0, x1, y0, y1 = x0 - pad_x, x1 + pad_x, y0 - pad_y, y1 + pad_y
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    pw, ph = w - left - right, h - top - bottom
    draw.rectangle([left, top, left + pw, top + ph], outline=(0, 0, 0))

    def px(log_x, y):
        return left + pw * (log_x - x0) / (x1 - x0), top + ph - ph * (y - y0) / (y1 - y0)

    for k in range(6):
        lv, yv = x0 + (x1 - x0) * k / 5, y0 + (y1 - y0) * k / 5
        gx, _ = px(lv, y0)
        _, gy = px(x0, yv)
        draw.text((gx - 12, top + ph + 4), f"{10 ** lv:.3g}", fill=(0, 0, 0))
        draw.text((4, gy - 6), f"{yv:.3g}", fill=(0, 0, 0))
    draw.text((left + pw // 2 - 120, h - 18), xlabel, fill=(0, 0, 0))
    draw.text((left + 4, top + 2), ylabel, fill=(0, 0, 0))
    groups = list(dict.fromkeys(p["group"] for p in points))
    for p in points:
        colour = COLOURS[groups.index(p["group"]) % len(COLOURS)]
        cx, cy = px(math.log10(p["x"]), p["y"])
        draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=colour)
        draw.text((cx + 6, cy - 6), p["label"], fill=colour)
    for i, g in enumerate(groups):
        colour = COLOURS[i % len(COLOURS)]
        draw.rectangle([left + pw - 230, top + 20 + 14 * i, left + pw - 220, top + 30 + 14 * i], fill=colour)
        draw.text((left + pw - 214, top + 18 + 14 * i), g, fill=(0, 0, 0))
    return img


def write_figures(results: dict[str, dict], agg: dict, settings: Settings, out: Path, ctx: Context) -> list[str]:
    from sdxl_ambient.evaluation.report import histogram

    s = settings
    written = []
    by_key = {}
    for r in results.values():
        j = r["job"]
        by_key[(j["part"], j["label"], j["t_n"], j["seed"])] = r
    seed = s.seeds[0]
    jump = f"jump{s.jump_margin}"
    if any(k[0] == "clean" for k in by_key):
        for t_n in s.t_ns:
            pick = torch.randperm(len(ctx.data.train), generator=torch.Generator().manual_seed(0))[:16]
            noisy = D.observations(ctx.data.train.images, t_n, 10_000 + t_n, ctx.ac)[pick]  # as the models saw them
            rows = {"held-out clean digits (reference)": ctx.data.reference.images[pick % len(ctx.data.reference)],
                    f"noisy training data at t_n={t_n}": noisy}
            for label, sampler, name in [("oracle", "full", "oracle (clean data), full sampling"), ("naive", "full", "naive, full sampling"),
                                         ("ambient", jump, "ambient, jump"), ("ambient", "full", "ambient, full sampling"),
                                         ("ambient + consistency", jump, "ambient + consistency, jump"),
                                         ("ambient + consistency", "full", "ambient + consistency, full sampling")]:
                r = by_key.get(("clean", label, 0 if label == "oracle" else t_n, seed))
                if r and sampler in r["samplers"]:
                    fd = r["samplers"][sampler]["fd"]
                    rows[f"{name} (FD {fd:.1f})"] = r["samplers"][sampler]["grid"]
            path = out / f"part1_samples_tn{t_n}.png"
            labelled_rows(rows).save(path)
            written.append(path.name)
    if any(k[0] == "consistency" for k in by_key):
        for t_n in s.t_ns:
            rows = {}
            for (part, label, tn, sd), r in sorted(by_key.items(), key=lambda kv: kv[0][1]):
                if tn == t_n and sd == seed and (part == "consistency" or label in ("ambient", "ambient + consistency") and part == "clean"):
                    for sampler in ("full", jump):
                        name = "none" if label == "ambient" else ("default" if label == "ambient + consistency" else label)
                        rows[f"{name}, {sampler} (FD {r['samplers'][sampler]['fd']:.1f})"] = r["samplers"][sampler]["grid"]
            path = out / f"part3_samples_tn{t_n}.png"
            labelled_rows(rows, label_width=420).save(path)
            written.append(path.name)
    finetunes = {k: r for k, r in by_key.items() if k[0] == "finetune" and k[1] != "base (clean 0-7)"}
    if finetunes:
        fseed = s.finetune_seeds[0]
        for kind in ("lora", "full"):
            rows = {"fine-tuning set (8s and 9s)": ctx.finetune_set.images[torch.arange(0, 64, 4)],
                    "held-out 8s and 9s": ctx.heldout_set.images[torch.arange(0, 64, 4)]}
            hist = {}
            for (_, label, t_n, sd), r in sorted(finetunes.items(), key=lambda kv: (kv[0][2], kv[0][1])):
                if sd != fseed or not label.startswith(kind):
                    continue
                for sampler, m in r["samplers"].items():
                    name = f"{label.split(', ', 1)[1]}, t_n={t_n}, {sampler}"
                    rows[f"{name} (top-1 {m['copy']['to_finetune_set']['mean']:.2f}, FD {m['fd']:.0f})"] = m["grid"]
                    if "consistency" not in label and (t_n == 0 or sampler == jump):  # the clean fine-tune, the jump
                        hist[name] = m["copy"]["top1_finetune"]
            hist["held-out 8s and 9s (real)"] = ctx.heldout_baseline
            path = out / f"part2_samples_{kind}.png"
            labelled_rows(rows, label_width=380).save(path)
            written.append(path.name)
            path = out / f"part2_similarity_{kind}.png"
            histogram(hist, lo=0.0, hi=1.0, bins=40, size=(760, 420),
                      xlabel=f"{kind}: top-1 cosine similarity to the fine-tuning set").save(path)
            written.append(path.name)
        for kind in ("lora", "full"):
            points = []
            for key, r in agg.items():
                part, label, t_n, sampler = key.split("|")
                if part == "finetune" and label.startswith(kind) and "to_finetune_set.mean" in r:
                    group = "clean fine-tune" if int(t_n) == 0 else \
                        f"{label.split(', ', 1)[1]}, {sampler.rstrip('0123456789')}"
                    points.append({"x": statistics.mean(r["fd"]), "y": statistics.mean(r["to_finetune_set.mean"]),
                                   "label": "" if int(t_n) == 0 else str(t_n), "group": group})
            points.append({"x": ctx.heldout_fd, "y": statistics.mean(ctx.heldout_baseline), "label": "",
                           "group": "held-out real 8s and 9s"})
            path = out / f"part2_tradeoff_{kind}.png"
            scatter(points, "FD to held-out 8s and 9s, log scale (lower is better); labels: t_n",
                    f"{kind}: mean top-1 similarity to the fine-tuning set (copying)").save(path)
            written.append(path.name)
    return written


# ----------------------------------------------------------------------------- main


def report(out: Path, settings: Settings, results: dict[str, dict], meta: dict) -> list[str]:
    """tables.md, results.json and the figures in ``out``; returns the files written."""
    from sdxl_ambient.evaluation.similarity import similarity_stats, top1_similarity

    data = D.load_digits()
    classifier = D.train_classifier(data.classifier)
    ctx = Context(classifier.state_dict(), settings)
    baseline, _ = top1_similarity(D.copy_features(ctx.heldout_set.images, ctx.mean_image),
                                  D.copy_features(ctx.finetune_set.images, ctx.mean_image))
    ctx.heldout_baseline = baseline.tolist()
    ctx.heldout_fd = ctx.finetune_quality(ctx.heldout_set.images)["fd"]
    stats = similarity_stats(baseline)
    real = ctx.quality(data.train.images[torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))[:settings.num_samples]])
    accuracy = float((classifier(data.reference.images).argmax(-1) == data.reference.labels).float().mean())
    meta = {**meta, "heldout_baseline": (f"top-1 mean {stats['mean']:.3f}, > 0.9 {stats['frac_above_0.9']:.2f}, "
                                         f"max {stats['max']:.3f}; FD {ctx.heldout_fd:.1f} (64 images, so a higher floor than 500 samples)"),
            "real_training_images": {"fd": real["fd"], "confidence": real["confidence"]}, "classifier_accuracy_on_reference": accuracy}
    agg = aggregate(results)
    flops = consistency_flops(settings) if "consistency" in settings.parts else []
    figures = write_figures(results, agg, settings, out, ctx)
    markdown = tables_markdown(agg, settings, flops, meta)
    markdown += (f"\nReal training images against the reference: FD {real['fd']:.1f}, conf {real['confidence']:.3f} (the floor). "
                 f"Classifier accuracy on the reference images: {accuracy:.3f}.\n")
    (out / "tables.md").write_text(markdown)
    payload = {"settings": asdict(settings), "meta": meta, "flops": flops, "aggregate": agg,
               "results": {k: {**{kk: vv for kk, vv in r.items() if kk != "samplers"},
                               "samplers": {n: {kk: vv for kk, vv in m.items() if kk != "grid"} for n, m in r.get("samplers", {}).items()}}
                           for k, r in results.items()}}
    (out / "results.json").write_text(json.dumps(payload, indent=1, default=str))
    print(markdown)
    return ["tables.md", "results.json", *figures]


def main(argv=None, settings: Settings | None = None) -> int:
    """The command; ``settings`` replaces the built-in ones (e.g. a smaller run to try the code)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ambient vs naive at t_n = 200 only (the test suite's check)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes, one torch thread each")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default docs/image_results; with --quick outputs/image_experiment_quick)")
    parser.add_argument("--parts", nargs="+", choices=("clean", "finetune", "consistency"), default=None)
    parser.add_argument("--forms", nargs="+", choices=sorted(FORMS), default=None,
                        help="Part 3's forms besides none and the default (default: those of the run of record)")
    parser.add_argument("--report-only", action="store_true", help="rewrite tables and figures from OUT/raw.pt")
    args = parser.parse_args(argv)
    settings = settings or (QUICK if args.quick else Settings())
    if args.parts:
        settings = replace(settings, parts=tuple(args.parts))
    if args.forms:
        settings = replace(settings, consistency_forms=tuple(FORMS[f] for f in args.forms))
    out = args.out or (ROOT / "outputs" / "image_experiment_quick" if args.quick else ROOT / "docs" / "image_results")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    raw = out / "raw.pt"
    if args.report_only:
        saved = torch.load(raw, weights_only=True)
        settings = Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved["settings"].items()})
        results, meta = saved["results"], saved["meta"]
    else:
        start, load_before = time.perf_counter(), os.getloadavg()
        classifier = D.train_classifier(D.load_digits().classifier)
        jobs = part1_jobs(settings) if "clean" in settings.parts else []
        if "consistency" in settings.parts:
            jobs += part3_jobs(settings)
        results = run_all(jobs, settings, classifier.state_dict(), args.workers)
        meta = {"command": "python benchmarks/image_experiment.py" + (" --quick" if args.quick else ""),
                "date": time.strftime("%Y-%m-%d"), "wall_minutes": (time.perf_counter() - start) / 60, "workers": args.workers,
                "load_before": " ".join(f"{x:.2f}" for x in load_before), "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg()),
                "versions": f"Python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPUs",
                "cpu_minutes": sum(r["cpu_seconds"] for r in results.values()) / 60}
        for r in results.values():
            r.pop("state", None)
        torch.save({"settings": asdict(settings), "results": results, "meta": meta}, raw)
    written = report(out, settings, results, meta)
    print(f"wrote {', '.join(str(out / f) for f in written)}, {raw}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
