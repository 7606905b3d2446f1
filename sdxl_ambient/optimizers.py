"""The optimizer of a training run: AdamW (torch's fused one, or bitsandbytes' 8-bit one), Prodigy or
Adafactor, with one learning rate for the UNet and one for the text encoders (``--text_encoder_lr``).

How each meets the non-finite guard (``train.NonFiniteGuard``): torch's fused AdamW reads
``found_inf`` on the device and leaves weights and moments untouched when it is set, so a bad
update is skipped with no host sync. Prodigy, Adafactor and 8-bit AdamW have no such input: the
guard reads the flag on the host every step and does not call their ``step()``. The update is
skipped just the same (weights, moments and Prodigy's step-size estimate untouched), at the cost
of one host sync per step.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sdxl_ambient.errors import UserError

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "prodigy", "adafactor")


@dataclass(frozen=True)
class OptimizerSettings:
    """The optimizer as the flags give it (diffusers' names); the learning rates are resolved by the trainer."""

    name: str = "adamw"
    text_encoder_lr: float | None = None  # None: the UNet's learning rate
    use_8bit_adam: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    eps: float = 1e-8
    prodigy_beta3: float | None = None  # None: sqrt(beta2), Prodigy's own default
    prodigy_decouple: bool = True
    prodigy_use_bias_correction: bool = True
    prodigy_safeguard_warmup: bool = True

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise UserError(f"--optimizer {self.name!r} must be one of {', '.join(OPTIMIZERS)}")
        if self.use_8bit_adam and self.name != "adamw":
            raise UserError(f"--use_8bit_adam is AdamW in 8 bits: it goes with --optimizer adamw, not {self.name}")
        if self.text_encoder_lr is not None and not self.text_encoder_lr > 0:
            raise UserError(f"--text_encoder_lr {self.text_encoder_lr} must be > 0")
        if self.name == "prodigy" and self.text_encoder_lr is not None:
            raise UserError("--text_encoder_lr does not go with --optimizer prodigy: Prodigy estimates one step size for "
                            "all parameters and takes one --learning_rate (a multiplier of it, usually 1.0)")
        if self.prodigy_beta3 is not None and not 0 <= self.prodigy_beta3 < 1:
            raise UserError(f"--prodigy_beta3 {self.prodigy_beta3} must be in [0, 1)")

    def learning_rates(self, learning_rate: float, scale: float = 1.0) -> tuple[float, float]:
        """(UNet, text encoders) learning rates, both multiplied by ``scale`` (``--scale_lr``)."""
        return learning_rate * scale, (self.text_encoder_lr or learning_rate) * scale

    def build(self, groups: Sequence[dict]) -> torch.optim.Optimizer:
        """The optimizer over parameter groups ({"params", "lr"}: the UNet's first, then the text encoders')."""
        groups = [dict(g) for g in groups if g["params"]]
        lr = groups[0]["lr"]
        if self.name == "prodigy":
            return _prodigy(self, groups, lr)
        if self.name == "adafactor":
            from transformers.optimization import Adafactor

            # a fixed learning rate (kohya's recommended Adafactor arguments), no first moment: Adafactor's memory saving
            return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False,
                             weight_decay=self.weight_decay)
        kwargs = dict(lr=lr, betas=self.betas, weight_decay=self.weight_decay, eps=self.eps)
        if self.use_8bit_adam:
            try:
                import bitsandbytes as bnb
            except ImportError:
                raise UserError("--use_8bit_adam needs bitsandbytes: pip install 'sdxl-ambient[bnb]'") from None
            return bnb.optim.AdamW8bit(groups, **kwargs)
        return torch.optim.AdamW(groups, fused=True, **kwargs)  # fused: one kernel, and it can skip a step on the device


def _prodigy(settings: OptimizerSettings, groups: list[dict], lr: float):
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise UserError("--optimizer prodigy needs prodigyopt: pip install 'sdxl-ambient[prodigy]'") from None
    if lr <= 0.1:
        logger.warning("--optimizer prodigy with --learning_rate %g: Prodigy estimates the step size itself and its "
                       "learning rate multiplies that estimate; 1.0 is the usual value", lr)
    return Prodigy(groups, lr=lr, betas=settings.betas, beta3=settings.prodigy_beta3, eps=settings.eps,
                   weight_decay=settings.weight_decay, decouple=settings.prodigy_decouple,
                   use_bias_correction=settings.prodigy_use_bias_correction,
                   safeguard_warmup=settings.prodigy_safeguard_warmup)


def effective_learning_rate(optimizer) -> float | None:
    """Prodigy's step size d * lr of the first group (what it actually trains with), else None."""
    group = optimizer.param_groups[0]
    return group["d"] * group["lr"] if "d" in group and "d_coef" in group else None
