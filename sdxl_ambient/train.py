"""The training loop: `accelerate launch train_sdxl_ambient.py --config configs/NAME.yaml`.

``setup`` builds a :class:`Run` (accelerator, SDXL parts, the noisy-latent cache, what trains,
optimizer, LR schedule, EMA, objective, generator); ``train`` is the loop, read top to bottom;
each phase of a step (forward and backward, optimizer step, logging, saving, stopping) is one
function of the run. The objective of one step is ``step.AmbientObjective``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from sdxl_ambient import checkpointing
from sdxl_ambient.config import RESUME_RESOLVED_FLAGS, RESUME_SAFE_FLAGS, TrainConfig, input_paths, load_train_config
from sdxl_ambient.durable import TEMPORARY, atomic_write, write_failure
from sdxl_ambient.errors import ReportedElsewhere, UserError, exit_code_of
from sdxl_ambient.files import (
    LORA_FILES,
    LORA_WEIGHT_NAME,
    MODEL_CARD,
    MODEL_INDEX,
    PIPELINE_TMP_PREFIX,
    SAMPLES_DIR,
    SDXL_PARTS,
    SETTINGS_FILE,
    VALIDATION_DIR,
)
from sdxl_ambient.outputs import OutputFolder, check_apart, disk_errors
from sdxl_ambient.step import HARMFUL_CONSISTENCY_LEVEL, AmbientObjective, conditioned_unet
from sdxl_ambient.text import text_embeddings

logger = logging.getLogger("sdxl_ambient")
RESULT_FILES = (LORA_WEIGHT_NAME, MODEL_INDEX, SETTINGS_FILE)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # save at the next step, then exit with 128 + the signal's number
EXIT_STOPPED = 128 + signal.SIGTERM  # another process's signal stopped this one
CONSTANT_SCHEDULES = ("constant", "constant_with_warmup")  # their learning rates do not depend on the run's length


# ----------------------------------------------------------------------------- set-up helpers


def inside_output(flags, folder) -> str | None:
    """The top-level name under OUTPUT_DIR of a folder that lies inside it, else None."""
    out, path = Path(flags.output_dir).resolve(), (Path(flags.output_dir) / folder).resolve()
    return path.relative_to(out).parts[0] if path != out and path.is_relative_to(out) else None


def output_folder(flags, cache_dir: Path) -> OutputFolder:
    """The output folder and what a training run writes at its top: settings, card, samples,
    validation grids, checkpoints, the weights (LoRA files or a pipeline), the temporary names of
    files being written, and the logs and latent cache when they lie inside it."""
    writes = [SETTINGS_FILE, MODEL_CARD, SAMPLES_DIR, VALIDATION_DIR, "checkpoint-*", ".tmp-checkpoint-*", TEMPORARY]
    writes += list(LORA_FILES) if flags.finetune == "lora" else [MODEL_INDEX, *SDXL_PARTS, f"{PIPELINE_TMP_PREFIX}*"]
    writes += [name for name in (inside_output(flags, flags.logging_dir), inside_output(flags, cache_dir)) if name]
    return OutputFolder(flags.output_dir, command="train", writes=writes)


def check_output_dir(flags, folder: OutputFolder, resume_path) -> None:
    """Refuse files training did not write (always where it writes, else unless
    --overwrite_output_dir) and, unless asked to write over them or resuming a checkpoint in it, a
    finished or running run's results. A checkpoint resumed from outside the folder continues its
    own run there: the folder is checked as for a new run."""
    folder.check_foreign(flags.overwrite_output_dir)
    out = folder.path
    inside = resume_path is not None and resume_path.resolve().parent == out.resolve()
    if flags.overwrite_output_dir and inside:
        raise UserError(f"--overwrite_output_dir removes {resume_path}, which --resume_from_checkpoint "
                        f"{flags.resume_from_checkpoint} resumes from: give one of the two")
    if flags.overwrite_output_dir or inside or not out.is_dir():
        return
    found = [name for name in RESULT_FILES if (out / name).exists()] + [p.name for p in checkpointing.list_checkpoints(out)]
    if resume_path is not None and found:  # the run goes on in a folder that holds another run's results
        raise UserError(f"--output_dir {out} already holds another run's results ({', '.join(found[:3])}), and "
                        f"--resume_from_checkpoint {resume_path} lies outside it: choose another --output_dir, or pass "
                        "--overwrite_output_dir to replace them")
    if flags.resume_from_checkpoint:  # restarting before the first checkpoint: only finished weights are in the way
        found = [name for name in found if name != SETTINGS_FILE]
    if found:
        raise UserError(f"--output_dir {out} already holds {found[:3]}: pass --resume_from_checkpoint latest to continue, "
                        "--overwrite_output_dir to write over it, or choose another folder")


def check_cache_place(flags, cache_dir: Path) -> None:
    """The latent cache goes to a folder of its own: apart from the inputs, and not the output folder
    itself nor a folder containing it."""
    check_apart("--cache_dir", cache_dir, input_paths(flags))
    out, cache = Path(flags.output_dir).resolve(), cache_dir.resolve()
    if out == cache or out.is_relative_to(cache):
        raise UserError(f"--cache_dir {cache_dir} {'is' if out == cache else 'contains'} --output_dir {flags.output_dir}: "
                        "give the latent cache a folder of its own (the default is OUTPUT_DIR/latent_cache)")


def make_accelerator(flags):
    from datetime import timedelta

    from accelerate import Accelerator, DistributedType
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration

    log_with = None if flags.report_to in (None, "none") else flags.report_to
    handlers = [InitProcessGroupKwargs(timeout=timedelta(seconds=flags.ddp_timeout))]  # ranks wait while rank 0 builds the cache
    if flags.train_text_encoder:  # SDXL reads the text encoders' penultimate layer: LoRA on their last layer gets no gradient
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    accelerator = Accelerator(
        kwargs_handlers=handlers,
        gradient_accumulation_steps=flags.gradient_accumulation_steps,
        mixed_precision=flags.mixed_precision,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=flags.output_dir, logging_dir=os.path.join(flags.output_dir, flags.logging_dir)),
    )
    if accelerator.distributed_type == DistributedType.FSDP:
        raise UserError("FSDP is not supported yet (sharded parameters break EMA, validation and the weight hooks): "
                        "use DDP (configs/accelerate_ddp.yaml) or DeepSpeed ZeRO-2 (configs/accelerate_deepspeed_zero2.yaml)")
    dynamo = getattr(accelerator.state, "dynamo_plugin", None)
    if flags.torch_compile and dynamo is not None and str(getattr(dynamo.backend, "value", dynamo.backend)).lower() != "no":
        raise UserError("--torch_compile compiles the UNet's blocks itself: launch with accelerate's --dynamo_backend no "
                        "(or leave out --torch_compile), or the whole model is compiled twice")
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        if flags.train_text_encoder:
            raise UserError("--train_text_encoder trains three models, and DeepSpeed takes one: use DDP for it")
        # the data loader is ours, not prepared: DeepSpeed must be told the micro-batch
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = flags.train_batch_size
    return accelerator


def resolve_seed(flags, resume_path, accelerator) -> int:
    """The run's seed: the flag, the resumed run's, or a fresh random one drawn on the main process
    and shared, so every rank agrees."""
    if flags.seed is not None:
        return flags.seed
    if resume_path is not None:
        return checkpointing.read_state(resume_path)["seed"]
    return shared(accelerator, int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF)


def place_frozen(flags, components, device, weight_dtype) -> None:
    """Put the (frozen) encoders on the device: the VAE in fp32 unless a separate (fixed) VAE was
    given, the text encoders in the training precision."""
    vae_dtype = weight_dtype if flags.pretrained_vae_model_name_or_path else torch.float32
    components.vae.to(device, dtype=vae_dtype)
    for te in (components.text_encoder, components.text_encoder_2):
        te.to(device, dtype=weight_dtype)


@torch.no_grad()
def encode_empty_prompt(components, device) -> dict:
    """The empty prompt as both tokenizers' ids and its SDXL embeddings, encoded once. As in diffusers'
    scripts, a dropped caption is the empty string through both text encoders, the pooled embedding
    included (not zeros)."""
    from sdxl_ambient.text import tokenize

    ids_one, ids_two = tokenize(components.tokenizer, [""]), tokenize(components.tokenizer_2, [""])
    embeds, pooled = text_embeddings(components.text_encoder, components.text_encoder_2, ids_one, ids_two)
    # as the cache stores captions' embeddings: float16
    return {"input_ids_one": ids_one.to(device), "input_ids_two": ids_two.to(device),
            "prompt_embeds": embeds.to(device, torch.float16), "pooled_prompt_embeds": pooled.to(device, torch.float16)}


def setup_trainable(flags, components, device, weight_dtype):
    """Freeze the base model, add what trains (LoRA adapters or the whole UNet); returns the
    trained models (UNet first) and their trainable parameters."""
    from sdxl_ambient import models

    unet, text_encoders = components.unet, (components.text_encoder, components.text_encoder_2)
    if flags.finetune == "full":
        unet.requires_grad_(True)
        unet.to(device, dtype=torch.float32)
    else:
        unet.to(device, dtype=weight_dtype)
        models.add_unet_lora(unet, rank=flags.rank, alpha=flags.lora_alpha, use_dora=flags.use_dora)
    if flags.train_text_encoder:
        for te in text_encoders:
            models.add_text_encoder_lora(te, rank=flags.rank, alpha=flags.lora_alpha, use_dora=flags.use_dora)
    trained = [unet] + (list(text_encoders) if flags.train_text_encoder else [])
    if weight_dtype != torch.float32:  # frozen weights in half precision, trained ones in fp32
        models.cast_training_params(trained, dtype=torch.float32)
    if flags.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if flags.train_text_encoder:
            for te in text_encoders:
                te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if flags.enable_xformers_memory_efficient_attention:
        try:
            unet.enable_xformers_memory_efficient_attention()
        except Exception as exc:  # xformers missing or unusable on this device
            raise UserError(f"--enable_xformers_memory_efficient_attention: xformers is not usable here ({exc})") from None
    return trained, trainable_params(trained)


def compile_blocks(flags, unet, latent_shapes, objective, validating: bool) -> None:
    """--torch_compile: compile the UNet's repeated blocks with static shapes, room for one graph per
    input shape a step feeds them (each bucket's batch, its last partial batch, the consistency
    term's batches) plus validation's. The batches stay what they are in eager mode."""
    from sdxl_ambient import compile as fast

    shapes = fast.step_shapes(latent_shapes, flags.train_batch_size, consistency=objective.consistency_weight > 0,
                              drop_last=False, consistency_batches=objective.consistency_batches)
    # room for a graph per block and shape: dynamo keeps its graphs per code object, which all blocks share
    fast.configure_static_shapes(len(shapes) + (2 if validating else 0), len(fast.repeated_blocks(unet)))
    count = fast.compile_unet(unet, mode=flags.torch_compile_mode)
    logger.info("--torch_compile: compiled %d repeated blocks for %d input shapes (the first steps of each shape compile)",
                count, len(shapes))


def trainable_params(models) -> list:
    """The parameters of ``models`` that train, in order."""
    return [p for m in models for p in m.parameters() if p.requires_grad]


def param_groups(trained: list, learning_rate: float, text_encoder_lr: float) -> list[dict]:
    """The optimizer's parameter groups: the UNet's trainable parameters, then the text encoders' (if they train)."""
    return [{"params": trainable_params(trained[:1]), "lr": learning_rate},
            {"params": trainable_params(trained[1:]), "lr": text_encoder_lr}]


class NonFiniteGuard:
    """Skips updates whose loss or gradients are not finite, without a host sync per step.

    The fused AdamW reads ``found_inf`` on the device and leaves weights and moments untouched
    when it is set (the mechanism torch's GradScaler uses). The flags are read back every
    ``limit`` steps: each skipped step gets a warning, and ``limit`` in a row stop the run.
    Optimizers that cannot skip on device (8-bit Adam, Prodigy, Adafactor) are checked on the host
    every step instead and their step is not called. Where
    something else owns the update (``external``: fp16's GradScaler, DeepSpeed), only non-finite
    losses are counted and stopped on. A skipped update still advances the LR schedule and EMA."""

    def __init__(self, optimizer, limit: int, external: bool):
        self.optimizer, self.limit, self.external = optimizer, limit, external
        self.on_device = getattr(optimizer, "_step_supports_amp_scaling", False) and not external
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.in_row = 0

    def before_step(self, step: int, loss: torch.Tensor, grad_norm) -> torch.Tensor:
        """Flag this update (a 0-d bool tensor) and arm the optimizer to skip it; returns the flag."""
        bad = ~torch.isfinite(loss.detach())
        if grad_norm is not None and not self.external:
            bad = bad | ~torch.isfinite(torch.as_tensor(grad_norm, device=bad.device))
        if self.on_device:
            self.optimizer.found_inf = bad.float()
        self.pending.append((step, bad))
        return bad

    def must_skip_on_host(self, bad: torch.Tensor) -> bool:
        return not self.on_device and not self.external and bool(bad.item())

    def due(self) -> bool:
        return len(self.pending) >= self.limit

    def check(self) -> bool:
        """Read the pending flags (one sync), warn for each one; True when the run must stop."""
        if not self.pending:
            return False
        flags = torch.stack([b for _, b in self.pending]).tolist()
        stop = False
        what = "non-finite loss" if self.external else "non-finite loss or gradients"
        done = "" if self.external else ": update skipped"
        for (step, _), bad in zip(self.pending, flags):
            self.in_row = self.in_row + 1 if bad else 0
            if bad:
                logger.warning("%s at step %d (%d in a row)%s", what, step, self.in_row, done)
            stop = stop or self.in_row >= self.limit
        self.pending.clear()
        return stop


class LossMeter:
    """Per-step loss terms summed on the device; read back (one sync) only when logged."""

    def __init__(self):
        self.total, self.count = None, None

    def add(self, terms: torch.Tensor, ok: torch.Tensor) -> None:
        terms, ok = torch.where(ok, terms, torch.zeros_like(terms)), ok.float()
        self.total = terms if self.total is None else self.total + terms
        self.count = ok if self.count is None else self.count + ok

    def mean(self, accelerator) -> list[float] | None:
        if self.total is None:
            return None
        values = accelerator.reduce(self.total / self.count.clamp(min=1), "mean").tolist()
        self.total, self.count = None, None
        return values


# ----------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Resolved:
    """Values computed once at start-up from the flags and what they point to; saved as such. The
    data sources' counts and the held-out examples are known once the cache is loaded
    (:meth:`with_loaded_data`)."""

    seed: int
    ambient_timestep: int  # the lowest t_n with data (the one t_n when all examples share it)
    learning_rate: float
    objective: dict
    text_encoder_lr: float | None = None  # when the text encoders train
    data_sources: list = field(default_factory=list)  # per source: name, examples, repeats, t_n
    held_out: int = 0  # examples held out for the validation loss

    def with_loaded_data(self, data_sources: list, held_out: int) -> Resolved:
        return replace(self, data_sources=data_sources, held_out=held_out)

    def as_dict(self) -> dict:
        out = {"seed": self.seed, "ambient_timestep": self.ambient_timestep, "learning_rate": self.learning_rate}
        if self.text_encoder_lr is not None:
            out["text_encoder_lr"] = self.text_encoder_lr
        return {**out, **self.objective, "data_sources": self.data_sources, "held_out_examples": self.held_out}


def resolve(cfg: TrainConfig, levels: list[int], resume_path, accelerator) -> Resolved:
    """The seed, learning rates and objective defaults for data at these t_n, before any model loads."""
    flags = cfg.flags
    scale = flags.gradient_accumulation_steps * flags.train_batch_size * accelerator.num_processes if flags.scale_lr else 1
    learning_rate, text_encoder_lr = cfg.optimizer.learning_rates(flags.learning_rate, scale)
    return Resolved(seed=resolve_seed(flags, resume_path, accelerator), ambient_timestep=levels[0],
                    learning_rate=learning_rate, objective=cfg.objective.resolved(levels),
                    text_encoder_lr=text_encoder_lr if flags.train_text_encoder else None)


# Resolved values known only once the data is loaded: the flags and the data digest decide them already.
LOADED_ONLY = ("data_sources", "held_out_examples")


def run_fingerprint(cfg: TrainConfig, resolved: Resolved, latent_data: list[dict], accelerator) -> dict:
    """What makes this run's weights, which a resume compares: every flag not safe to change
    (``config.RESUME_SAFE_FLAGS``) as given, the others through what they resolve to (the seed,
    learning rates, objective, precision), the latent data (each cache's examples, levels and noise,
    and how its images became latents), the schedule's length where the learning rate depends on
    it, and the number of processes."""
    from sdxl_ambient.models import model_identity

    flags = cfg.flags
    given = {k: v for k, v in vars(flags).items() if k not in RESUME_SAFE_FLAGS | RESUME_RESOLVED_FLAGS}
    # the models by what they are (files or Hub id and revision), not where: a moved folder is the same model
    given["pretrained_model_name_or_path"] = model_identity(flags.pretrained_model_name_or_path, flags.revision, flags.variant)
    given["pretrained_vae_model_name_or_path"] = model_identity(flags.pretrained_vae_model_name_or_path)
    if flags.lr_scheduler not in CONSTANT_SCHEDULES:
        given.update(max_train_steps=flags.max_train_steps, num_train_epochs=flags.num_train_epochs)
    computed = {k: v for k, v in resolved.as_dict().items() if k not in LOADED_ONLY}
    named = {f"--{k}": v for k, v in {**given, **computed, "mixed_precision": accelerator.mixed_precision}.items()}
    for n, part in enumerate(latent_data):  # how each cache's images became latents (a dataset's own settings)
        where = "" if len(latent_data) == 1 else f" (latent data {n + 1})"
        named.update({f"--{key}{where}": value for key, value in part.items() if key != "latent_data"})
    digests = [part["latent_data"] for part in latent_data]
    return {**named, "training data and its noise": digests, "processes": accelerator.num_processes}


@dataclass
class Run:
    """Everything a training run holds."""

    cfg: TrainConfig
    resolved: Resolved
    accelerator: Any
    components: Any
    cache: Any
    sampler: Any
    loader: Any
    trained: list  # the prepared (possibly wrapped) models that train, the UNet first
    params: list
    optimizer: Any
    lr_scheduler: Any
    ema: Any
    objective: AmbientObjective
    generator: torch.Generator
    guard: NonFiniteGuard
    weight_dtype: torch.dtype
    steps_per_epoch: int
    max_steps: int
    resume_path: Path | None
    output: OutputFolder
    fingerprint: dict
    val_prompts: dict | None = None
    empty_prompt: dict | None = None  # with --proportion_empty_prompts
    held_out: Any = None  # heldout.HeldOutLoss with --validation_split
    hub_repo: str | None = None  # with --push_to_hub, on the main process: the repo, created at the start
    pusher: Any = None
    stop_signal: list = field(default_factory=list)
    saved_step: int = -1  # the step of the last checkpoint this run saved
    # the last completed step and the step generator's state then: what a save after a failure
    # restores (None while an update is being applied, when no consistent state exists)
    restart_point: tuple[int, torch.Tensor] | None = None

    @property
    def flags(self):
        return self.cfg.flags

    @property
    def text_models(self):
        """The text encoders to run on token ids when they train (prepared), else None (cached embeddings)."""
        return tuple(self.trained[1:]) if self.flags.train_text_encoder else None


def on_main_process(accelerator, check, *args):
    """``check(*args)`` on the main process; a :class:`UserError` there is raised on every process."""
    error, value = None, None
    if accelerator.is_main_process:
        try:
            value = check(*args)
        except UserError as exc:
            error = str(exc)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        error = broadcast_object_list([error])[0]
    if error is not None:
        raise UserError(error) if accelerator.is_main_process else ReportedElsewhere(error)
    return value


def check_inputs(cfg: TrainConfig, output: OutputFolder, resume_path, held: contextlib.ExitStack):
    """Everything that needs no model, before any loads (main process): the output and cache folders
    (locked for the run's life, in ``held``; a complete cache is only read and not locked), the model
    folder's files, the checkpoint's files, every image and caption, and the objective for the data's
    levels (the consistency term needs a noisy example). Nothing is written but the locks.
    Returns the checked images of the image sources (None when every source is a noisy-latent
    dataset, used as is) and the planned data (:class:`cache.PlannedData`)."""
    from sdxl_ambient import cache as caches
    from sdxl_ambient import models
    from sdxl_ambient.data import load_training_images

    flags, sources = cfg.flags, list(cfg.sources)
    own_cache = bool(caches.image_sources(sources))
    cache = caches.cache_folder(cfg.cache.cache_dir)
    check_apart("--output_dir", flags.output_dir, input_paths(flags))
    if own_cache:
        check_cache_place(flags, cfg.cache.cache_dir)
    held.enter_context(output.locked())
    check_output_dir(flags, output, resume_path)
    if own_cache:
        if not caches.is_complete(cfg.cache.cache_dir):  # a complete cache is only read: runs may share it
            held.enter_context(cache.locked())
        cache.check_foreign(overwrite=False, overwrite_flag=None)  # nothing but a latent cache
    models.check_pipeline_files(flags.pretrained_model_name_or_path, revision=flags.revision, variant=flags.variant)
    if resume_path is not None:
        checkpointing.check_files(resume_path)
    images = None
    if own_cache:
        images = load_training_images(caches.image_sources(sources), cfg.data, prefix_keys=len(sources) > 1)
    planned = caches.plan_data(sources, cfg.data, cfg.cache, images)
    cfg.objective.check_timestep(planned.levels)
    return images, planned


def check_resume_and_hub(cfg: TrainConfig, resolved: Resolved, planned, images, resume_path, accelerator):
    """(main process) That the checkpoint to resume belongs to this run; that a latent cache already in
    --cache_dir was made with this run's settings and data (a resume names the differing flags first);
    then, with --push_to_hub, the Hub repo (checked and created once all else passed). Returns the repo, or None."""
    from sdxl_ambient import hub
    from sdxl_ambient.cache import check_cache_dir, planned_settings

    flags = cfg.flags
    if resume_path is not None:
        if planned.fingerprint is None:
            raise UserError(f"--resume_from_checkpoint {resume_path}: the latent cache it was trained on is not in "
                            f"--cache_dir {cfg.cache.cache_dir}, and a new one would carry new noise: give the "
                            "--cache_dir that holds it (or the --noise_seed it was made with), or start a new run")
        checkpointing.check_resumable(resume_path, run_fingerprint(cfg, resolved, planned.fingerprint, accelerator))
    if images is not None:  # the run's own cache, to be reused or completed: refused now rather than once the models load
        check_cache_dir(cfg.cache, planned_settings(cfg.data, flags.pretrained_model_name_or_path,
                                                    flags.pretrained_vae_model_name_or_path, flags.revision, flags.variant),
                        images)
    if flags.push_to_hub:
        return hub.prepare_repo(hub.default_repo_id(flags.hub_model_id, flags.output_dir), private=flags.hub_private_repo)
    return None


def shared(accelerator, value):
    """The main process's ``value`` on every process."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def setup(cfg: TrainConfig, held: contextlib.ExitStack) -> Run:
    """Everything before the first step, in order: every input is checked before any model loads,
    and nothing is written before the checks pass (the folders' locks go to ``held``)."""
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    from sdxl_ambient import heldout, models, validation
    from sdxl_ambient.cache import BucketBatchSampler, prepare_cache

    # every input checked, the values resolved, before any model loads (the checks on the main process)
    flags = cfg.flags
    accelerator = make_accelerator(flags)
    resume_path = checkpointing.resolve_checkpoint(flags.resume_from_checkpoint, flags.output_dir)
    output = output_folder(flags, cfg.cache.cache_dir)
    images, planned = on_main_process(accelerator, check_inputs, cfg, output, resume_path, held) or (None, None)
    resolved = resolve(cfg, shared(accelerator, planned.levels if planned else None), resume_path, accelerator)
    hub_repo = on_main_process(accelerator, check_resume_and_hub, cfg, resolved, planned, images, resume_path, accelerator)
    set_seed(resolved.seed)
    if flags.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    # SDXL parts and the noisy-latent cache (the only data the loop ever sees), less the held-out examples
    components = models.load_components(flags.pretrained_model_name_or_path, revision=flags.revision, variant=flags.variant,
                                        pretrained_vae_model_name_or_path=flags.pretrained_vae_model_name_or_path,
                                        unet_dtype=weight_dtype if flags.finetune == "lora" else None,
                                        text_encoder_dtype=weight_dtype)  # frozen weights loaded as they train
    if flags.prediction_type:
        components.noise_scheduler.register_to_config(prediction_type=flags.prediction_type)
    place_frozen(flags, components, accelerator.device, weight_dtype)
    with disk_errors(cfg.cache.cache_dir, then="run the same command again (the shards written are kept)"):
        cache = prepare_cache(list(cfg.sources), cfg.data, cfg.cache, components, accelerator, images=images)
    levels = cache.levels  # of every example, held out or not
    held_out = None
    if cfg.held_out is not None:  # the same examples in every run on this data
        chosen = heldout.choose(cache.examples(), cfg.held_out.split)
        held_out = heldout.HeldOutLoss([(cache.parts[n].cache, i) for n, i in sorted(chosen)], flags.train_batch_size)
        cache = cache.without(chosen)
    resolved = resolved.with_loaded_data(cache.summary(), len(held_out) if held_out is not None else 0)
    objective = cfg.objective.build(levels, components.noise_scheduler, accelerator.device)
    val_prompts = validation.encode_prompts(components, cfg.validation) if cfg.validation else None
    empty_prompt = encode_empty_prompt(components, accelerator.device) if flags.proportion_empty_prompts > 0 else None
    if not flags.train_text_encoder:  # the cache holds the embeddings: free the device
        components.text_encoder.to("cpu")
        components.text_encoder_2.to("cpu")

    # what trains, the optimizer and the LR schedule
    trained, params = setup_trainable(flags, components, accelerator.device, weight_dtype)
    if flags.torch_compile:
        compile_blocks(flags, components.unet, cache.latent_shapes(), objective,
                       validating=cfg.validation is not None or held_out is not None)
    optimizer = cfg.optimizer.build(param_groups(trained, resolved.learning_rate,
                                                 resolved.text_encoder_lr or resolved.learning_rate))
    ema = None
    if flags.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=flags.ema_decay, foreach=True)
        ema.to(accelerator.device)

    # the data order is ours (seeded by epoch, sharded by process, resumable), so the loader is not prepared
    sampler = BucketBatchSampler(cache.latent_shapes(), flags.train_batch_size, seed=resolved.seed,
                                 num_replicas=accelerator.num_processes, rank=accelerator.process_index,
                                 accumulation=flags.gradient_accumulation_steps)
    loader = torch.utils.data.DataLoader(cache, batch_sampler=sampler, num_workers=flags.dataloader_num_workers,
                                         pin_memory=accelerator.device.type == "cuda")
    steps_per_epoch = len(sampler) // flags.gradient_accumulation_steps
    max_steps = flags.max_train_steps or flags.num_train_epochs * steps_per_epoch
    lr_scheduler = get_scheduler(flags.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=flags.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes)
    prepared = accelerator.prepare(*trained, optimizer, lr_scheduler)
    trained, (optimizer, lr_scheduler) = list(prepared[: len(trained)]), prepared[len(trained):]
    unwrapped = [accelerator.unwrap_model(m) for m in trained]
    models.register_checkpoint_hooks(accelerator, finetune=flags.finetune, unet=unwrapped[0],
                                     text_encoder=unwrapped[1] if flags.train_text_encoder else None,
                                     text_encoder_2=unwrapped[2] if flags.train_text_encoder else None, ema_unet=ema)

    generator = torch.Generator(device=accelerator.device).manual_seed(resolved.seed * 1009 + accelerator.process_index)
    guard = NonFiniteGuard(optimizer.optimizer, flags.max_nonfinite_steps,
                           external=accelerator.scaler is not None or accelerator.state.deepspeed_plugin is not None)
    latent_data = planned.built(cfg.cache.cache_dir) if planned is not None else None
    return Run(cfg=cfg, resolved=resolved, accelerator=accelerator, components=components, cache=cache, sampler=sampler,
               loader=loader, trained=trained, params=params, optimizer=optimizer, lr_scheduler=lr_scheduler, ema=ema,
               objective=objective, generator=generator, guard=guard, weight_dtype=weight_dtype,
               steps_per_epoch=steps_per_epoch, max_steps=max_steps, resume_path=resume_path,
               output=output,
               fingerprint=run_fingerprint(cfg, resolved, shared(accelerator, latent_data), accelerator),
               val_prompts=val_prompts, empty_prompt=empty_prompt, held_out=held_out, hub_repo=hub_repo)


def start_outputs(run: Run) -> None:
    """Once everything is loaded (main process): with --overwrite_output_dir remove the earlier run's
    results (checkpoints included, so `latest` cannot resume them, and its logs, so that its curves
    do not mix with this run's; the latent cache stays), record what this run writes, save the
    settings, start the trackers and the checkpoint pusher."""
    from sdxl_ambient import hub

    accelerator, flags = run.accelerator, run.flags
    if not accelerator.is_main_process:
        return
    keep = inside_output(flags, run.cfg.cache.cache_dir)
    with disk_errors(flags.output_dir):
        run.output.start(clear=[n for n in run.output.own() if n != keep] if flags.overwrite_output_dir else [])
        hub.write_settings(flags.output_dir, settings_record(run))
    accelerator.init_trackers("sdxl-ambient", config={k: v for k, v in hub.public_settings(vars(flags)).items()
                                                      if isinstance(v, (int, float, str, bool))})
    if flags.push_checkpoints_to_hub:
        run.pusher = hub.CheckpointPusher(run.hub_repo, mode=flags.hub_checkpoint_mode,
                                          include_training_state=flags.push_training_state, private=flags.hub_private_repo)


def settings_record(run: Run) -> dict:
    """What ``training_settings.json`` holds: the flags as given and, under "resolved", the values computed from them."""
    return {**vars(run.flags), "resolved": run.resolved.as_dict()}


# ----------------------------------------------------------------------------- the phases of a step


def resume(run: Run) -> int:
    """Restore the checkpoint to resume from, if any; returns the optimizer step to continue from."""
    step = 0
    if run.resume_path is not None:
        step = checkpointing.load_checkpoint(run.accelerator, run.resume_path, run.generator)["global_step"]
        logger.info("resumed from %s at step %d", run.resume_path, step)
    run.restart_point = (step, run.generator.get_state())
    return step


def start_epoch(run: Run, epoch: int, step: int) -> None:
    """Order this epoch's batches; a resumed epoch skips the micro-batches already done."""
    first = epoch == step // run.steps_per_epoch
    done = (step % run.steps_per_epoch) * run.flags.gradient_accumulation_steps if first else 0
    run.sampler.set_epoch(epoch, skip=done)
    for m in run.trained:
        m.train()


def prompt_conditioning(run: Run, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's text embeddings (cached, or from the training text encoders); with
    --proportion_empty_prompts p each sample's caption is the empty prompt with probability p, drawn
    per sample at every step from the run's generator."""
    keys = ("prompt_embeds", "pooled_prompt_embeds") if run.text_models is None else ("input_ids_one", "input_ids_two")
    first, second = (batch[key] for key in keys)
    if run.empty_prompt is not None:
        n = batch["input_ids_one"].shape[0]
        drop = torch.rand(n, generator=run.generator, device=run.generator.device) < run.flags.proportion_empty_prompts
        drop = drop.to(run.accelerator.device)
        first, second = (with_empty_prompt(batch[key], drop, run.empty_prompt[key]) for key in keys)
    if run.text_models is None:
        return first, second
    return text_embeddings(*run.text_models, first, second)


def with_empty_prompt(value: torch.Tensor, drop: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """``value`` (ids or embeddings of a batch) with the empty prompt's in the samples where ``drop`` is set."""
    return torch.where(drop.view(-1, *[1] * (value.ndim - 1)), empty.to(value.dtype), value)


def forward_backward(run: Run, batch: dict, step: int) -> torch.Tensor:
    """The objective on one micro-batch, backpropagated; returns (loss, ambient, consistency) on the device."""
    batch = {k: v.to(run.accelerator.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    if run.flags.torch_compile and run.flags.torch_compile_mode == "reduce-overhead":
        from sdxl_ambient.compile import mark_step_begin

        mark_step_begin()  # CUDA graphs: the previous step's outputs may be overwritten now
    prompt_embeds, pooled = prompt_conditioning(run, batch)
    net = conditioned_unet(run.trained[0], prompt_embeds, pooled, batch["time_ids"], dtype=run.weight_dtype)
    with run.accelerator.autocast():
        losses = run.objective(net, batch["observed"], batch["observed_timestep"], generator=run.generator,
                               use_consistency=step >= run.cfg.objective.consistency_start_step, step=step)
    loss = losses["loss"].mean()
    run.accelerator.backward(loss)
    return torch.stack([loss.detach(), losses["ambient"].detach().mean(),
                        losses.get("consistency", torch.zeros_like(loss)).detach().mean()])


def optimizer_step(run: Run, micro: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip and step, skipped on the device when the summed loss or the gradients are not finite
    (every process agrees: the loss is all-reduced, the gradient norm already is). Returns the
    step's mean loss terms and whether the update was applied."""
    accelerator, flags = run.accelerator, run.flags
    total = accelerator.reduce(micro[0], "sum") if accelerator.num_processes > 1 else micro[0]
    grad_norm = accelerator.clip_grad_norm_(run.params, flags.max_grad_norm if flags.max_grad_norm > 0 else float("inf"))
    bad = run.guard.before_step(step, total, grad_norm)
    if not run.guard.must_skip_on_host(bad):
        run.optimizer.step()
    run.lr_scheduler.step()
    return micro / flags.gradient_accumulation_steps, ~bad


def micro_batches(run: Run, step: int) -> Iterator[dict]:
    """The micro-batches from the optimizer step ``step`` on, epoch after epoch (:func:`start_epoch`)."""
    for epoch in range(step // run.steps_per_epoch, math.ceil(run.max_steps / run.steps_per_epoch)):
        start_epoch(run, epoch, step)
        yield from run.loader


def accumulate(run: Run, batch: dict, step: int, micro: torch.Tensor | None, meter: LossMeter) -> torch.Tensor | None:
    """Forward and backward on one micro-batch, its loss terms added to ``micro``; once the gradients
    are accumulated, the optimizer step (its terms to ``meter``). Returns the terms still waiting for
    an optimizer step: None once it has run."""
    with run.accelerator.accumulate(*run.trained):
        terms = forward_backward(run, batch, step)
        micro = terms if micro is None else micro + terms
        if run.accelerator.sync_gradients:
            run.restart_point = None  # the weights change: no consistent state until the step is done
            meter.add(*optimizer_step(run, micro, step + 1))
            micro = None
        run.optimizer.zero_grad(set_to_none=True)
    return micro


def end_step(run: Run, step: int, progress) -> int:
    """After an optimizer step: the EMA, the restart point of a save after a failure, the progress bar.
    Returns the step just completed."""
    if run.ema is not None:
        run.ema.step(run.params)
    step += 1
    run.restart_point = (step, run.generator.get_state())
    progress.update(1)
    return step


def stop_if_not_finite(run: Run, step: int, at_sync_point: bool) -> None:
    """At a sync point, the non-finite flags read back: --max_nonfinite_steps in a row save the last
    good state (the skipped updates changed nothing) and stop the run with an error."""
    if not (at_sync_point and run.guard.check()):
        return
    save(run, step)
    abandon_uploads(run)
    raise RuntimeError(f"{run.flags.max_nonfinite_steps} non-finite losses in a row (--max_nonfinite_steps); "
                       f"the last good state is saved in {run.flags.output_dir}/checkpoint-{step}")


def evaluate(run: Run, step: int) -> None:
    """When due: validation images (main process) and the held-out loss."""
    if run.val_prompts is not None and step % run.cfg.validation.every_steps == 0 and run.accelerator.is_main_process:
        validate(run, step)
    if run.held_out is not None and (step % run.cfg.held_out.every_steps == 0 or step == run.max_steps):
        validation_loss(run, step)


def log_losses(run: Run, meter: LossMeter, step: int, progress) -> None:
    values = meter.mean(run.accelerator)
    if values is None:
        return
    from sdxl_ambient.optimizers import effective_learning_rate

    rates = run.lr_scheduler.get_last_lr()
    logs = {"loss": values[0], "ambient_loss": values[1], "consistency_loss": values[2], "lr": rates[0]}
    if len(rates) > 1:
        logs["lr_text_encoder"] = rates[1]
    if (d_lr := effective_learning_rate(run.optimizer.optimizer)) is not None:
        logs["d*lr"] = d_lr  # Prodigy's own step size
    run.accelerator.log(logs, step=step)
    progress.set_postfix(loss=f"{values[0]:.4g}")


def save(run: Run, step: int) -> None:
    state = {"global_step": step, "seed": run.resolved.seed, "fingerprint": run.fingerprint}
    path = checkpointing.save_checkpoint(run.accelerator, run.flags.output_dir, step, state, run.generator,
                                         total_limit=run.flags.checkpoints_total_limit)
    run.saved_step = step
    if run.pusher is not None:
        run.pusher.push(path, step)


def install_stop_handler(run: Run) -> None:
    """SIGTERM (preemption) and SIGINT (Ctrl-C) ask the run to save at the end of the step under way
    (several processes: at the next sync point) and stop; a second Ctrl-C aborts at once, without saving."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, functools.partial(ask_to_stop, run))


def ask_to_stop(run: Run, signum, frame) -> None:
    """The stop signals' handler: note the signal (read by :func:`stop_requested`); a second Ctrl-C aborts."""
    if signum == signal.SIGINT and signal.SIGINT in run.stop_signal:
        raise KeyboardInterrupt("aborted by a second Ctrl-C, without saving; resume from the last checkpoint "
                                "with --resume_from_checkpoint latest")
    run.stop_signal.append(signum)
    if signum == signal.SIGINT and run.accelerator.is_local_main_process:
        os.write(2, b"\nstopping: the run saves a checkpoint after this step (Ctrl-C again to abort without saving)\n")


def stopped(run: Run, step: int) -> int:
    """End a run stopped by a signal (its checkpoint saved): one line, and 128 + the signal's number."""
    signum = run.stop_signal[0] if run.stop_signal else None
    by = f"signal {signum} ({signal.Signals(signum).name})" if signum else "another process's signal"
    logger.warning("stopped by %s at step %d; saved %s/checkpoint-%d; resume with --resume_from_checkpoint latest",
                   by, step, run.flags.output_dir, step)
    abandon_uploads(run)
    run.accelerator.end_training()
    return 128 + signum if signum else EXIT_STOPPED


@contextlib.contextmanager
def saved_on_failure(run: Run):
    """On a failure during training, save the last completed step before the error goes on (see
    :func:`save_after_failure`); a write the disk refused becomes one line naming the folder."""
    try:
        yield
    except Exception as exc:
        save_after_failure(run, exc)
        reason = write_failure(exc)
        if reason is None:
            raise
        last = checkpointing.list_checkpoints(run.flags.output_dir)
        raise UserError(f"could not write to {run.flags.output_dir}: {reason}; "
                        f"{'the last complete checkpoint is ' + last[-1].name if last else 'no checkpoint is saved'}: "
                        "free some space, then resume with --resume_from_checkpoint latest") from None


def save_after_failure(run: Run, exc: Exception) -> None:
    """Save the last completed step after ``exc``, unless it is saved already or cannot be: in the
    middle of an update (no consistent state), with several processes (the others would have to
    join a save), or when the disk itself failed."""
    if isinstance(exc, UserError) or write_failure(exc) is not None or run.restart_point is None:
        return
    step, generator_state = run.restart_point
    if step <= run.saved_step:
        return
    if run.accelerator.num_processes > 1:
        logger.error("training failed at step %d; with several processes nothing more can be saved", step)
        return
    run.generator.set_state(generator_state)  # as it was when the step completed: the checkpoint is exact
    try:
        save(run, step)
    except Exception as failed:
        logger.error("training failed, and saving step %d then failed too: %s", step, failed)
        return
    logger.error("training failed after step %d, which is saved: resume with --resume_from_checkpoint latest "
                 "once the error below is fixed", step)


def stop_requested(run: Run, at_sync_point: bool) -> bool:
    """A stop signal seen here (one process: read at every optimizer step, a Python bool, no sync), or
    (several processes) by any process: decided together at a sync point, so that every process saves
    the same checkpoint instead of some waiting in a collective."""
    if run.accelerator.num_processes == 1:
        return bool(run.stop_signal)
    if not at_sync_point:
        return False
    flag = torch.tensor(float(bool(run.stop_signal)), device=run.accelerator.device)
    return run.accelerator.reduce(flag, "sum").item() > 0


def abandon_uploads(run: Run) -> None:
    if run.pusher is not None:
        run.pusher.abandon()


def validate(run: Run, step: int, final: bool = False):
    """Validation images with the current weights, on the main process (prompts re-encoded when the
    text encoders train), sampled as ``generate`` samples this run's model by default."""
    from sdxl_ambient import validation

    prompts = validation.encode_prompts(run.components, run.cfg.validation) if run.flags.train_text_encoder else run.val_prompts
    common = (run.components, run.cfg.validation, prompts, run.accelerator, run.weight_dtype, run.resolved.seed)
    t_n = run.resolved.ambient_timestep  # the lowest level with data: truncated above it, full sampling when 0
    if final:
        return validation.final_images(*common, run.flags.output_dir, ambient_timestep=t_n)
    return validation.log_validation(*common, step, run.flags.output_dir, ambient_timestep=t_n)


def validation_loss(run: Run, step: int) -> dict:
    """The held-out loss with the current weights (each process its share of the batches, summed),
    logged to the trackers beside the training loss."""
    accelerator = run.accelerator
    net_for = functools.partial(held_out_net, run, [accelerator.unwrap_model(m) for m in run.trained])
    for m in run.trained:
        m.eval()
    with accelerator.autocast():
        totals, counts = run.held_out.sums(run.objective, net_for, accelerator.device, accelerator.process_index,
                                           accelerator.num_processes)
    for m in run.trained:
        m.train()
    if accelerator.num_processes > 1:
        totals, counts = accelerator.reduce(totals, "sum"), accelerator.reduce(counts, "sum")
    logs = run.held_out.logs(totals, counts)
    accelerator.log(logs, step=step)
    logger.info("step %d: %s", step, ", ".join(f"{k} {v:.6g}" for k, v in logs.items()))
    return logs


def held_out_net(run: Run, models: list, batch: dict):
    """The conditioned UNet (``models``: the unwrapped trained models, UNet first) for a held-out batch."""
    unet, *text_encoders = models
    if run.text_models is None:
        prompt_embeds, pooled = batch["prompt_embeds"], batch["pooled_prompt_embeds"]
    else:
        prompt_embeds, pooled = text_embeddings(*text_encoders, batch["input_ids_one"], batch["input_ids_two"])
    return conditioned_unet(unet, prompt_embeds, pooled, batch["time_ids"], dtype=run.weight_dtype)


def finish(run: Run, step: int) -> None:
    """Final weights (LoRA files or a pipeline folder), final samples, the model card, the Hub push.
    A failed push keeps everything written and ends the run with a one-line error saying how to push later."""
    from sdxl_ambient import hub, models
    from sdxl_ambient.files import public_name

    accelerator, flags = run.accelerator, run.flags
    push_failed = None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if run.ema is not None:
            run.restart_point = None  # the weights become the EMA's: no training state to save after a failure
            run.ema.copy_to(run.params)
        unet, *text_encoders = [accelerator.unwrap_model(m) for m in run.trained]
        if flags.finetune == "lora":
            models.save_lora(flags.output_dir, unet, *(text_encoders or [None, None]))
        else:
            models.save_full_pipeline(flags.output_dir, run.components, unet)
        images = validate(run, step, final=True) if run.val_prompts is not None else []
        card = hub.model_card(repo_id=run.hub_repo or hub.default_repo_id(flags.hub_model_id, flags.output_dir),
                              base_model=public_name(flags.pretrained_model_name_or_path),
                              settings={**vars(flags), **run.resolved.as_dict()}, finetune=flags.finetune,
                              image_paths=images, validation_prompt=flags.validation_prompt, output_dir=flags.output_dir)
        atomic_write(Path(flags.output_dir) / MODEL_CARD, lambda tmp: tmp.write_text(card))
        if run.pusher is not None:
            run.pusher.close()
        if run.hub_repo is not None:  # never the user's files beside ours
            push_failed = hub.try_push_final(flags.output_dir, run.hub_repo, private=flags.hub_private_repo,
                                             exclude=run.output.foreign())
    accelerator.end_training()
    if push_failed:
        raise UserError(push_failed)


def announce(run: Run, step: int) -> None:
    """The run's shape in the log, each data source's examples, repeats and t_n; at the start of a new
    run, the held-out loss of the base model (what the run's values compare to)."""
    logger.info("%d examples, %d steps per epoch, %d steps, t_n=%d, consistency weight %g, on %d processes",
                len(run.cache), run.steps_per_epoch, run.max_steps, run.resolved.ambient_timestep,
                run.objective.consistency_weight, run.accelerator.num_processes)
    harmful = run.cfg.objective.harmful_levels(run.cache.levels)
    if harmful:
        logger.warning("the consistency term is on for data at t_n %s (>= %d), where it made samples worse in "
                       "docs/image_results.md (Part 3); consider --consistency_weight 0", harmful, HARMFUL_CONSISTENCY_LEVEL)
    for source in run.resolved.data_sources:
        logger.info("data source %s: %d examples, repeats %d, t_n %s", source["name"], source["examples"],
                    source["repeats"], source["ambient_timestep"])
    if run.held_out is not None and run.resume_path is None:
        validation_loss(run, step)


# ----------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig) -> int:
    """Train to ``max_steps``; returns 0, or 128 + the signal's number when a signal (Ctrl-C,
    SIGTERM) stopped the run after a checkpoint."""
    with contextlib.ExitStack() as held:  # the output and cache folders' locks, for the run's life
        run = setup(cfg, held)
        first = resume(run)
        start_outputs(run)
        install_stop_handler(run)
        with saved_on_failure(run):
            return loop(run, first)


def loop(run: Run, step: int) -> int:
    """The steps from ``step`` to ``max_steps``, then the final weights; returns train's exit status."""
    from tqdm.auto import tqdm

    first = step
    announce(run, step)
    progress = tqdm(range(run.max_steps), initial=step, desc="steps", disable=not run.accelerator.is_local_main_process)
    meter, micro = LossMeter(), None
    for batch in micro_batches(run, step):
        if step >= run.max_steps:  # done (or resumed from the final checkpoint of a partial last epoch)
            break
        # forward and backward on one micro-batch; the optimizer steps once the gradients are accumulated
        micro = accumulate(run, batch, step, micro, meter)
        if not run.accelerator.sync_gradients:
            continue
        step = end_step(run, step, progress)

        # read back from the device only at sync points: the non-finite flags, the losses, a stop request
        log_now = step % run.flags.logging_steps == 0 or step == run.max_steps
        sync_point = run.guard.due() or log_now
        stop_if_not_finite(run, step, sync_point)
        if log_now:
            log_losses(run, meter, step, progress)

        # checkpoints, a stop, validation images and loss
        stopping = stop_requested(run, sync_point)
        if step % run.flags.checkpointing_steps == 0 or stopping:
            save(run, step)
        if stopping:
            logger.info("ran steps %d-%d of %d", first + 1, step, run.max_steps)
            return stopped(run, step)
        evaluate(run, step)
    logger.info("ran steps %d-%d of %d", first + 1, step, run.max_steps)
    finish(run, step)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Train; the signal handlers the run installs (save, then stop) are removed when it ends."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    cfg = load_train_config(argv)
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    try:
        return train(cfg)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def cli(argv: list[str] | None = None) -> int:
    """The command line: expected user errors as one line and exit status 2."""
    return exit_code_of(lambda: main(argv))


if __name__ == "__main__":
    sys.exit(cli())
