"""One training step's objective: the SDXL UNet as a function of (x_t, t), and the ambient loss built on it.

    batch (noisy latent y at t_n, text embeddings, micro-conditioning)
      -> t ~ U{t_n..T-1}, x_t = renoise(y)          (objectives.draw_timesteps, objectives.renoise)
      -> out = UNet(x_t, t | text, time_ids)         (conditioned_unet)
      -> ambient Tweedie loss against y              (objectives.ambient_tweedie_loss)
      -> + consistency loss from x_tc, t_c just above t_n, chains below it   (objectives.consistency_loss)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fractions import Fraction

import torch

from sdxl_ambient.errors import UserError
from sdxl_ambient.objectives import (
    DEFAULT_WEIGHT_CAP,
    WEIGHTINGS,
    ambient_tweedie_loss,
    check_ambient_timestep,
    consistency_loss,
    draw_delta,
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
class StepDraws:
    """The random draws of one step, made before the model runs (``AmbientObjective.draw``).

    ``timesteps`` t ~ U{t_n..T-1} and ``noise`` renoise the observation to x_t. With the consistency
    term: ``consistency_timesteps`` t_c and ``consistency_noise`` give x_tc, ``delta`` the chains'
    lengths and ``chain_noise`` one (2k, ...) draw per chain step (k: ``consistency_size``). Given the draws, the losses are a
    deterministic function of the batch and the weights: no generator inside, so the part that runs
    the model can be compiled whole and replayed (CUDA graphs)."""

    timesteps: torch.Tensor
    noise: torch.Tensor
    consistency_timesteps: torch.Tensor | None = None
    consistency_noise: torch.Tensor | None = None
    delta: torch.Tensor | None = None
    chain_noise: tuple[torch.Tensor, ...] | None = None
    consistency_scale: float = 1.0  # the term's factor for running on k of B samples (B / k, or 1 / fraction)


# --consistency_fraction's default, and AmbientObjective's (the measurements behind it: docs/image_results.md, Part 3).
DEFAULT_CONSISTENCY_FRACTION = 0.25


@dataclass
class AmbientObjective:
    """The ambient objective of one step: Tweedie loss above t_n, consistency below it.

    ``__call__(net, observed, observed_timesteps)`` returns per-sample losses (B,) under the keys
    "loss" (what to minimise), "ambient" and "consistency". It is ``draw`` (every random number of
    the step, from ``generator``) followed by ``losses`` (no randomness).

    The consistency term draws its own t_c ~ U{t_n, ..., t_n + max_delta - 1} (x_tc renoised from
    the same observation), so its chains of length delta <= max_delta reach below t_n, where the
    model has no data; the anchor h(x_tc, t_c) and the chains carry no gradient, the two final
    predictions (one batched call of 2k samples, k: ``consistency_size``) do. Clean
    samples (t_n = 0) get no term (weight 0), so a clean example's loss is exactly the plain epsilon loss. ``consistency_max_delta`` None is each
    sample's own t_n (a batch may mix noise levels). ``consistency_fraction`` (the term on part of
    the batch; given the step, on some steps where f B is not a whole number) and
    ``consistency_one_sided`` (one chain's backward pass) make it cheaper. What each
    form buys at which noise level, and its FLOPs per step: docs/image_results.md ("Part 3"),
    docs/toy_results.md."""

    alphas_cumprod: torch.Tensor
    prediction_type: str = "epsilon"
    weighting: str = "epsilon"
    weight_cap: float = DEFAULT_WEIGHT_CAP
    consistency_weight: float = 0.0
    consistency_steps: int = 1
    consistency_max_delta: int | None = None  # None: each sample's own t_n (the trainer's default)
    consistency_fraction: float = DEFAULT_CONSISTENCY_FRACTION  # 1: the whole batch
    consistency_one_sided: bool = False
    num_train_timesteps: int = 1000

    def __post_init__(self):
        if not 0 < self.consistency_fraction <= 1:
            raise ValueError(f"consistency_fraction must be in (0, 1], got {self.consistency_fraction}")

    def __call__(self, net: Net, observed, observed_timesteps, *, generator=None, use_consistency=True,
                 step: int | None = None):
        draws = self.draw(observed, observed_timesteps, generator=generator, use_consistency=use_consistency, step=step)
        return self.losses(net, observed, observed_timesteps, draws)

    def draw(self, observed, observed_timesteps, *, generator=None, use_consistency=True, step: int | None = None) -> StepDraws:
        """Every random number of a step, on the batch's device, in a fixed order from ``generator``.
        ``step`` (the optimizer step) spreads a fractional f B over steps (``consistency_size``)."""
        t = draw_timesteps(observed_timesteps, self.num_train_timesteps, generator=generator)
        noise = torch.randn(observed.shape, generator=generator, device=observed.device, dtype=torch.float32)
        b = observed.shape[0]
        k = self.consistency_size(b, step) if use_consistency and self.consistency_weight > 0 else 0
        if k == 0:  # no term on this step: no UNet call for it
            return StepDraws(t, noise)
        return StepDraws(t, noise, *self._consistency_draws(observed, observed_timesteps, generator, k),
                         consistency_scale=b / k if step is None else 1 / self.consistency_fraction)

    def _consistency_draws(self, observed, observed_timesteps, generator, k: int):
        """(t_c, noise of x_tc, delta, chain noise per step) of the first k samples, in the order
        ``consistency_loss`` draws them."""
        gen_device = generator.device if generator is not None else observed.device
        b = k
        observed, observed_timesteps = observed[:b], observed_timesteps[:b]
        max_delta = self.max_delta(observed_timesteps)
        t_c = draw_timesteps(observed_timesteps, self.num_train_timesteps, generator=generator, window=max_delta)
        noise_c = torch.randn(observed.shape, generator=generator, device=observed.device, dtype=torch.float32)
        delta = draw_delta(b, max_delta, generator=generator, device=observed.device)
        chain_shape = (2 * b, *observed.shape[1:])
        chain = tuple(torch.randn(chain_shape, generator=generator, device=gen_device, dtype=torch.float32).to(observed.device)
                      for _ in range(self.consistency_steps))
        return t_c, noise_c, delta.to(observed.device), chain

    def losses(self, net: Net, observed, observed_timesteps, draws: StepDraws) -> dict[str, torch.Tensor]:
        """The per-sample losses of a step from its ``draws``; the consistency term when they hold its draws."""
        abar = self.alphas_cumprod.to(observed.device)
        y = observed.float()
        ambient = self.ambient_loss(net, y, observed_timesteps, draws.timesteps, draws.noise)
        losses = {"ambient": ambient, "loss": ambient}
        if draws.delta is not None:
            losses["consistency"] = cons = self.consistency(net, y, observed_timesteps, abar, draws=draws)
            losses["loss"] = ambient + cons
        return losses

    def ambient_loss(self, net: Net, observed, observed_timesteps, timesteps, noise) -> torch.Tensor:
        """The ambient loss per sample (B,) at the given timesteps and renoising noise (the held-out
        validation loss fixes both)."""
        abar = self.alphas_cumprod.to(observed.device)
        y = observed.float()
        x_t = renoise(y, observed_timesteps, timesteps, noise, abar)
        return ambient_tweedie_loss(net(x_t, timesteps), x_t, y, timesteps, observed_timesteps, abar,
                                    prediction_type=self.prediction_type, weighting=self.weighting,
                                    weight_cap=self.weight_cap)

    def max_delta(self, observed_timesteps):
        """The chains' largest length: the setting, or each sample's own t_n (at least 1; a clean
        sample's term has weight 0)."""
        if self.consistency_max_delta is not None:
            return self.consistency_max_delta
        return observed_timesteps.long().clamp(min=1)

    def consistency_size(self, batch: int, step: int | None = None) -> int:
        """k: the first k samples of the (random) batch get the consistency term. Without ``step``,
        k = ceil(f B) (at least 1). With it, k = floor((s + 1) f B) - floor(s f B) at step s, so that k
        averages f B over steps however small f B is: at batch 1 and f = 1/4, one sample every fourth
        step (0, 0, 0, 1, ...); at batch 8, 2 on every step."""
        if self.consistency_fraction >= 1:
            return batch
        if step is None:
            return max(1, math.ceil(self.consistency_fraction * batch))
        per_step = self._per_step(batch)
        return math.floor((step + 1) * per_step) - math.floor(step * per_step)

    def _per_step(self, batch: int) -> Fraction:
        """f B as an exact fraction (so the step schedule never drifts)."""
        return Fraction(self.consistency_fraction).limit_denominator(10**6) * batch

    def consistency_period(self, batch: int) -> int:
        """The number of steps after which the step schedule of ``consistency_size`` repeats (1: every
        step alike)."""
        return 1 if self.consistency_fraction >= 1 else self._per_step(batch).denominator

    def consistency_batches(self, batch: int) -> list[int]:
        """The batch sizes the consistency term runs the UNet at: the anchor's k, the two chains' 2k
        (and the one-sided final prediction's k), for every k it takes (with and without the step)."""
        per_step = batch if self.consistency_fraction >= 1 else self._per_step(batch)
        ks = {self.consistency_size(batch), math.floor(per_step), math.ceil(per_step)}  # the step schedule takes these two
        return sorted({n for k in ks if k > 0 for n in (k, 2 * k)})

    def consistency(self, net: Net, y, observed_timesteps, abar, generator=None, draws: StepDraws | None = None):
        """The consistency term from x_tc just above t_n (per sample, (B,)); its random numbers from
        ``draws`` (``draw``), else from ``generator``.

        With ``consistency_fraction`` f < 1 only the first k samples get the term (``consistency_size``),
        multiplied by ``draws.consistency_scale`` (B / k, or 1 / f with the step schedule) so that its
        mean over the batch, and over steps, still estimates the full term; the others get 0. The term
        then calls ``net.take(k)`` when the net has it (``conditioned_unet``: the first k samples'
        conditioning), else ``net``."""
        b = y.shape[0]
        if draws is None or draws.delta is None:
            k = self.consistency_size(b)
            draws = StepDraws(None, None, *self._consistency_draws(y, observed_timesteps, generator, k), consistency_scale=b / k)
        k = draws.delta.shape[0]
        if k < b and hasattr(net, "take"):
            net = net.take(k)

        def denoiser(x, tt):
            return x0_from_model_output(net(x, tt), x, tt, abar, self.prediction_type)

        y_k, t_n = y[:k], observed_timesteps[:k]
        x_c = renoise(y_k, t_n, draws.consistency_timesteps, draws.consistency_noise, abar)
        weight = self.consistency_weight * draws.consistency_scale * (t_n > 0).float()
        term = consistency_loss(denoiser, x_c, draws.consistency_timesteps, abar, num_steps=self.consistency_steps,
                                max_delta=self.max_delta(t_n), weight=weight, anchor_grad=False,
                                one_sided=self.consistency_one_sided, delta=draws.delta, chain_noise=draws.chain_noise)
        return term if k == b else torch.cat([term, term.new_zeros(b - k)])


# From this t_n up the trainer warns that the consistency term is on (why: docs/image_results.md, Part 3).
HARMFUL_CONSISTENCY_LEVEL = 500


def _levels(levels: int | Iterable[int]) -> list[int]:
    return [levels] if isinstance(levels, int) else sorted(set(levels))


@dataclass(frozen=True)
class ObjectiveSettings:
    """The objective as the flags give it; ``None`` means "the default for this run", which
    :meth:`build` resolves once t_n and the noise schedule are known."""

    weighting: str = "epsilon"
    weight_cap: float | None = None  # None: DEFAULT_WEIGHT_CAP
    consistency_weight: float = 0.0
    consistency_steps: int = 1
    consistency_max_delta: int | None = None  # None: t_n (each example's own when levels differ)
    consistency_start_step: int = 0
    consistency_fraction: float = DEFAULT_CONSISTENCY_FRACTION
    consistency_one_sided: bool = False

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
        if not 0 < self.consistency_fraction <= 1:
            raise UserError(f"--consistency_fraction {self.consistency_fraction} must be in (0, 1]")

    def harmful_levels(self, levels: int | Iterable[int]) -> list[int]:
        """The noise levels from HARMFUL_CONSISTENCY_LEVEL up, where the trainer warns when the consistency
        term is on (why: docs/image_results.md, Part 3)."""
        return [level for level in _levels(levels) if level >= HARMFUL_CONSISTENCY_LEVEL] if self.consistency_weight > 0 else []

    def check_timestep(self, levels: int | Iterable[int], num_train_timesteps: int = 1000) -> None:
        """Each t_n must lie on the schedule, and the consistency term needs noisy data."""
        levels = _levels(levels)
        for level in levels:
            check_ambient_timestep(level, num_train_timesteps)
        if self.consistency_weight > 0 and not any(levels):
            raise UserError("--consistency_weight > 0 needs data with noise (--ambient_timestep > 0, an ambient_timestep "
                            "column in metadata.jsonl, or noisy data sources): consistency teaches the timesteps below t_n")

    def max_delta(self, levels: int | Iterable[int]) -> int | None:
        """The consistency chains' largest t - s: as given, else t_n; None (each example's own t_n) when
        the noisy examples are at several levels."""
        if self.consistency_max_delta is not None:
            return self.consistency_max_delta
        noisy = [level for level in _levels(levels) if level > 0]
        if not noisy:
            return 1
        return noisy[0] if len(noisy) == 1 else None

    def resolved(self, levels: int | Iterable[int]) -> dict:
        """The values this run trains with, defaults filled in."""
        max_delta = self.max_delta(levels)
        return {"loss_weighting": self.weighting,
                "loss_weight_cap": DEFAULT_WEIGHT_CAP if self.weight_cap is None else self.weight_cap,
                "consistency_weight": self.consistency_weight, "consistency_steps": self.consistency_steps,
                "consistency_max_delta": "t_n of each example" if max_delta is None else max_delta,
                "consistency_start_step": self.consistency_start_step,
                "consistency_fraction": self.consistency_fraction, "consistency_one_sided": self.consistency_one_sided}

    def build(self, levels: int | Iterable[int], noise_scheduler, device=None) -> AmbientObjective:
        """The objective for data at these t_n on this noise schedule (checked first)."""
        num_timesteps = noise_scheduler.config.num_train_timesteps
        self.check_timestep(levels, num_timesteps)
        r = {**self.resolved(levels), "consistency_max_delta": self.max_delta(levels)}
        return AmbientObjective(
            alphas_cumprod=noise_scheduler.alphas_cumprod.to(device),
            prediction_type=noise_scheduler.config.prediction_type,
            weighting=r["loss_weighting"], weight_cap=r["loss_weight_cap"],
            consistency_weight=r["consistency_weight"], consistency_steps=r["consistency_steps"],
            consistency_max_delta=r["consistency_max_delta"], num_train_timesteps=num_timesteps,
            consistency_fraction=self.consistency_fraction, consistency_one_sided=self.consistency_one_sided,
        )
