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
from sdxl_ambient.compile import COMPILE_MODES
from sdxl_ambient.data import DataConfig, DataSource, check_resolution, check_source_names
from sdxl_ambient.errors import UserError
from sdxl_ambient.files import LATENT_CACHE_DIR
from sdxl_ambient.heldout import HeldOutSettings, split_size
from sdxl_ambient.models import DTYPES
from sdxl_ambient.objectives import check_ambient_timestep
from sdxl_ambient.optimizers import OPTIMIZERS, OptimizerSettings
from sdxl_ambient.sampling import DEFAULT_GUIDANCE_SCALE, DEFAULT_JUMP_MARGIN
from sdxl_ambient.step import DEFAULT_CONSISTENCY_FRACTION, ObjectiveSettings
from sdxl_ambient.validation import ValidationSettings

LR_SCHEDULERS = ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"]


# ----------------------------------------------------------------------------- argument groups


class FlagParser(argparse.ArgumentParser):
    """argparse, with its errors as a :class:`UserError` (one line, exit status 2)."""

    def error(self, message):
        raise UserError(message)


def str_to_bool(text: str) -> bool:
    """A flag that takes a value (diffusers' ``--prodigy_decouple True``): true/false, yes/no, 1/0."""
    word = str(text).strip().lower()
    if word in ("true", "yes", "1"):
        return True
    if word in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")



def add_model_arguments(parser, *, base: bool = True, required: bool = False) -> None:
    g = parser.add_argument_group("model")
    if base:
        g.add_argument("--pretrained_model_name_or_path", type=str, default=None, required=required,
                       help="SDXL pipeline: Hub id or local folder.")
    g.add_argument("--pretrained_vae_model_name_or_path", type=str, default=None,
                   help="A separate VAE (e.g. madebyollin/sdxl-vae-fp16-fix); it then runs in the training precision.")
    g.add_argument("--revision", type=str, default=None)
    g.add_argument("--variant", type=str, default=None, help="Weights variant, e.g. fp16.")


SOURCE_KEYS = {"name": str, "train_data_dir": str, "dataset_name": str, "dataset_config_name": str, "image_column": str,
               "caption_column": str, "max_train_samples": int, "ambient_timestep": int, "repeats": int}


def check_source_list(value, where: str) -> list[dict]:
    """A list of data sources: mappings of SOURCE_KEYS, each value of its key's type; errors name the source."""
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: expected a list of data sources, each a mapping with train_data_dir or dataset_name "
                        "(and optionally ambient_timestep, repeats, name, caption_column, ...)")
    for n, entry in enumerate(value, 1):
        if not isinstance(entry, dict):
            raise UserError(f"{where}: source {n} is a {type(entry).__name__}, expected a mapping")
        unknown = sorted(set(entry) - set(SOURCE_KEYS))
        if unknown:
            raise UserError(f"{where}: source {n}: unknown keys {unknown} (known: {', '.join(SOURCE_KEYS)})")
        for key, kind in SOURCE_KEYS.items():
            item = entry.get(key)
            if item is not None and (not isinstance(item, kind) or isinstance(item, bool)):
                raise UserError(f"{where}: source {n}: {key} {item!r} is not a valid {kind.__name__} value")
    return value


def source_list_file(text: str) -> list[dict]:
    """``--data_sources`` on the command line: a YAML or JSON file holding the list (in a --config YAML
    file the list may also be written inline); both pass :func:`check_source_list`."""
    return check_source_list(_yaml_file(text, "--data_sources"), f"--data_sources {text}")


source_list_file.__name__ = "data sources file"


def add_data_source_arguments(parser) -> None:
    """Where the training images and captions come from (training, ``corrupt`` and ``memorization``
    read them alike: :func:`data_source`)."""
    g = parser.add_argument_group("data")
    g.add_argument("--dataset_name", type=str, default=None, help="A Hub dataset (or a folder load_from_disk reads).")
    g.add_argument("--dataset_config_name", type=str, default=None)
    g.add_argument("--train_data_dir", type=str, default=None,
                   help="Image folder with metadata.jsonl (or .txt captions) or a save_to_disk folder; for training, "
                        "also a noisy-latent dataset from `sdxl-ambient corrupt`. A metadata column ambient_timestep "
                        "gives an image its own t_n.")
    g.add_argument("--image_column", type=str, default="image")
    g.add_argument("--caption_column", type=str, default="text")
    g.add_argument("--max_train_samples", type=int, default=None)
    g.add_argument("--skip_broken_images", action="store_true", help="Skip unreadable images (each is reported) instead of stopping.")
    g.add_argument("--allow_empty_captions", action="store_true")


def add_data_arguments(parser) -> None:
    """Where the images come from and how each becomes a training example (training and ``corrupt``)."""
    add_data_source_arguments(parser)
    parser.add_argument("--data_sources", type=source_list_file, default=None,
                        help="Several data sources, each with its own t_n and repeat count: a YAML/JSON file with a list of "
                             "mappings (train_data_dir or dataset_name, ambient_timestep, repeats, name, caption_column, "
                             "image_column, max_train_samples); in a --config file, the list itself.")
    g = parser.add_argument_group("examples")
    add_resolution_argument(g)
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


def add_resolution_argument(parser) -> None:
    """--resolution, for training's examples and sampling's images alike (checked by :func:`data.check_resolution`)."""
    parser.add_argument("--resolution", type=int, default=1024,
                        help="Image side in pixels, a multiple of 8: in training, the side each example is resized and "
                             "cropped to (with --enable_bucket, the area of the buckets); in sampling, the height and "
                             "width of the images.")


def add_max_train_steps_argument(parser, help: str = "Overrides --num_train_epochs.") -> None:
    """--max_train_steps: the training run's length (the demo passes it on to its training run)."""
    parser.add_argument("--max_train_steps", type=int, default=None, help=help)


def add_embedder_arguments(parser) -> None:
    """The image embedders of the evaluation commands (``memorization`` and ``quality``)."""
    from sdxl_ambient.evaluation.features import DEFAULT_EMBEDDER

    parser.add_argument("--embedder", default=DEFAULT_EMBEDDER, help="DINOv2 Hub name or local folder")
    parser.add_argument("--clip_model", default=None,
                        help="optional CLIP model (Hub name or folder): in memorization a second similarity, in quality "
                             "the CLIP score (or the features with --features clip)")


def add_sampling_arguments(parser) -> None:
    """How a model samples (``generate`` and ``memorization``), checked by :func:`check_sampling_flags`."""
    g = parser.add_argument_group("sampling")
    g.add_argument("--num_inference_steps", type=int, default=30)
    g.add_argument("--guidance_scale", type=float, default=DEFAULT_GUIDANCE_SCALE)
    add_resolution_argument(g)
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
    g.add_argument("--consistency_fraction", type=float, default=DEFAULT_CONSISTENCY_FRACTION,
                   help="Fraction of each batch that gets the consistency term (rescaled, so its expectation is unchanged).")
    g.add_argument("--consistency_one_sided", action="store_true",
                   help="Backpropagate the consistency term through one chain only (same value and expected gradient).")
    g.add_argument("--max_nonfinite_steps", type=int, default=5,
                   help="Stop after this many non-finite losses in a row (each one's step is skipped with a warning).")


# Flags of diffusers' scripts that contradict the ambient objective: (flag, how it is "on", why it is refused).
CONTRADICTING_FLAGS = (
    ("noise_offset", lambda v: v not in (None, 0),
     "offset noise adds noise shared across each channel, but the ambient loss renoises the observation with the "
     "isotropic Gaussian noise its own noise was drawn from: Tweedie's formula then no longer gives E[x0 | x_t]"),
    ("snr_gamma", lambda v: v is not None,
     "the ambient loss sets its own weight per timestep (--loss_weighting epsilon with --loss_weight_cap), which "
     "replaces min-SNR weighting"),
    ("input_perturbation", lambda v: v not in (None, 0),
     "input perturbation feeds the network x_t made with other noise than the target's, but the ambient target "
     "E[y | x_t] holds only for x_t renoised from the observation with isotropic Gaussian noise"),
)


def _add_refused_arguments(parser) -> None:
    """diffusers' and kohya's names for noise and weighting tricks, accepted so that they are refused with a reason."""
    g = parser.add_argument_group("refused under the ambient objective (accepted only to explain why)")
    g.add_argument("--noise_offset", type=float, default=0.0, help="Refused: the ambient loss assumes isotropic Gaussian noise.")
    g.add_argument("--snr_gamma", "--min_snr_gamma", dest="snr_gamma", type=float, default=None,
                   help="Refused: the ambient loss weighting (--loss_weighting, --loss_weight_cap) replaces min-SNR.")
    g.add_argument("--input_perturbation", "--ip_noise_gamma", dest="input_perturbation", type=float, default=0.0,
                   help="Refused: the ambient loss assumes x_t renoised from the observation with isotropic Gaussian noise.")


def refuse_contradicting_flags(args) -> None:
    """One line naming the flag and why it contradicts the ambient math, before any model loads."""
    for flag, given, reason in CONTRADICTING_FLAGS:
        value = getattr(args, flag)
        if given(value):
            raise UserError(f"--{flag} {value} is refused: {reason}")


def _add_training_arguments(parser) -> None:
    g = parser.add_argument_group("training")
    g.add_argument("--cache_dir", type=str, default=None, help="Where the noisy-latent cache goes (default OUTPUT_DIR/latent_cache).")
    g.add_argument("--dataloader_num_workers", type=int, default=0)
    g.add_argument("--ddp_timeout", type=int, default=7200,
                   help="Seconds a process waits for the others (e.g. while the main process builds the latent cache).")
    g.add_argument("--finetune", type=str, default="lora", choices=["lora", "full"])
    g.add_argument("--rank", type=int, default=4, help="LoRA rank.")
    g.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default: rank).")
    g.add_argument("--use_dora", action="store_true",
                   help="DoRA (weight-decomposed LoRA, peft): a trained magnitude per output row beside the LoRA update.")
    g.add_argument("--train_text_encoder", action="store_true", help="Also train LoRA adapters on both text encoders.")
    g.add_argument("--proportion_empty_prompts", type=float, default=0.0,
                   help="Probability that a sample's caption is replaced by the empty prompt (drawn per sample at every "
                        "step), for classifier-free guidance.")
    g.add_argument("--train_batch_size", type=int, default=1)
    g.add_argument("--num_train_epochs", type=int, default=100)
    add_max_train_steps_argument(g)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--scale_lr", action="store_true")
    g.add_argument("--lr_scheduler", type=str, default="constant", choices=LR_SCHEDULERS)
    g.add_argument("--lr_warmup_steps", type=int, default=500)
    g.add_argument("--optimizer", type=str, default="adamw", choices=list(OPTIMIZERS),
                   help="adamw (torch's fused AdamW, or 8-bit with --use_8bit_adam), prodigy (pip install 'sdxl-ambient[prodigy]'; "
                        "--learning_rate 1.0 multiplies its own step size) or adafactor (fixed learning rate, no first moment).")
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes' 8-bit AdamW (pip install 'sdxl-ambient[bnb]').")
    g.add_argument("--text_encoder_lr", type=float, default=None,
                   help="Learning rate of the text encoders' LoRA with --train_text_encoder (default: --learning_rate).")
    g.add_argument("--prodigy_beta3", type=float, default=None,
                   help="Prodigy's coefficient for its step-size running averages (default: sqrt(adam_beta2)).")
    g.add_argument("--prodigy_decouple", type=str_to_bool, default=True, help="Prodigy: AdamW-style decoupled weight decay.")
    g.add_argument("--prodigy_use_bias_correction", type=str_to_bool, default=True, help="Prodigy: Adam's bias correction.")
    g.add_argument("--prodigy_safeguard_warmup", type=str_to_bool, default=True,
                   help="Prodigy: leave the learning rate out of the step-size estimate's denominator during warm-up.")
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
    g.add_argument("--torch_compile", action="store_true",
                   help="Compile the UNet's repeated transformer blocks (regional torch.compile, static shapes: one "
                        "graph per bucket); the same steps as eager, faster on a GPU after the first steps.")
    g.add_argument("--torch_compile_mode", type=str, default="default", choices=list(COMPILE_MODES),
                   help="torch.compile mode; reduce-overhead captures each step's blocks as CUDA graphs.")
    g.add_argument("--seed", type=int, default=None,
                   help="Seeds training (timesteps, noise draws, data order, adapter init). Default: a fresh one, saved.")


def add_output_folder_arguments(parser, *, default: str | None = None, help: str | None = None) -> None:
    """--output_dir (required unless a default is given) and --overwrite_output_dir, as every command has them."""
    parser.add_argument("--output_dir", type=str, default=default, required=default is None, help=help)
    parser.add_argument("--overwrite_output_dir", action="store_true",
                        help="Write into an output folder that already holds files: this command's earlier results "
                             "there are removed first (training's checkpoints too); files it did not write are never "
                             "touched, and a folder where one of them has a name it writes is still refused.")


def _add_output_arguments(parser) -> None:
    g = parser.add_argument_group("outputs, checkpoints, validation, Hub")
    add_output_folder_arguments(g, default="sdxl-ambient-model")
    g.add_argument("--logging_dir", type=str, default="logs")
    g.add_argument("--report_to", type=str, default="tensorboard", help="tensorboard, wandb, all or none.")
    g.add_argument("--logging_steps", type=int, default=10, help="Read losses from the device every N steps.")
    g.add_argument("--checkpointing_steps", type=int, default=500)
    g.add_argument("--checkpoints_total_limit", type=int, default=None)
    g.add_argument("--resume_from_checkpoint", type=str, default=None, help="A checkpoint folder or `latest`.")
    g.add_argument("--validation_prompt", type=str, default=None)
    g.add_argument("--num_validation_images", type=int, default=4)
    g.add_argument("--validation_steps", type=int, default=500,
                   help="Every N steps: validation images (with --validation_prompt) and the held-out loss (with --validation_split).")
    g.add_argument("--validation_split", type=split_size, default=None,
                   help="Hold out noisy examples (a fraction in (0, 1), or a count) for a validation loss: the ambient loss "
                        "on them at fixed timesteps and noise, logged as validation_loss.")
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
    _add_refused_arguments(p)
    _add_output_arguments(p)
    return p


# Flags a resume may change: they decide what is logged, saved, shown or uploaded, or how fast a
# step runs, never the weights. Every other flag is part of the run's fingerprint (train.run_fingerprint).
RESUME_SAFE_FLAGS = frozenset({
    "config", "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "logging_dir", "report_to", "logging_steps",
    "checkpointing_steps", "checkpoints_total_limit", "validation_prompt", "num_validation_images", "validation_steps",
    "validation_inference_steps", "push_to_hub", "hub_model_id", "hub_private_repo", "push_checkpoints_to_hub",
    "hub_checkpoint_mode", "push_training_state", "hub_token", "dataloader_num_workers", "ddp_timeout",
    "max_nonfinite_steps", "gradient_checkpointing", "enable_xformers_memory_efficient_attention", "allow_tf32",
    "torch_compile", "torch_compile_mode",
})
# Flags a resume compares through what they resolve to: the data (which examples, their noise and how
# images became latents, whatever folder holds them), t_n, the seed, the learning rate, the objective's
# defaults, the precision; the run's length only where the learning rate schedule depends on it.
RESUME_RESOLVED_FLAGS = frozenset({
    "dataset_name", "dataset_config_name", "train_data_dir", "image_column", "caption_column", "max_train_samples",
    "skip_broken_images", "allow_empty_captions", "cache_dir", "noise_seed", "resolution", "center_crop", "random_flip",
    "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "ambient_timestep", "seed",
    "learning_rate", "scale_lr", "loss_weighting", "loss_weight_cap", "consistency_weight", "consistency_steps",
    "consistency_max_delta", "consistency_start_step", "consistency_fraction", "consistency_one_sided",
    "mixed_precision", "max_train_steps", "num_train_epochs",
})


def model_paths(args, *, base: bool = True) -> list[tuple[str, object]]:
    """The model a command reads (:func:`add_model_arguments` with ``base``), as (flag, value)."""
    paths = [("--pretrained_model_name_or_path", args.pretrained_model_name_or_path)] if base else []
    return paths + [("--pretrained_vae_model_name_or_path", args.pretrained_vae_model_name_or_path)]


def data_source_paths(args) -> list[tuple[str, object]]:
    """The data a command reads (:func:`add_data_source_arguments`), as (flag, value)."""
    return [("--train_data_dir", args.train_data_dir), ("--dataset_name", args.dataset_name)]


def input_paths(args) -> list[tuple[str, object]]:
    """The model and data training and ``corrupt`` read (:func:`add_model_arguments`, :func:`add_data_arguments`),
    as (flag, value): what their output folders must stay apart from."""
    paths = model_paths(args) + data_source_paths(args)
    for entry in args.data_sources or []:
        paths += [(f"--data_sources {key}", entry.get(key)) for key in ("train_data_dir", "dataset_name")]
    return paths


# ----------------------------------------------------------------------------- YAML


def _yaml_file(path: str, flag: str):
    """The value a YAML (or JSON) file holds; errors name the flag and the file."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{flag} {path}: no such file")
    try:
        return yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{flag} {path}: not valid YAML ({str(exc).splitlines()[0]})") from None


def read_yaml(path: str) -> dict:
    """A YAML file holding a mapping; errors name the file."""
    data = _yaml_file(path, "--config") or {}
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
    if isinstance(value, bool) and action.type is str_to_bool:
        return value
    if isinstance(value, bool):
        word = "yes" if value else "no"
        raise UserError(f"{where}: YAML reads {word} unquoted as the boolean {value}; write it in quotes (\"{word}\") "
                        f"if you mean the word")
    if isinstance(value, list) and action.type is source_list_file:
        return check_source_list(value, where)
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


def _without_replaced_sources(file_values: dict, argv: list[str]) -> dict:
    """The YAML file's values less the data sources of another kind than one given on the command line,
    which replaces them."""
    given = {a.split("=")[0].lstrip("-") for a in argv if a.startswith("--")}
    kinds = ("train_data_dir", "dataset_name", "data_sources")
    if not given & set(kinds):
        return file_values
    return {key: value for key, value in file_values.items() if key in given or key not in kinds}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags after the YAML file and the command line, with :func:`check_flags` passed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        values = _without_replaced_sources(read_yaml(pre.config), argv)
        parser.set_defaults(**yaml_defaults(parser, values, pre.config))
    args = parser.parse_args(argv)
    check_flags(args)
    return args


# ----------------------------------------------------------------------------- checks


def at_least(args, minimum: int, *flags: str) -> None:
    """Each of ``flags`` (when given) is >= ``minimum``."""
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
    refuse_contradicting_flags(args)
    at_least(args, 1, "train_batch_size", "gradient_accumulation_steps", "rank", "max_train_steps", "num_train_epochs",
              "checkpointing_steps", "validation_steps", "logging_steps", "max_nonfinite_steps", "checkpoints_total_limit",
              "num_validation_images", "validation_inference_steps")
    at_least(args, 0, "lr_warmup_steps", "dataloader_num_workers")
    if args.learning_rate <= 0:
        raise UserError(f"--learning_rate {args.learning_rate} must be > 0")
    if not 0 <= args.proportion_empty_prompts <= 1:
        raise UserError(f"--proportion_empty_prompts {args.proportion_empty_prompts} must be in [0, 1]")
    if args.data_sources and (args.train_data_dir or args.dataset_name):
        raise UserError("--data_sources lists every source: give it or --train_data_dir / --dataset_name, not both")
    if args.use_dora and args.finetune != "lora":
        raise UserError("--use_dora is a form of LoRA: it goes with --finetune lora")
    if args.finetune == "full" and args.train_text_encoder:
        raise UserError("--train_text_encoder trains LoRA adapters on the text encoders and goes with --finetune lora")
    if args.push_checkpoints_to_hub and not args.push_to_hub:
        raise UserError("--push_checkpoints_to_hub needs --push_to_hub (and --hub_model_id or the output folder's name)")
    if args.push_training_state and not args.push_checkpoints_to_hub:
        raise UserError("--push_training_state goes with --push_checkpoints_to_hub")
    if args.text_encoder_lr is not None and not args.train_text_encoder:
        raise UserError("--text_encoder_lr sets the text encoders' learning rate: it goes with --train_text_encoder")


def check_sampling_flags(args: argparse.Namespace) -> None:
    """The sampling group's rules (``generate`` and ``memorization``), before any model loads."""
    at_least(args, 1, "num_inference_steps", "batch_size")
    at_least(args, 0, "jump_margin")
    check_resolution(args.resolution)


# ----------------------------------------------------------------------------- settings per concern


def data_source(args, **entry) -> DataSource:
    """The one --train_data_dir / --dataset_name source, or (``entry``) one of --data_sources over the flags' values."""
    common = dict(train_data_dir=args.train_data_dir, dataset_name=args.dataset_name,
                  dataset_config_name=args.dataset_config_name, image_column=args.image_column,
                  caption_column=args.caption_column, max_train_samples=args.max_train_samples,
                  skip_broken_images=args.skip_broken_images, allow_empty_captions=args.allow_empty_captions)
    if entry:
        common.update(train_data_dir=None, dataset_name=None, dataset_config_name=None)
    return DataSource(**{**common, **{k: v for k, v in entry.items() if v is not None}})


def data_sources(args) -> tuple[DataSource, ...]:
    """--data_sources (each entry's keys over the flags' values), or the one --train_data_dir / --dataset_name."""
    if not args.data_sources:
        return (data_source(args),)
    sources = []
    for n, entry in enumerate(args.data_sources, 1):
        try:
            sources.append(data_source(args, **entry))
        except UserError as err:
            raise UserError(f"--data_sources: source {n}: {err}") from None
    check_source_names(sources)
    return tuple(sources)


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
                             consistency_start_step=args.consistency_start_step,
                             consistency_fraction=args.consistency_fraction,
                             consistency_one_sided=args.consistency_one_sided)


def optimizer_settings(args) -> OptimizerSettings:
    return OptimizerSettings(name=args.optimizer, text_encoder_lr=args.text_encoder_lr, use_8bit_adam=args.use_8bit_adam,
                             betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
                             eps=args.adam_epsilon, prodigy_beta3=args.prodigy_beta3, prodigy_decouple=args.prodigy_decouple,
                             prodigy_use_bias_correction=args.prodigy_use_bias_correction,
                             prodigy_safeguard_warmup=args.prodigy_safeguard_warmup)


def validation_settings(args) -> ValidationSettings | None:
    if not args.validation_prompt:
        return None
    return ValidationSettings(prompt=args.validation_prompt, num_images=args.num_validation_images,
                              every_steps=args.validation_steps, inference_steps=args.validation_inference_steps,
                              resolution=args.resolution)


def held_out_settings(args) -> HeldOutSettings | None:
    return None if args.validation_split is None else HeldOutSettings(args.validation_split, args.validation_steps)


@dataclass(frozen=True)
class TrainConfig:
    """A training run's configuration: the flags as given (never changed afterwards) and the typed
    settings of each concern built from them."""

    flags: argparse.Namespace
    sources: tuple[DataSource, ...]
    data: DataConfig
    cache: CacheSettings
    objective: ObjectiveSettings
    optimizer: OptimizerSettings
    validation: ValidationSettings | None
    held_out: HeldOutSettings | None = None


def load_train_config(argv: list[str] | None = None) -> TrainConfig:
    """Parse and check every flag; nothing is read beyond the YAML file and nothing is written."""
    args = parse_args(argv)
    # the levels known before any data is read (the flag's; each source's, checked by DataSource) lie on the
    # schedule; whether any example is noisy is known only once the data is planned (train.check_inputs)
    if args.ambient_timestep is not None:
        check_ambient_timestep(args.ambient_timestep)
    return TrainConfig(flags=args, sources=data_sources(args), data=data_config(args), cache=cache_settings(args),
                       objective=objective_settings(args), optimizer=optimizer_settings(args),
                       validation=validation_settings(args), held_out=held_out_settings(args))
