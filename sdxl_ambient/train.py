"""The training loop: `accelerate launch train_sdxl_ambient.py --config configs/NAME.yaml`.

``setup`` builds a :class:`Run` (accelerator, SDXL parts, the noisy-latent cache, what trains,
optimizer, LR schedule, EMA, objective, generator); ``train`` is the loop, read top to bottom;
each phase of a step (forward and backward, optimizer step, logging, saving, stopping) is one
function of the run. The objective of one step is ``step.AmbientObjective``.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdxl_ambient import checkpointing
from sdxl_ambient.config import TrainConfig, load_train_config
from sdxl_ambient.errors import UserError, exit_code_of
from sdxl_ambient.files import LORA_WEIGHT_NAME, MODEL_CARD, MODEL_INDEX, SETTINGS_FILE
from sdxl_ambient.step import AmbientObjective, conditioned_unet
from sdxl_ambient.text import text_embeddings

logger = logging.getLogger("sdxl_ambient")
RESULT_FILES = (LORA_WEIGHT_NAME, MODEL_INDEX, SETTINGS_FILE)
EXIT_STOPPED = 143  # stopped by a signal, a checkpoint saved: resume with --resume_from_checkpoint latest


# ----------------------------------------------------------------------------- set-up helpers


def check_output_dir(flags, resume_path) -> None:
    """Refuse to write over a finished or running output folder unless asked to (or resuming a checkpoint in it)."""
    out = Path(flags.output_dir)
    if flags.overwrite_output_dir or resume_path is not None or not out.is_dir():
        return
    found = [name for name in RESULT_FILES if (out / name).exists()] + [p.name for p in checkpointing.list_checkpoints(out)]
    if flags.resume_from_checkpoint:  # restarting before the first checkpoint: only finished weights are in the way
        found = [name for name in found if name != SETTINGS_FILE]
    if found:
        raise UserError(f"--output_dir {out} already holds {found[:3]}: pass --resume_from_checkpoint latest to continue, "
                        "--overwrite_output_dir to write over it, or choose another folder")


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
    import json

    from accelerate.utils import broadcast_object_list

    if flags.seed is not None:
        return flags.seed
    if resume_path is not None:
        return json.loads((resume_path / checkpointing.STATE_FILE).read_text())["seed"]
    seed = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    return broadcast_object_list([seed])[0] if accelerator.num_processes > 1 else seed


def place_frozen(flags, components, device, weight_dtype) -> None:
    """Put the (frozen) encoders on the device: the VAE in fp32 unless a separate (fixed) VAE was
    given, the text encoders in the training precision."""
    vae_dtype = weight_dtype if flags.pretrained_vae_model_name_or_path else torch.float32
    components.vae.to(device, dtype=vae_dtype)
    for te in (components.text_encoder, components.text_encoder_2):
        te.to(device, dtype=weight_dtype)


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
        models.add_unet_lora(unet, rank=flags.rank, alpha=flags.lora_alpha)
    if flags.train_text_encoder:
        for te in text_encoders:
            models.add_text_encoder_lora(te, rank=flags.rank, alpha=flags.lora_alpha)
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
    return trained, [p for m in trained for p in m.parameters() if p.requires_grad]


def make_optimizer(flags, params, learning_rate: float):
    kwargs = dict(lr=learning_rate, betas=(flags.adam_beta1, flags.adam_beta2),
                  weight_decay=flags.adam_weight_decay, eps=flags.adam_epsilon)
    if flags.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("--use_8bit_adam needs bitsandbytes: pip install 'sdxl-ambient[bnb]'") from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, fused=True, **kwargs)  # fused: one kernel, and it can skip a step on device


class NonFiniteGuard:
    """Skips updates whose loss or gradients are not finite, without a host sync per step.

    The fused AdamW reads ``found_inf`` on the device and leaves weights and moments untouched
    when it is set (the mechanism torch's GradScaler uses). The flags are read back every
    ``limit`` steps: each skipped step gets a warning, and ``limit`` in a row stop the run.
    Optimizers that cannot skip on device (8-bit Adam) are checked every step instead. Where
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


@dataclass
class Resolved:
    """Values computed once at start-up from the flags and what they point to; saved as such."""

    seed: int
    ambient_timestep: int
    learning_rate: float
    objective: dict

    def as_dict(self) -> dict:
        return {"seed": self.seed, "ambient_timestep": self.ambient_timestep, "learning_rate": self.learning_rate,
                **self.objective}


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
    val_prompts: dict | None = None
    hub_repo: str | None = None  # with --push_to_hub, on the main process: the repo, created at the start
    pusher: Any = None
    stop_signal: list = field(default_factory=list)

    @property
    def flags(self):
        return self.cfg.flags

    @property
    def text_models(self):
        """The text encoders to run on token ids when they train (prepared), else None (cached embeddings)."""
        return tuple(self.trained[1:]) if self.flags.train_text_encoder else None


def setup(cfg: TrainConfig) -> Run:
    """Everything before the first step, in order; nothing is written before the inputs are checked."""
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    from sdxl_ambient import hub, models, validation
    from sdxl_ambient.cache import BucketBatchSampler, prepare_cache

    flags = cfg.flags
    resume_path = checkpointing.resolve_checkpoint(flags.resume_from_checkpoint, flags.output_dir)
    check_output_dir(flags, resume_path)
    accelerator = make_accelerator(flags)
    hub_repo = None  # --push_to_hub: a token, the Hub and the repo checked before any model loads
    if flags.push_to_hub and accelerator.is_main_process:
        hub_repo = hub.prepare_repo(hub.default_repo_id(flags.hub_model_id, flags.output_dir), private=flags.hub_private_repo)
    seed = resolve_seed(flags, resume_path, accelerator)
    set_seed(seed)
    if flags.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    # SDXL parts and the noisy-latent cache (the only data the loop ever sees)
    components = models.load_components(flags.pretrained_model_name_or_path, revision=flags.revision, variant=flags.variant,
                                        pretrained_vae_model_name_or_path=flags.pretrained_vae_model_name_or_path)
    if flags.prediction_type:
        components.noise_scheduler.register_to_config(prediction_type=flags.prediction_type)
    place_frozen(flags, components, accelerator.device, weight_dtype)
    cache = prepare_cache(cfg.source, cfg.data, cfg.cache, components, accelerator)
    objective = cfg.objective.build(cache.ambient_timestep, components.noise_scheduler, accelerator.device)
    val_prompts = validation.encode_prompts(components, cfg.validation) if cfg.validation else None
    if not flags.train_text_encoder:  # the cache holds the embeddings: free the device
        components.text_encoder.to("cpu")
        components.text_encoder_2.to("cpu")

    # what trains, the optimizer and the LR schedule
    trained, params = setup_trainable(flags, components, accelerator.device, weight_dtype)
    scale = flags.gradient_accumulation_steps * flags.train_batch_size * accelerator.num_processes if flags.scale_lr else 1
    learning_rate = flags.learning_rate * scale
    optimizer = make_optimizer(flags, params, learning_rate)
    ema = None
    if flags.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=flags.ema_decay, foreach=True)
        ema.to(accelerator.device)

    # the data order is ours (seeded by epoch, sharded by process, resumable), so the loader is not prepared
    sampler = BucketBatchSampler(cache.latent_shapes(), flags.train_batch_size, seed=seed,
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

    resolved = Resolved(seed=seed, ambient_timestep=cache.ambient_timestep, learning_rate=learning_rate,
                        objective=cfg.objective.resolved(cache.ambient_timestep))
    generator = torch.Generator(device=accelerator.device).manual_seed(seed * 1009 + accelerator.process_index)
    guard = NonFiniteGuard(optimizer.optimizer, flags.max_nonfinite_steps,
                           external=accelerator.scaler is not None or accelerator.state.deepspeed_plugin is not None)
    run = Run(cfg=cfg, resolved=resolved, accelerator=accelerator, components=components, cache=cache, sampler=sampler,
              loader=loader, trained=trained, params=params, optimizer=optimizer, lr_scheduler=lr_scheduler, ema=ema,
              objective=objective, generator=generator, guard=guard, weight_dtype=weight_dtype,
              steps_per_epoch=steps_per_epoch, max_steps=max_steps, resume_path=resume_path, val_prompts=val_prompts,
              hub_repo=hub_repo)
    if accelerator.is_main_process:
        hub.write_settings(flags.output_dir, settings_record(run))
        accelerator.init_trackers("sdxl-ambient", config={k: v for k, v in hub.public_settings(vars(flags)).items()
                                                          if isinstance(v, (int, float, str, bool))})
        if flags.push_checkpoints_to_hub:
            run.pusher = hub.CheckpointPusher(hub_repo, mode=flags.hub_checkpoint_mode,
                                              include_training_state=flags.push_training_state, private=flags.hub_private_repo)
    return run


def settings_record(run: Run) -> dict:
    """What ``training_settings.json`` holds: the flags as given and, under "resolved", the values computed from them."""
    return {**vars(run.flags), "resolved": run.resolved.as_dict()}


# ----------------------------------------------------------------------------- the phases of a step


def resume(run: Run) -> int:
    """Restore the checkpoint to resume from, if any; returns the optimizer step to continue from."""
    if run.resume_path is None:
        return 0
    state = checkpointing.load_checkpoint(run.accelerator, run.resume_path, run.generator)
    logger.info("resumed from %s at step %d", run.resume_path, state["global_step"])
    return state["global_step"]


def start_epoch(run: Run, epoch: int, step: int) -> None:
    """Order this epoch's batches; a resumed epoch skips the micro-batches already done."""
    first = epoch == step // run.steps_per_epoch
    done = (step % run.steps_per_epoch) * run.flags.gradient_accumulation_steps if first else 0
    run.sampler.set_epoch(epoch, skip=done)
    for m in run.trained:
        m.train()


def forward_backward(run: Run, batch: dict, step: int) -> torch.Tensor:
    """The objective on one micro-batch, backpropagated; returns (loss, ambient, consistency) on the device."""
    batch = {k: v.to(run.accelerator.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    if run.text_models is None:
        prompt_embeds, pooled = batch["prompt_embeds"], batch["pooled_prompt_embeds"]
    else:
        prompt_embeds, pooled = text_embeddings(*run.text_models, batch["input_ids_one"], batch["input_ids_two"])
    net = conditioned_unet(run.trained[0], prompt_embeds, pooled, batch["time_ids"], dtype=run.weight_dtype)
    with run.accelerator.autocast():
        losses = run.objective(net, batch["observed"], batch["observed_timestep"], generator=run.generator,
                               use_consistency=step >= run.cfg.objective.consistency_start_step)
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


def log_losses(run: Run, meter: LossMeter, step: int, progress) -> None:
    values = meter.mean(run.accelerator)
    if values is None:
        return
    logs = {"loss": values[0], "ambient_loss": values[1], "consistency_loss": values[2],
            "lr": run.lr_scheduler.get_last_lr()[0]}
    run.accelerator.log(logs, step=step)
    progress.set_postfix(loss=f"{values[0]:.4g}")


def save(run: Run, step: int) -> None:
    path = checkpointing.save_checkpoint(run.accelerator, run.flags.output_dir, step,
                                         {"global_step": step, "seed": run.resolved.seed}, run.generator,
                                         total_limit=run.flags.checkpoints_total_limit)
    if run.pusher is not None:
        run.pusher.push(path, step)


def install_stop_handler(run: Run) -> None:
    """SIGTERM (preemption) asks the run to save at the next step and stop."""
    signal.signal(signal.SIGTERM, lambda signum, frame: run.stop_signal.append(signum))


def stop_requested(run: Run, at_sync_point: bool) -> bool:
    """A stop signal seen here, or (several processes) by any process: decided together at a sync
    point, so that every process saves the same checkpoint instead of some waiting in a collective."""
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
    """Validation images with the current weights, on the main process (prompts re-encoded when the text encoders train)."""
    from sdxl_ambient import validation

    prompts = validation.encode_prompts(run.components, run.cfg.validation) if run.flags.train_text_encoder else run.val_prompts
    common = (run.components, run.cfg.validation, prompts, run.accelerator, run.weight_dtype, run.resolved.seed)
    if final:
        return validation.final_images(*common, run.flags.output_dir)
    return validation.log_validation(*common, step, run.flags.output_dir)


def finish(run: Run, step: int) -> None:
    """Final weights (LoRA files or a pipeline folder), final samples, the model card, the Hub push.
    A failed push keeps everything written and ends the run with a one-line error saying how to push later."""
    from sdxl_ambient import hub, models
    from sdxl_ambient.data import public_name

    accelerator, flags = run.accelerator, run.flags
    push_failed = None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if run.ema is not None:
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
        (Path(flags.output_dir) / MODEL_CARD).write_text(card)
        if run.pusher is not None:
            run.pusher.close()
        if run.hub_repo is not None:
            push_failed = hub.try_push_final(flags.output_dir, run.hub_repo, private=flags.hub_private_repo)
    accelerator.end_training()
    if push_failed:
        raise UserError(push_failed)


# ----------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig) -> int:
    """Train to ``max_steps``; returns 0, or 143 when a signal stopped the run after a checkpoint."""
    from tqdm.auto import tqdm

    run = setup(cfg)
    flags, accelerator = run.flags, run.accelerator
    step = resume(run)
    install_stop_handler(run)
    logger.info("%d examples, %d steps per epoch, %d steps, t_n=%d, consistency weight %g, on %d processes",
                len(run.cache), run.steps_per_epoch, run.max_steps, run.resolved.ambient_timestep,
                run.objective.consistency_weight, accelerator.num_processes)
    progress = tqdm(range(run.max_steps), initial=step, desc="steps", disable=not accelerator.is_local_main_process)
    meter, micro = LossMeter(), None
    for epoch in range(step // run.steps_per_epoch, math.ceil(run.max_steps / run.steps_per_epoch)):
        if step >= run.max_steps:  # resumed from the final checkpoint of a partial last epoch
            break
        start_epoch(run, epoch, step)
        for batch in run.loader:
            # forward and backward on one micro-batch; the optimizer steps once the gradients are accumulated
            with accelerator.accumulate(*run.trained):
                terms = forward_backward(run, batch, step)
                micro = terms if micro is None else micro + terms
                if accelerator.sync_gradients:
                    meter.add(*optimizer_step(run, micro, step + 1))
                    micro = None
                run.optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            if run.ema is not None:
                run.ema.step(run.params)
            step += 1
            progress.update(1)

            # read back from the device only at sync points: the non-finite flags, the losses, a stop request
            log_now = step % flags.logging_steps == 0 or step == run.max_steps
            sync_point = run.guard.due() or log_now
            if sync_point and run.guard.check():
                save(run, step)  # the skipped updates changed nothing: this is the last good state
                abandon_uploads(run)
                raise RuntimeError(f"{flags.max_nonfinite_steps} non-finite losses in a row (--max_nonfinite_steps); "
                                   f"the last good state is saved in {flags.output_dir}/checkpoint-{step}")
            if log_now:
                log_losses(run, meter, step, progress)

            # checkpoints, a stop, validation images
            stopping = stop_requested(run, sync_point)
            if step % flags.checkpointing_steps == 0 or stopping:
                save(run, step)
            if stopping:
                logger.warning("stopped by signal %s at step %d; resume with --resume_from_checkpoint latest",
                               run.stop_signal[0] if run.stop_signal else "(another process's)", step)
                abandon_uploads(run)
                accelerator.end_training()
                return EXIT_STOPPED
            if run.val_prompts is not None and step % run.cfg.validation.every_steps == 0 and accelerator.is_main_process:
                validate(run, step)
            if step >= run.max_steps:
                break
        if step >= run.max_steps:
            break
    finish(run, step)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Train; the signal handler the run installs (save, then stop) is removed when it ends."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    cfg = load_train_config(argv)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        return train(cfg)
    finally:
        signal.signal(signal.SIGTERM, previous)


def cli(argv: list[str] | None = None) -> int:
    """The command line: expected user errors as one line and exit status 2."""
    return exit_code_of(lambda: main(argv))


if __name__ == "__main__":
    sys.exit(cli())
