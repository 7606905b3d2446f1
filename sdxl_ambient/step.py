"""One training step's objective: the SDXL UNet as a function of (x_t, t), and the ambient loss built on it.

    batch (noisy latent y at t_n, text embeddings, micro-conditioning)
      -> t ~ U{t_n..T-1}, x_t = renoise(y)          (objectives.draw_timesteps, objectives.renoise)
      -> out = UNet(x_t, t | text, time_ids)         (conditioned_unet)
      -> ambient Tweedie loss against y              (objectives.ambient_tweedie_loss)
      -> + consistency loss from x_tc, t_c just above t_n, chains below it   (objectives.consistency_loss)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sdxl_ambient.errors import UserError
from sdxl_ambient.objectives import (
    DEFAULT_WEIGHT_CAP,
    WEIGHTINGS,
    ambient_tweedie_loss,
    check_ambient_timestep,
    consistency_loss,
    draw_timesteps,
    renoise,
    x0_from_model_output,
)

Net = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def conditioned_unet(unet, prompt_embeds, pooled_prompt_embeds, time_ids, dtype=None) -> Net:
    """``net(x_t, t)`` -> the UNet's raw output for this batch's conditioning.

    ``net`` accepts k stacked copies of the batch (k*B samples, e.g. the two consistency
    chains) and repeats the conditioning k times. ``net.take(n)`` is the same net for the
    first n samples of the batch (the consistency term on part of the batch)."""
    dtype = dtype or prompt_embeds.dtype
    return _conditioned(unet, (prompt_embeds.to(dtype), pooled_prompt_embeds.to(dtype), time_ids.to(dtype)), dtype)


def _conditioned(unet, cond, dtype) -> Net:
    b = cond[0].shape[0]

    def net(x, t):
        k = x.shape[0] // b
        pe, pooled, ids = (c if k == 1 else c.repeat(k, *([1] * (c.ndim - 1))) for c in cond)
        out = unet(x.to(dtype), t, encoder_hidden_states=pe,
                   added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}, return_dict=False)[0]
        return out.float()

    net.take = lambda n: _conditioned(unet, tuple(c[:n] for c in cond), dtype)
    return net


@dataclass
class AmbientObjective:
    """The ambient objective of one step: Tweedie loss above t_n, consistency below it.

    ``__call__(net, observed, observed_timesteps)`` returns per-sample losses (B,) under the keys
    "loss" (what to minimise), "ambient" and "consistency".

    The consistency term draws its own t_c ~ U{t_n, ..., t_n + max_delta - 1} (x_tc renoised from
    the same observation), so its chains of length delta <= max_delta reach below t_n, where the
    model has no data; the anchor h(x_tc, t_c) and the chains carry no gradient, the two final
    predictions (one batched call of 2B samples) do. Clean samples (t_n = 0) get no term.
    ``consistency_fraction`` (the term on part of the batch) and ``consistency_one_sided`` (one
    chain's backward pass) make it cheaper. What each form buys at which noise level, and its
    FLOPs per step: docs/image_results.md ("Part 3"), docs/toy_results.md."""

    alphas_cumprod: torch.Tensor
    prediction_type: str = "epsilon"
    weighting: str = "epsilon"
    weight_cap: float = DEFAULT_WEIGHT_CAP
    consistency_weight: float = 0.0
    consistency_steps: int = 1
    consistency_max_delta: int = 100
    consistency_fraction: float = 1.0
    consistency_one_sided: bool = False
    num_train_timesteps: int = 1000

    def __post_init__(self):
        if not 0 < self.consistency_fraction <= 1:
            raise ValueError(f"consistency_fraction must be in (0, 1], got {self.consistency_fraction}")

    def __call__(self, net: Net, observed, observed_timesteps, *, generator=None, use_consistency=True):
        abar = self.alphas_cumprod.to(observed.device)
        y = observed.float()
        t = draw_timesteps(observed_timesteps, self.num_train_timesteps, generator=generator)
        noise = torch.randn(y.shape, generator=generator, device=y.device, dtype=torch.float32)
        x_t = renoise(y, observed_timesteps, t, noise, abar)
        out = net(x_t, t)
        ambient = ambient_tweedie_loss(out, x_t, y, t, observed_timesteps, abar,
                                       prediction_type=self.prediction_type, weighting=self.weighting,
                                       weight_cap=self.weight_cap)
        losses = {"ambient": ambient, "loss": ambient}
        if use_consistency and self.consistency_weight > 0:
            losses["consistency"] = cons = self.consistency(net, y, observed_timesteps, abar, generator)
            losses["loss"] = ambient + cons
        return losses

    def consistency(self, net: Net, y, observed_timesteps, abar, generator=None):
        """The consistency term from x_tc just above t_n (per sample, (B,)).

        With ``consistency_fraction`` f < 1 only the first k = ceil(f B) samples of the batch (a
        random batch) get the term, multiplied by B / k so that its mean over the batch still
        estimates the full term; the others get 0. The term then calls ``net.take(k)`` when the
        net has it (``conditioned_unet``: the first k samples' conditioning), else ``net``."""
        def denoiser(x, tt):
            return x0_from_model_output(net(x, tt), x, tt, abar, self.prediction_type)

        b = y.shape[0]
        k = b if self.consistency_fraction >= 1 else max(1, math.ceil(self.consistency_fraction * b))
        if k < b and hasattr(net, "take"):
            net = net.take(k)
        y_k, t_n = y[:k], observed_timesteps[:k]
        t_c = draw_timesteps(t_n, self.num_train_timesteps, generator=generator, window=self.consistency_max_delta)
        noise = torch.randn(y_k.shape, generator=generator, device=y.device, dtype=torch.float32)
        x_c = renoise(y_k, t_n, t_c, noise, abar)
        weight = self.consistency_weight * (b / k) * (t_n > 0).float()
        term = consistency_loss(denoiser, x_c, t_c, abar, num_steps=self.consistency_steps,
                                max_delta=self.consistency_max_delta, weight=weight, anchor_grad=False,
                                one_sided=self.consistency_one_sided, generator=generator)
        return term if k == b else torch.cat([term, term.new_zeros(b - k)])


@dataclass(frozen=True)
class ObjectiveSettings:
    """The objective as the flags give it; ``None`` means "the default for this run", which
    :meth:`build` resolves once t_n and the noise schedule are known."""

    weighting: str = "epsilon"
    weight_cap: float | None = None  # None: DEFAULT_WEIGHT_CAP
    consistency_weight: float = 0.0
    consistency_steps: int = 1
    consistency_max_delta: int | None = None  # None: t_n
    consistency_start_step: int = 0

    def __post_init__(self):
        if self.weighting not in WEIGHTINGS:
            raise UserError(f"--loss_weighting {self.weighting!r} must be one of {', '.join(WEIGHTINGS)}")
        if self.weight_cap is not None and not self.weight_cap >= 1:
            raise UserError(f"--loss_weight_cap {self.weight_cap} must be >= 1: it caps the weight relative to SNR(t) "
                            "(1 = the plain epsilon-loss weight; leave it out for the default)")
        if not self.consistency_weight >= 0:
            raise UserError(f"--consistency_weight {self.consistency_weight} must be >= 0")
        for flag, value in (("consistency_steps", self.consistency_steps), ("consistency_max_delta", self.consistency_max_delta)):
            if value is not None and value < 1:
                raise UserError(f"--{flag} {value} must be >= 1")
        if self.consistency_start_step < 0:
            raise UserError(f"--consistency_start_step {self.consistency_start_step} must be >= 0")

    def check_timestep(self, ambient_timestep: int, num_train_timesteps: int = 1000) -> None:
        """t_n must lie on the schedule, and the consistency term needs noisy data."""
        check_ambient_timestep(ambient_timestep, num_train_timesteps)
        if self.consistency_weight > 0 and ambient_timestep == 0:
            raise UserError("--consistency_weight > 0 needs data with noise (--ambient_timestep > 0): "
                            "consistency teaches the timesteps below t_n")

    def resolved(self, ambient_timestep: int) -> dict:
        """The values this run trains with, defaults filled in."""
        return {"loss_weighting": self.weighting,
                "loss_weight_cap": DEFAULT_WEIGHT_CAP if self.weight_cap is None else self.weight_cap,
                "consistency_weight": self.consistency_weight, "consistency_steps": self.consistency_steps,
                "consistency_max_delta": self.consistency_max_delta or max(ambient_timestep, 1),
                "consistency_start_step": self.consistency_start_step}

    def build(self, ambient_timestep: int, noise_scheduler, device=None) -> AmbientObjective:
        """The objective for data at t_n on this noise schedule (checked first)."""
        num_timesteps = noise_scheduler.config.num_train_timesteps
        self.check_timestep(ambient_timestep, num_timesteps)
        r = self.resolved(ambient_timestep)
        return AmbientObjective(
            alphas_cumprod=noise_scheduler.alphas_cumprod.to(device),
            prediction_type=noise_scheduler.config.prediction_type,
            weighting=r["loss_weighting"], weight_cap=r["loss_weight_cap"],
            consistency_weight=r["consistency_weight"], consistency_steps=r["consistency_steps"],
            consistency_max_delta=r["consistency_max_delta"], num_train_timesteps=num_timesteps,
        )
