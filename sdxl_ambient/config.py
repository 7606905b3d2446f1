"""Flags, YAML configs and the settings built from them.

    accelerate launch train_sdxl_ambient.py --config configs/NAME.yaml [--flag value ...]

Each flag is defined once, in an argument group that every command needing it adds
(``corrupt`` shares the model, data and noise groups with training; ``generate`` and
``memorization`` share the sampling group). YAML keys are the training flags without the
dashes; each value passes exactly the type and choices check of the same value on the command
line, and the command line overrides the file. :func:`load_train_config` checks everything that
needs no model and returns typed settings per concern, so bad flags fail before any model loads.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from sdxl_ambient.cache import CacheSettings
from sdxl_ambient.data import DataConfig, DataSource
from sdxl_ambient.errors import UserError
from sdxl_ambient.files import LATENT_CACHE_DIR
from sdxl_ambient.models import DTYPES
from sdxl_ambient.sampling import DEFAULT_JUMP_MARGIN
from sdxl_ambient.step import ObjectiveSettings
from sdxl_ambient.validation import ValidationSettings

LR_SCHEDULERS = ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"]


# ----------------------------------------------------------------------------- argument groups


class FlagParser(argparse.ArgumentParser):
    """argparse, with its errors as a :class:`UserError` (one line, exit status 2)."""

    def error(self, message):
        raise UserError(message)



def add_model_arguments(parser, *, base: bool = True, required: bool = False) -> None:
    g = parser.add_argument_group("model")
    if base:
        g.add_argument("--pretrained_model_name_or_path", type=str, default=None, required=required,
                       help="SDXL pipeline: Hub id or local folder.")
    g.add_argument("--pretrained_vae_model_name_or_path", type=str, default=None,
                   help="A separate VAE (e.g. madebyollin/sdxl-vae-fp16-fix); it then runs in the training precision.")
    g.add_argument("--revision", type=str, default=None)
    g.add_argument("--variant", type=str, default=None, help="Weights variant, e.g. fp16.")


def add_data_source_arguments(parser) -> None:
    """Where the training images and captions come from (training, ``corrupt`` and ``memorization``
    read them alike: :func:`data_source`)."""
    g = parser.add_argument_group("data")
    g.add_argument("--dataset_name", type=str, default=None, help="A Hub dataset (or a folder load_from_disk reads).")
    g.add_argument("--dataset_config_name", type=str, default=None)
    g.add_argument("--train_data_dir", type=str, default=None,
                   help="Image folder with metadata.jsonl (or .txt captions) or a save_to_disk folder; for training, "
                        "also a noisy-latent dataset from `sdxl-ambient corrupt`.")
    g.add_argument("--image_column", type=str, default="image")
    g.add_argument("--caption_column", type=str, default="text")
    g.add_argument("--max_train_samples", type=int, default=None)
    g.add_argument("--skip_broken_images", action="store_true", help="Skip unreadable images (each is reported) instead of stopping.")
    g.add_argument("--allow_empty_captions", action="store_true")


def add_data_arguments(parser) -> None:
    """Where the images come from and how each becomes a training example (training and ``corrupt``)."""
    add_data_source_arguments(parser)
    g = parser.add_argument_group("examples")
    g.add_argument("--resolution", type=int, default=1024)
    g.add_argument("--center_crop", action="store_true")
    g.add_argument("--random_flip", action="store_true")
    g.add_argument("--enable_bucket", action="store_true", help="Aspect-ratio bucketing (kohya's flag).")
    g.add_argument("--min_bucket_reso", type=int, default=512)
    g.add_argument("--max_bucket_reso", type=int, default=2048)
    g.add_argument("--bucket_reso_steps", type=int, default=64)


def add_noise_arguments(parser, *, required: bool = False) -> None:
    """The data's noise level and the secret seed of its fixed noise (training and ``corrupt``)."""
    g = parser.add_argument_group("noise")
    g.add_argument("--ambient_timestep", type=int, default=None, required=required,
                   help="t_n: the timestep whose noise level the training latents carry (0 = clean). "
                        + ("" if required else "Default: the t_n of a noisy-latent dataset given as --train_data_dir, else 0."))
    g.add_argument("--noise_seed", type=str, default=None,
                   help="Seeds each example's fixed noise (and its VAE sample, crop and flip). Default: a fresh secret "
                        "seed, kept only until the latent cache is complete. Whoever knows it can remove the noise: "
                        "give one only to rebuild identically, and keep it private. Never written to settings or logs.")


def add_hub_arguments(parser) -> None:
    """The Hub repo a run pushes to (training and ``push``)."""
    parser.add_argument("--hub_model_id", type=str, default=None, help="The Hub repo (default: the output folder's name).")
    parser.add_argument("--hub_private_repo", action="store_true")


def add_device_argument(parser) -> None:
    parser.add_argument("--device", default=None, help="Where to run (default: cuda if available, else cpu).")


def add_sampling_arguments(parser) -> None:
    """How a model samples (``generate`` and ``memorization``)."""
    g = parser.add_argument_group("sampling")
    g.add_argument("--num_inference_steps", type=int, default=30)
    g.add_argument("--guidance_scale", type=float, default=5.0)
    g.add_argument("--resolution", type=int, default=1024, help="height and width of the images")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--scheduler", default=None, help="a diffusers scheduler class name, e.g. DPMSolverMultistepScheduler")
    g.add_argument("--jump_margin", type=int, default=DEFAULT_JUMP_MARGIN,
                   help="truncated sampling jumps to x0 from the last step >= ambient_timestep + jump_margin")
    g.add_argument("--negative_prompt", default=None)
    g.add_argument("--batch_size", type=int, default=4, help="prompts per sampling call")
    g.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: float16 on a GPU, float32 on the CPU")
    add_device_argument(g)


def _add_objective_arguments(parser) -> None:
    g = parser.add_argument_group("ambient objective")
    g.add_argument("--prediction_type", type=str, default=None, choices=["epsilon", "v_prediction", "sample"],
                   help="Override the scheduler's prediction type.")
    g.add_argument("--loss_weighting", type=str, default="epsilon", choices=["epsilon", "observation"])
    g.add_argument("--loss_weight_cap", type=float, default=None,
                   help="Cap of the epsilon-matched weight relative to SNR(t), >= 1 (default: objectives.DEFAULT_WEIGHT_CAP).")
    g.add_argument("--consistency_weight", type=float, default=0.0, help="Coefficient of the consistency loss (0 = off).")
    g.add_argument("--consistency_steps", type=int, default=1, help="Reverse-process steps in each consistency chain.")
    g.add_argument("--consistency_max_delta", type=int, default=None, help="Largest t - s of the chain (default t_n).")
    g.add_argument("--consistency_start_step", type=int, default=0, help="Optimizer step from which the consistency loss is on.")
    g.add_argument("--max_nonfinite_steps", type=int, default=5,
                   help="Stop after this many non-finite losses in a row (each one's step is skipped with a warning).")


def _add_training_arguments(parser) -> None:
    g = parser.add_argument_group("training")
    g.add_argument("--cache_dir", type=str, default=None, help="Where the noisy-latent cache goes (default OUTPUT_DIR/latent_cache).")
    g.add_argument("--dataloader_num_workers", type=int, default=0)
    g.add_argument("--ddp_timeout", type=int, default=7200,
                   help="Seconds a process waits for the others (e.g. while the main process builds the latent cache).")
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
    g.add_argument("--lr_scheduler", type=str, default="constant", choices=LR_SCHEDULERS)
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
    g.add_argument("--seed", type=int, default=None,
                   help="Seeds training (timesteps, noise draws, data order, adapter init). Default: a fresh one, saved.")


def _add_output_arguments(parser) -> None:
    g = parser.add_argument_group("outputs, checkpoints, validation, Hub")
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
    g.add_argument("--push_to_hub", action="store_true",
                   help="Create the Hub repo at the start (a token and the Hub checked before any model loads), push at the end.")
    add_hub_arguments(g)
    g.add_argument("--push_checkpoints_to_hub", action="store_true",
                   help="Upload each checkpoint's weights in the background (subfolder checkpoint-STEP).")
    g.add_argument("--hub_checkpoint_mode", type=str, default="subfolder", choices=["subfolder", "branch"],
                   help="Where pushed checkpoints go: subfolder checkpoint-STEP on main, or a branch checkpoint-STEP.")
    g.add_argument("--push_training_state", action="store_true",
                   help="With --push_checkpoints_to_hub, also upload optimizer and accelerate state.")
    g.add_argument("--hub_token", type=str, default=None, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    """The training script's flags."""
    p = FlagParser(
        prog="train_sdxl_ambient.py",
        description="Fine-tune SDXL (LoRA or full) on noisy data with the ambient Tweedie + consistency objectives.",
    )
    p.add_argument("--config", type=str, default=None, help="YAML file whose keys are these flags; the command line overrides it.")
    add_model_arguments(p)
    add_data_arguments(p)
    add_noise_arguments(p)
    _add_objective_arguments(p)
    _add_training_arguments(p)
    _add_output_arguments(p)
    return p


# ----------------------------------------------------------------------------- YAML


def read_yaml(path: str) -> dict:
    """A YAML file holding a mapping; errors name the file."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of flag names to values")
    return data


def _yaml_value(action: argparse.Action, value, where: str):
    """A YAML value through the flag's own type and choices, as argparse treats the same text on
    the command line; a YAML boolean only for an on/off flag."""
    if action.nargs == 0:  # store_true: the flag is either given or not
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false (a YAML boolean, unquoted), got {value!r}")
        return value
    if value is None:
        return action.default
    if isinstance(value, bool):
        word = "yes" if value else "no"
        raise UserError(f"{where}: YAML reads {word} unquoted as the boolean {value}; write it in quotes (\"{word}\") "
                        f"if you mean the word")
    if isinstance(value, (list, dict)):
        raise UserError(f"{where}: expected one value, got a YAML {type(value).__name__}")
    text = value if isinstance(value, str) else str(value)
    try:
        converted = action.type(text) if action.type is not None else text
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        kind = getattr(action.type, "__name__", "valid")
        raise UserError(f"{where}: {value!r} is not a valid {kind} value") from None
    if action.choices is not None and converted not in action.choices:
        raise UserError(f"{where}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return converted


def yaml_defaults(parser: argparse.ArgumentParser, values: dict, path: str) -> dict:
    """The YAML file's values as parser defaults, each checked as on the command line."""
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise UserError(f"--config {path}: unknown keys {unknown} (keys are the flag names, e.g. learning_rate)")
    return {key: _yaml_value(actions[key], value, f"--config {path}: {key}") for key, value in values.items()}


def _prefer_command_line_source(args, file_values: dict, argv: list[str]) -> None:
    """A data source given on the command line replaces the other kind set in the YAML file."""
    given = {a.split("=")[0].lstrip("-") for a in argv if a.startswith("--")}
    for flag, other in (("train_data_dir", "dataset_name"), ("dataset_name", "train_data_dir")):
        if flag in given and other not in given and other in file_values:
            setattr(args, other, None)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags after the YAML file and the command line, with :func:`check_flags` passed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    values = {}
    if pre.config:
        values = read_yaml(pre.config)
        parser.set_defaults(**yaml_defaults(parser, values, pre.config))
    args = parser.parse_args(argv)
    _prefer_command_line_source(args, values, argv)
    check_flags(args)
    return args


# ----------------------------------------------------------------------------- checks


def _at_least(args, minimum: int, *flags: str) -> None:
    for flag in flags:
        value = getattr(args, flag)
        if value is not None and value < minimum:
            raise UserError(f"--{flag} {value} must be >= {minimum}")


def check_flags(args: argparse.Namespace) -> None:
    """The rules between training flags that no settings object owns; each error names the flag."""
    if args.hub_token:
        raise UserError("--hub_token is not accepted (it would end up in logs and shell history): "
                        "set HF_TOKEN in the environment or run `hf auth login`")
    if not args.pretrained_model_name_or_path:
        raise UserError("--pretrained_model_name_or_path is required")
    _at_least(args, 1, "train_batch_size", "gradient_accumulation_steps", "rank", "max_train_steps", "num_train_epochs",
              "checkpointing_steps", "validation_steps", "logging_steps", "max_nonfinite_steps", "checkpoints_total_limit",
              "num_validation_images", "validation_inference_steps")
    _at_least(args, 0, "lr_warmup_steps", "dataloader_num_workers")
    if args.learning_rate <= 0:
        raise UserError(f"--learning_rate {args.learning_rate} must be > 0")
    if args.finetune == "full" and args.train_text_encoder:
        raise UserError("--train_text_encoder trains LoRA adapters on the text encoders and goes with --finetune lora")
    if args.push_checkpoints_to_hub and not args.push_to_hub:
        raise UserError("--push_checkpoints_to_hub needs --push_to_hub (and --hub_model_id or the output folder's name)")
    if args.push_training_state and not args.push_checkpoints_to_hub:
        raise UserError("--push_training_state goes with --push_checkpoints_to_hub")


# ----------------------------------------------------------------------------- settings per concern


def data_source(args) -> DataSource:
    return DataSource(train_data_dir=args.train_data_dir, dataset_name=args.dataset_name,
                      dataset_config_name=args.dataset_config_name, image_column=args.image_column,
                      caption_column=args.caption_column, max_train_samples=args.max_train_samples,
                      skip_broken_images=args.skip_broken_images, allow_empty_captions=args.allow_empty_captions)


def data_config(args) -> DataConfig:
    return DataConfig(resolution=args.resolution, center_crop=args.center_crop, random_flip=args.random_flip,
                      enable_bucket=args.enable_bucket, min_bucket_reso=args.min_bucket_reso,
                      max_bucket_reso=args.max_bucket_reso, bucket_reso_steps=args.bucket_reso_steps)


def cache_settings(args) -> CacheSettings:
    return CacheSettings(cache_dir=Path(args.cache_dir or Path(args.output_dir) / LATENT_CACHE_DIR),
                         ambient_timestep=args.ambient_timestep, noise_seed=args.noise_seed)


def objective_settings(args) -> ObjectiveSettings:
    return ObjectiveSettings(weighting=args.loss_weighting, weight_cap=args.loss_weight_cap,
                             consistency_weight=args.consistency_weight, consistency_steps=args.consistency_steps,
                             consistency_max_delta=args.consistency_max_delta,
                             consistency_start_step=args.consistency_start_step)


def validation_settings(args) -> ValidationSettings | None:
    if not args.validation_prompt:
        return None
    return ValidationSettings(prompt=args.validation_prompt, num_images=args.num_validation_images,
                              every_steps=args.validation_steps, inference_steps=args.validation_inference_steps,
                              resolution=args.resolution)


@dataclass(frozen=True)
class TrainConfig:
    """A training run's configuration: the flags as given (never changed afterwards) and the typed
    settings of each concern built from them."""

    flags: argparse.Namespace
    source: DataSource
    data: DataConfig
    cache: CacheSettings
    objective: ObjectiveSettings
    validation: ValidationSettings | None


def load_train_config(argv: list[str] | None = None) -> TrainConfig:
    """Parse and check every flag; nothing is read beyond the YAML file and nothing is written."""
    args = parse_args(argv)
    objective = objective_settings(args)
    if args.ambient_timestep is not None:
        objective.check_timestep(args.ambient_timestep)
    return TrainConfig(flags=args, source=data_source(args), data=data_config(args), cache=cache_settings(args),
                       objective=objective, validation=validation_settings(args))
