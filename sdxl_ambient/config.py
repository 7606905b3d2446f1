"""Training flags: diffusers' names, a YAML file of the same keys, and the checks run before any work.

    accelerate launch train_sdxl_ambient.py --config configs/NAME.yaml [--flag value ...]

YAML keys are flag names (without the dashes); the command line overrides the file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml


def _bool(value: str) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_sdxl_ambient.py",
        description="Fine-tune SDXL (LoRA or full) on noisy data with the ambient Tweedie + consistency objectives.",
    )
    a = p.add_argument
    a("--config", type=str, default=None, help="YAML file whose keys are these flags; the command line overrides it.")

    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", type=str, default=None, help="SDXL pipeline: Hub id or local folder.")
    g.add_argument("--pretrained_vae_model_name_or_path", type=str, default=None,
                   help="A separate VAE (e.g. madebyollin/sdxl-vae-fp16-fix); it then runs in the training precision.")
    g.add_argument("--revision", type=str, default=None)
    g.add_argument("--variant", type=str, default=None, help="Weights variant, e.g. fp16.")
    g.add_argument("--prediction_type", type=str, default=None, choices=["epsilon", "v_prediction", "sample"],
                   help="Override the scheduler's prediction type.")

    g = p.add_argument_group("data")
    g.add_argument("--dataset_name", type=str, default=None, help="A Hub dataset (or a folder load_from_disk reads).")
    g.add_argument("--dataset_config_name", type=str, default=None)
    g.add_argument("--train_data_dir", type=str, default=None,
                   help="Image folder with metadata.jsonl (or .txt captions), or a noisy-latent dataset from `sdxl-ambient corrupt`.")
    g.add_argument("--image_column", type=str, default="image")
    g.add_argument("--caption_column", type=str, default="text")
    g.add_argument("--max_train_samples", type=int, default=None)
    g.add_argument("--cache_dir", type=str, default=None, help="Where the noisy-latent cache goes (default OUTPUT_DIR/latent_cache).")
    g.add_argument("--skip_broken_images", action="store_true", help="Skip unreadable images (each is reported) instead of stopping.")
    g.add_argument("--allow_empty_captions", action="store_true")
    g.add_argument("--resolution", type=int, default=1024)
    g.add_argument("--center_crop", action="store_true")
    g.add_argument("--random_flip", action="store_true")
    g.add_argument("--enable_bucket", action="store_true", help="Aspect-ratio bucketing (kohya's flag).")
    g.add_argument("--min_bucket_reso", type=int, default=512)
    g.add_argument("--max_bucket_reso", type=int, default=2048)
    g.add_argument("--bucket_reso_steps", type=int, default=64)
    g.add_argument("--dataloader_num_workers", type=int, default=0)
    g.add_argument("--ddp_timeout", type=int, default=7200,
                   help="Seconds a process waits for the others (e.g. while the main process builds the latent cache).")

    g = p.add_argument_group("ambient objective")
    g.add_argument("--ambient_timestep", type=int, default=None,
                   help="t_n: the timestep whose noise level the training latents carry (0 = ordinary fine-tune). "
                        "Default: the t_n of a noisy-latent dataset given as --train_data_dir, else 0.")
    g.add_argument("--loss_weighting", type=str, default="epsilon", choices=["epsilon", "observation"])
    g.add_argument("--loss_weight_cap", type=float, default=None,
                   help="Cap of the epsilon-matched weight relative to SNR(t) (default: objectives.DEFAULT_WEIGHT_CAP).")
    g.add_argument("--consistency_weight", type=float, default=0.0, help="Coefficient of the consistency loss (0 = off).")
    g.add_argument("--consistency_steps", type=int, default=1, help="Reverse-process steps in each consistency chain.")
    g.add_argument("--consistency_max_delta", type=int, default=None, help="Largest t - s of the chain (default t_n).")
    g.add_argument("--consistency_start_step", type=int, default=0, help="Optimizer step from which the consistency loss is on.")
    g.add_argument("--max_nonfinite_steps", type=int, default=5,
                   help="Stop after this many non-finite losses in a row (each one's step is skipped with a warning).")

    g = p.add_argument_group("training")
    g.add_argument("--finetune", type=str, default="lora", choices=["lora", "full"])
    g.add_argument("--rank", type=int, default=4, help="LoRA rank.")
    g.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default: rank).")
    g.add_argument("--train_text_encoder", action="store_true", help="Also train LoRA adapters on both text encoders.")
    g.add_argument("--train_batch_size", type=int, default=1)
    g.add_argument("--num_train_epochs", type=int, default=100)
    g.add_argument("--max_train_steps", type=int, default=None, help="Overrides --num_train_epochs.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--scale_lr", action="store_true")
    g.add_argument("--lr_scheduler", type=str, default="constant",
                   choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"])
    g.add_argument("--lr_warmup_steps", type=int, default=500)
    g.add_argument("--use_8bit_adam", action="store_true")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--use_ema", action="store_true")
    g.add_argument("--ema_decay", type=float, default=0.9999)
    g.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"])
    g.add_argument("--allow_tf32", action="store_true")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true")
    g.add_argument("--seed", type=int, default=None)

    g = p.add_argument_group("outputs, checkpoints, validation, Hub")
    g.add_argument("--output_dir", type=str, default="sdxl-ambient-model")
    g.add_argument("--overwrite_output_dir", action="store_true", help="Allow writing into an output folder that already holds results.")
    g.add_argument("--logging_dir", type=str, default="logs")
    g.add_argument("--report_to", type=str, default="tensorboard", help="tensorboard, wandb, all or none.")
    g.add_argument("--logging_steps", type=int, default=10, help="Read losses from the device every N steps.")
    g.add_argument("--checkpointing_steps", type=int, default=500)
    g.add_argument("--checkpoints_total_limit", type=int, default=None)
    g.add_argument("--resume_from_checkpoint", type=str, default=None, help="A checkpoint folder or `latest`.")
    g.add_argument("--validation_prompt", type=str, default=None)
    g.add_argument("--num_validation_images", type=int, default=4)
    g.add_argument("--validation_steps", type=int, default=500)
    g.add_argument("--validation_inference_steps", type=int, default=25)
    g.add_argument("--push_to_hub", action="store_true")
    g.add_argument("--hub_model_id", type=str, default=None)
    g.add_argument("--hub_private_repo", action="store_true")
    g.add_argument("--push_checkpoints_to_hub", action="store_true",
                   help="Upload each checkpoint's weights in the background (subfolder checkpoint-STEP).")
    g.add_argument("--hub_checkpoint_mode", type=str, default="subfolder", choices=["subfolder", "branch"],
                   help="Where pushed checkpoints go: subfolder checkpoint-STEP on main, or a branch checkpoint-STEP.")
    g.add_argument("--push_training_state", action="store_true",
                   help="With --push_checkpoints_to_hub, also upload optimizer and accelerate state.")
    g.add_argument("--hub_token", type=str, default=None, help=argparse.SUPPRESS)
    return p


def load_yaml_config(path: str) -> dict:
    """Read a YAML config of flag names; unknown keys are an error naming the file."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"--config {path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of flag names to values")
    return data


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        values = load_yaml_config(pre.config)
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"--config {pre.config}: unknown keys {unknown} (keys are the flag names, e.g. learning_rate)")
        parser.set_defaults(**values)
    args = parser.parse_args(argv)
    if pre.config:
        _prefer_command_line_source(args, values, sys.argv[1:] if argv is None else argv)
    if args.hub_token:
        raise ValueError("--hub_token is not accepted (it would end up in logs and shell history): "
                         "set HF_TOKEN in the environment or run `huggingface-cli login`")
    validate_args(args)
    return args


def _prefer_command_line_source(args, file_values: dict, argv: list[str]) -> None:
    """A data source given on the command line replaces the other kind set in the YAML file."""
    given = {a.split("=")[0].lstrip("-") for a in argv if a.startswith("--")}
    for flag, other in (("train_data_dir", "dataset_name"), ("dataset_name", "train_data_dir")):
        if flag in given and other not in given and other in file_values:
            setattr(args, other, None)


def validate_args(args: argparse.Namespace) -> None:
    """Checks that need no files beyond the flags themselves; each error names the flag."""
    def fail(msg):
        raise ValueError(msg)

    if not args.pretrained_model_name_or_path:
        fail("--pretrained_model_name_or_path is required")
    if not args.dataset_name and not args.train_data_dir:
        fail("give --dataset_name or --train_data_dir")
    if args.dataset_name and args.train_data_dir:
        fail("--dataset_name and --train_data_dir contradict each other: give one")
    if args.resolution <= 0 or args.resolution % 8:
        fail(f"--resolution {args.resolution} must be a positive multiple of 8 (the VAE downsamples by 8)")
    if args.ambient_timestep is not None and not 0 <= args.ambient_timestep < 1000:
        fail(f"--ambient_timestep {args.ambient_timestep} must be in [0, num_train_timesteps)")
    if args.train_batch_size < 1 or args.gradient_accumulation_steps < 1:
        fail("--train_batch_size and --gradient_accumulation_steps must be >= 1")
    if args.consistency_weight < 0:
        fail("--consistency_weight must be >= 0")
    if args.consistency_weight > 0 and args.ambient_timestep == 0:
        fail("--consistency_weight > 0 needs --ambient_timestep > 0 (consistency teaches the timesteps below t_n)")
    if args.max_nonfinite_steps < 1:
        fail("--max_nonfinite_steps must be >= 1")
    if args.consistency_steps < 1:
        fail("--consistency_steps must be >= 1")
    if args.consistency_max_delta is not None and args.consistency_max_delta < 1:
        fail("--consistency_max_delta must be >= 1")
    if args.finetune == "full" and args.train_text_encoder:
        fail("--train_text_encoder trains LoRA adapters on the text encoders and goes with --finetune lora")
    if args.rank < 1:
        fail("--rank must be >= 1")
    if args.push_checkpoints_to_hub and not args.push_to_hub:
        fail("--push_checkpoints_to_hub needs --push_to_hub (and --hub_model_id or the output folder's name)")
    if args.push_training_state and not args.push_checkpoints_to_hub:
        fail("--push_training_state goes with --push_checkpoints_to_hub")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        fail("--max_train_steps must be >= 1")
    if args.checkpointing_steps < 1 or args.validation_steps < 1 or args.logging_steps < 1:
        fail("--checkpointing_steps, --validation_steps and --logging_steps must be >= 1")
    if args.enable_bucket and not args.min_bucket_reso <= args.resolution <= args.max_bucket_reso:
        fail("--resolution must lie between --min_bucket_reso and --max_bucket_reso")
