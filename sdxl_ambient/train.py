"""The training loop: `accelerate launch train_sdxl_ambient.py --config configs/NAME.yaml`.

Read top to bottom: flags -> accelerator -> SDXL parts -> noisy-latent cache -> trainable
parameters (LoRA or full) -> optimizer -> resume -> steps (step.AmbientObjective) ->
checkpoints / validation -> final weights, model card, Hub.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
from pathlib import Path

import torch

from sdxl_ambient import checkpointing
from sdxl_ambient.config import parse_args
from sdxl_ambient.objectives import DEFAULT_WEIGHT_CAP
from sdxl_ambient.step import AmbientObjective, conditioned_unet

logger = logging.getLogger("sdxl_ambient")
RESULT_FILES = ("pytorch_lora_weights.safetensors", "model_index.json", "training_settings.json")


def check_output_dir(args, resume_path) -> None:
    """Refuse to write over a finished or running output folder unless asked to (or resuming a checkpoint in it)."""
    out = Path(args.output_dir)
    if args.overwrite_output_dir or resume_path is not None or not out.is_dir():
        return
    found = [name for name in RESULT_FILES if (out / name).exists()] + [p.name for p in checkpointing.list_checkpoints(out)]
    if args.resume_from_checkpoint:  # restarting before the first checkpoint: only finished weights are in the way
        found = [name for name in found if name != "training_settings.json"]
    if found:
        raise ValueError(f"--output_dir {out} already holds {found[:3]}: pass --resume_from_checkpoint latest to continue, "
                         "--overwrite_output_dir to write over it, or choose another folder")


def make_accelerator(args):
    from datetime import timedelta

    from accelerate import Accelerator, DistributedType
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration

    log_with = None if args.report_to in (None, "none") else args.report_to
    handlers = [InitProcessGroupKwargs(timeout=timedelta(seconds=args.ddp_timeout))]  # ranks wait while rank 0 builds the cache
    if args.train_text_encoder:  # SDXL reads the text encoders' penultimate layer: LoRA on their last layer gets no gradient
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    accelerator = Accelerator(
        kwargs_handlers=handlers,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)),
    )
    if accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError("FSDP is not supported yet (sharded parameters break EMA, validation and the weight hooks): "
                         "use DDP (configs/accelerate_ddp.yaml) or DeepSpeed ZeRO-2 (configs/accelerate_deepspeed_zero2.yaml)")
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        if args.train_text_encoder:
            raise ValueError("--train_text_encoder trains three models, and DeepSpeed takes one: use DDP for it")
        # the data loader is ours, not prepared: DeepSpeed must be told the micro-batch
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = args.train_batch_size
    return accelerator


def resolve_seed(args, resume_path, accelerator) -> int:
    """The run's seed: the flag, the resumed run's, the settings saved by an earlier start of this
    run, or a fresh random one; drawn on the main process and shared, so every rank agrees."""
    import json

    from accelerate.utils import broadcast_object_list

    if args.seed is not None:
        return args.seed
    seed = None
    settings = Path(args.output_dir) / "training_settings.json"
    if resume_path is not None:
        seed = json.loads((resume_path / checkpointing.STATE_FILE).read_text())["seed"]
    elif settings.is_file() and not args.overwrite_output_dir:
        seed = json.loads(settings.read_text()).get("seed")
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    return broadcast_object_list([seed])[0] if accelerator.num_processes > 1 else seed


def place_frozen(args, components, accelerator, weight_dtype) -> None:
    """Put the (frozen) encoders on the device: the VAE in fp32 unless a separate (fixed) VAE was
    given, the text encoders in the training precision."""
    vae_dtype = weight_dtype if args.pretrained_vae_model_name_or_path else torch.float32
    components.vae.to(accelerator.device, dtype=vae_dtype)
    for te in (components.text_encoder, components.text_encoder_2):
        te.to(accelerator.device, dtype=weight_dtype)


def setup_trainable(args, components, accelerator, weight_dtype):
    """Freeze the base model, add what trains (LoRA adapters or the whole UNet); returns the trainable parameters."""
    from sdxl_ambient import models

    unet, te1, te2 = components.unet, components.text_encoder, components.text_encoder_2
    if args.finetune == "full":
        unet.requires_grad_(True)
        unet.to(accelerator.device, dtype=torch.float32)
    else:
        unet.to(accelerator.device, dtype=weight_dtype)
        models.add_unet_lora(unet, rank=args.rank, alpha=args.lora_alpha)
    text_encoders = (te1, te2)
    if args.train_text_encoder:
        for te in text_encoders:
            models.add_text_encoder_lora(te, rank=args.rank, alpha=args.lora_alpha)
    trained = [unet] + (list(text_encoders) if args.train_text_encoder else [])
    if weight_dtype != torch.float32:  # frozen weights in half precision, trained ones in fp32
        models.cast_training_params(trained, dtype=torch.float32)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            for te in text_encoders:
                te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.enable_xformers_memory_efficient_attention:
        try:
            unet.enable_xformers_memory_efficient_attention()
        except Exception as exc:  # xformers missing or unusable on this device
            raise ValueError(f"--enable_xformers_memory_efficient_attention: xformers is not usable here ({exc})") from exc
    params = [p for m in trained for p in m.parameters() if p.requires_grad]
    return trained, params


def make_optimizer(args, params):
    kwargs = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise ValueError("--use_8bit_adam needs bitsandbytes: pip install 'sdxl-ambient[bnb]'") from exc
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


def batch_conditioning(args, batch, text_encoders):
    """Text conditioning of a batch: cached embeddings, or the (LoRA-trained) text encoders on cached token ids."""
    if not args.train_text_encoder:
        return batch["prompt_embeds"], batch["pooled_prompt_embeds"]
    from sdxl_ambient.models import text_embeddings

    return text_embeddings(*text_encoders, batch["input_ids_one"], batch["input_ids_two"])


def main(argv: list[str] | None = None) -> int:
    """Train; the SIGTERM handler the run installs (save, then stop) is removed when it ends."""
    previous = signal.getsignal(signal.SIGTERM)
    try:
        return train(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def train(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    resume_path = checkpointing.resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
    check_output_dir(args, resume_path)
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from sdxl_ambient import hub, models, validation
    from sdxl_ambient.cache import BucketBatchSampler, prepare_cache
    from sdxl_ambient.data import public_name

    accelerator = make_accelerator(args)
    args.seed = resolve_seed(args, resume_path, accelerator)
    set_seed(args.seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    # SDXL parts and the noisy-latent cache (the only data the loop ever sees).
    components = models.load_components(args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant,
                                        pretrained_vae_model_name_or_path=args.pretrained_vae_model_name_or_path)
    if args.prediction_type:
        components.noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    if accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        hub.write_settings(args.output_dir, args)  # the seed, for a restart before the first checkpoint
    place_frozen(args, components, accelerator, weight_dtype)
    cache = prepare_cache(args, components, accelerator)  # sets args.ambient_timestep from a latent dataset
    num_timesteps = components.noise_scheduler.config.num_train_timesteps
    if args.ambient_timestep >= num_timesteps:
        raise ValueError(f"--ambient_timestep {args.ambient_timestep} must be below the scheduler's {num_timesteps} timesteps")
    if args.consistency_weight > 0 and args.ambient_timestep == 0:
        raise ValueError("--consistency_weight > 0 needs data with noise (--ambient_timestep > 0)")
    val_prompts = validation.encode_prompts(components, args) if args.validation_prompt else None
    if not args.train_text_encoder:  # the cache holds the embeddings: free the device
        components.text_encoder.to("cpu")
        components.text_encoder_2.to("cpu")

    trained, params = setup_trainable(args, components, accelerator, weight_dtype)
    unet = components.unet
    text_encoders = (components.text_encoder, components.text_encoder_2)
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = make_optimizer(args, params)
    ema = None
    if args.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=args.ema_decay, foreach=True)
        ema.to(accelerator.device)

    # The data order is ours (seeded by epoch, sharded by process, resumable), so the loader is not prepared.
    sampler = BucketBatchSampler(cache.latent_shapes(), args.train_batch_size, seed=args.seed,
                                 num_replicas=accelerator.num_processes, rank=accelerator.process_index,
                                 accumulation=args.gradient_accumulation_steps)
    loader = torch.utils.data.DataLoader(cache, batch_sampler=sampler, num_workers=args.dataloader_num_workers,
                                         pin_memory=accelerator.device.type == "cuda")
    steps_per_epoch = len(sampler) // args.gradient_accumulation_steps
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(max_steps / steps_per_epoch)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes)
    prepared = accelerator.prepare(*trained, optimizer, lr_scheduler)
    trained, (optimizer, lr_scheduler) = list(prepared[: len(trained)]), prepared[len(trained):]
    unet_model = trained[0]  # the wrapped (DDP/FSDP) UNet: call this one so gradients are synchronised
    text_models = tuple(trained[1:]) if args.train_text_encoder else text_encoders
    models.register_checkpoint_hooks(accelerator, finetune=args.finetune, unet=unet,
                                     text_encoder=text_encoders[0] if args.train_text_encoder else None,
                                     text_encoder_2=text_encoders[1] if args.train_text_encoder else None,
                                     ema_unet=ema)

    args.consistency_max_delta = args.consistency_max_delta or max(args.ambient_timestep, 1)  # resolved, as saved
    args.loss_weight_cap = args.loss_weight_cap or DEFAULT_WEIGHT_CAP
    objective = AmbientObjective(
        alphas_cumprod=components.noise_scheduler.alphas_cumprod.to(accelerator.device),
        prediction_type=components.noise_scheduler.config.prediction_type,
        weighting=args.loss_weighting,
        weight_cap=args.loss_weight_cap,
        consistency_weight=args.consistency_weight,
        consistency_steps=args.consistency_steps,
        consistency_max_delta=args.consistency_max_delta,
        num_train_timesteps=num_timesteps,
    )
    generator = torch.Generator(device=accelerator.device).manual_seed(args.seed * 1009 + accelerator.process_index)

    global_step = 0
    if resume_path is not None:
        state = checkpointing.load_checkpoint(accelerator, resume_path, generator)
        global_step = state["global_step"]
        logger.info("resumed from %s at step %d", resume_path, global_step)
    if accelerator.is_main_process:
        hub.write_settings(args.output_dir, args)
        accelerator.init_trackers("sdxl-ambient", config={k: v for k, v in hub.public_settings(args).items()
                                                          if isinstance(v, (int, float, str, bool))})
    pusher = hub.CheckpointPusher(args.hub_model_id or Path(args.output_dir).name, mode=args.hub_checkpoint_mode,
                                  include_training_state=args.push_training_state, private=args.hub_private_repo) \
        if args.push_checkpoints_to_hub and accelerator.is_main_process else None

    stop = {"signal": None}
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))

    def stop_requested(at_sync_point: bool) -> bool:
        """SIGTERM seen here, or (several processes) by any process: decided together at a sync point,
        so that every process saves the same checkpoint instead of some waiting in a collective."""
        if accelerator.num_processes == 1:
            return stop["signal"] is not None
        if not at_sync_point:
            return False
        flag = torch.tensor(float(stop["signal"] is not None), device=accelerator.device)
        return accelerator.reduce(flag, "sum").item() > 0

    def save(step):
        path = checkpointing.save_checkpoint(accelerator, args.output_dir, step,
                                             {"global_step": step, "seed": args.seed}, generator,
                                             total_limit=args.checkpoints_total_limit)
        if pusher is not None:
            pusher.push(path, step)

    def validate(step, final=False):
        """Validation images with the current weights, on the main process (text encoders re-read if trained)."""
        prompts = validation.encode_prompts(components, args) if args.train_text_encoder else val_prompts
        if final:
            return validation.final_images(components, accelerator, args, prompts, weight_dtype)
        return validation.log_validation(components, accelerator, args, prompts, step, weight_dtype)

    logger.info("%d examples, %d steps per epoch, %d steps, t_n=%d, consistency weight %g, on %d processes",
                len(cache), steps_per_epoch, max_steps, args.ambient_timestep, args.consistency_weight,
                accelerator.num_processes)
    progress = tqdm(range(max_steps), initial=global_step, desc="steps", disable=not accelerator.is_local_main_process)
    running, running_count, micro = None, None, None
    guard = NonFiniteGuard(optimizer.optimizer, args.max_nonfinite_steps,
                           external=accelerator.scaler is not None or accelerator.state.deepspeed_plugin is not None)
    for epoch in range(global_step // steps_per_epoch, num_epochs):
        if global_step >= max_steps:  # resumed from the final checkpoint of a partial last epoch
            break
        first = epoch == global_step // steps_per_epoch
        sampler.set_epoch(epoch, skip=(global_step % steps_per_epoch) * args.gradient_accumulation_steps if first else 0)
        for m in trained:
            m.train()
        for batch in loader:
            batch = {k: v.to(accelerator.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            with accelerator.accumulate(*trained):
                prompt_embeds, pooled = batch_conditioning(args, batch, text_models)
                net = conditioned_unet(unet_model, prompt_embeds, pooled, batch["time_ids"], dtype=weight_dtype)
                with accelerator.autocast():
                    losses = objective(net, batch["observed"], batch["observed_timestep"], generator=generator,
                                       use_consistency=global_step >= args.consistency_start_step)
                loss = losses["loss"].mean()
                accelerator.backward(loss)
                terms = torch.stack([loss.detach(), losses["ambient"].detach().mean(),
                                     losses.get("consistency", torch.zeros_like(loss)).detach().mean()])
                micro = terms if micro is None else micro + terms  # summed over the accumulated micro-batches
                if accelerator.sync_gradients:
                    # every process must agree to skip: the summed loss, and the (all-reduced) gradient norm
                    total = accelerator.reduce(micro[0], "sum") if accelerator.num_processes > 1 else micro[0]
                    grad_norm = accelerator.clip_grad_norm_(params, args.max_grad_norm if args.max_grad_norm > 0 else float("inf"))
                    bad = guard.before_step(global_step + 1, total, grad_norm)
                    if not guard.must_skip_on_host(bad):
                        optimizer.step()
                    lr_scheduler.step()
                    step_terms = torch.where(bad, torch.zeros_like(micro), micro / args.gradient_accumulation_steps)
                    running = step_terms if running is None else running + step_terms
                    running_count = (~bad).float() if running_count is None else running_count + (~bad).float()
                    micro = None
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            if ema is not None:
                ema.step(params)
            global_step += 1
            progress.update(1)
            log_now = global_step % args.logging_steps == 0 or global_step == max_steps
            sync_point = guard.due() or log_now
            if sync_point and guard.check():
                save(global_step)  # the skipped updates changed nothing: this is the last good state
                if pusher is not None:
                    pusher.abandon()
                raise RuntimeError(f"{args.max_nonfinite_steps} non-finite losses in a row (--max_nonfinite_steps); "
                                   f"the last good state is saved in {args.output_dir}/checkpoint-{global_step}")
            if log_now and running is not None:
                values = (accelerator.reduce(running / running_count.clamp(min=1), "mean")).tolist()
                logs = {"loss": values[0], "ambient_loss": values[1], "consistency_loss": values[2],
                        "lr": lr_scheduler.get_last_lr()[0]}
                accelerator.log(logs, step=global_step)
                progress.set_postfix(loss=f"{values[0]:.4g}")
                running, running_count = None, None
            stopping = stop_requested(sync_point)
            if global_step % args.checkpointing_steps == 0 or stopping:
                save(global_step)
            if stopping:
                logger.warning("stopped by signal %s at step %d; resume with --resume_from_checkpoint latest",
                               stop["signal"] or "(another process's)", global_step)
                if pusher is not None:
                    pusher.abandon()
                accelerator.end_training()
                return 143
            if val_prompts is not None and global_step % args.validation_steps == 0 and accelerator.is_main_process:
                validate(global_step)
            if global_step >= max_steps:
                break
        if global_step >= max_steps:
            break

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema is not None:
            ema.copy_to(params)
        final_unet = accelerator.unwrap_model(unet)
        if args.finetune == "lora":
            models.save_lora(args.output_dir, final_unet,
                             accelerator.unwrap_model(text_encoders[0]) if args.train_text_encoder else None,
                             accelerator.unwrap_model(text_encoders[1]) if args.train_text_encoder else None)
        else:
            models.save_full_pipeline(args.output_dir, components, final_unet)
        images = validate(global_step, final=True) if val_prompts else []
        card = hub.model_card(repo_id=args.hub_model_id or Path(args.output_dir).name,
                              base_model=public_name(args.pretrained_model_name_or_path), settings=hub.public_settings(args),
                              finetune=args.finetune, image_paths=images, validation_prompt=args.validation_prompt,
                              output_dir=args.output_dir)
        (Path(args.output_dir) / "README.md").write_text(card)
        if pusher is not None:
            pusher.close()
        if args.push_to_hub:
            hub.push_final(args.output_dir, args.hub_model_id or Path(args.output_dir).name, private=args.hub_private_repo)
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
