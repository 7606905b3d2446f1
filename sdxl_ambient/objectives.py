"""Ambient diffusion objectives (Daras, Dimakis, Daskalakis, ICML 2024), in pure torch.

Convention (diffusers' DDPM family, variance preserving): ``alphas_cumprod`` is the
scheduler's 1-D tensor abar, timesteps are integer tensors of shape (B,) and

    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps.

An observation y is a sample at a known timestep t_n (its noise level). An observed
timestep of 0 means a clean sample (abar_n = 1), so one batch can mix clean samples
(ordinary denoising loss) with noisy ones at several levels.

Above t_n the model learns E[x0 | x_t] exactly by Tweedie's formula used twice
(``ambient_tweedie_loss``); below t_n, where no data exists, ``consistency_loss`` makes
the model agree with its own reverse process.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sdxl_ambient.errors import UserError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
WEIGHTINGS = ("epsilon", "observation")
# Cap of the epsilon-matched weight over SNR(t) (``epsilon_matched_weight``); the measurements it was
# chosen from are in docs/toy_results.md (2-D toy) and docs/image_results.md ("Loss-weight cap").
DEFAULT_WEIGHT_CAP = 64.0

# denoiser(x_t, t) -> prediction of x0 (same shape as x_t). See ``consistency_loss``.
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_ambient_timestep(ambient_timestep: int, num_train_timesteps: int = 1000, where: str = "--ambient_timestep") -> None:
    """t_n must be a timestep of the schedule: 0 (clean) <= t_n < T. The one check of this rule, for the
    flag, a data source's level and an image's own (``where`` names which)."""
    if not 0 <= ambient_timestep < num_train_timesteps:
        raise UserError(f"{where} {ambient_timestep} must be in [0, {num_train_timesteps}) "
                        "(0 = clean data, else the scheduler timestep of the data's noise level)")


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Shape a (B,) tensor to broadcast against ``like`` (B, ...)."""
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half-precision inputs, the input's own precision from float32 up (float64 stays exact)."""
    return torch.promote_types(x.dtype, torch.float32)


def abar_at(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """abar_t for a diffusion timestep t (diffusers' table)."""
    return alphas_cumprod.to(timesteps.device)[timesteps.long()]


def observation_abar(alphas_cumprod: torch.Tensor, observed_timesteps: torch.Tensor) -> torch.Tensor:
    """abar_n of an observation: the table's value for t_n > 0, and 1 for a clean sample (t_n = 0)."""
    abar = abar_at(alphas_cumprod, observed_timesteps)
    return torch.where(observed_timesteps > 0, abar, torch.ones_like(abar))


def draw_timesteps(observed_timesteps: torch.Tensor, num_train_timesteps: int, generator: torch.Generator | None = None,
                   window: int | torch.Tensor | None = None) -> torch.Tensor:
    """Draw t ~ U{t_n, ..., T-1} independently for each sample (T = num_train_timesteps);
    with ``window`` (an int, or one per sample), t ~ U{t_n, ..., min(t_n + window, T) - 1}."""
    t_n = observed_timesteps.long()
    u = torch.rand(t_n.shape, generator=generator, device=t_n.device if generator is None else generator.device)
    span = num_train_timesteps - t_n if window is None else (num_train_timesteps - t_n).clamp(max=window)
    t = t_n + (u.to(t_n.device) * span).long()
    return t.clamp(max=num_train_timesteps - 1)


def fixed_timesteps(observed_timesteps: torch.Tensor, num_train_timesteps: int, count: int) -> torch.Tensor:
    """``count`` fixed timesteps per sample, (count, B): the midpoints of ``count`` equal strata of
    {t_n, ..., T-1}, so their mean estimates the expectation over t ~ U{t_n, ..., T-1} with no draw."""
    t_n = observed_timesteps.long()
    strata = (torch.arange(count, device=t_n.device, dtype=torch.float64) + 0.5) / count
    t = t_n[None] + (strata[:, None] * (num_train_timesteps - t_n)[None].double()).long()
    return t.clamp(max=num_train_timesteps - 1)


def add_noise(clean, observed_timesteps, noise, alphas_cumprod):
    """Corrupt clean data to its observation level: y = sqrt(abar_n) x0 + sqrt(1 - abar_n) noise.

    An observed timestep of 0 leaves the sample clean."""
    dtype = _compute_dtype(clean)
    a = _per_sample(observation_abar(alphas_cumprod, observed_timesteps).to(dtype), clean)
    return (a.sqrt() * clean.to(dtype) + (1 - a).sqrt() * noise.to(dtype)).to(clean.dtype)


def renoise(observed, observed_timesteps, timesteps, noise, alphas_cumprod):
    """x_t for t >= t_n from an observation y at t_n:

        x_t = sqrt(abar_t / abar_n) y + sqrt(1 - abar_t / abar_n) noise.

    This has the same law as noising the clean x0 to t directly. For t_n = 0 it is
    diffusers' ``add_noise``; for t = t_n it returns y."""
    dtype = _compute_dtype(observed)
    ratio = abar_at(alphas_cumprod, timesteps).to(dtype) / observation_abar(alphas_cumprod, observed_timesteps).to(dtype)
    r = _per_sample(ratio.clamp(max=1.0), observed)
    out = r.sqrt() * observed.to(dtype) + (1 - r).sqrt() * noise.to(dtype)
    return out.to(observed.dtype)


def x0_from_model_output(model_output, sample, timesteps, alphas_cumprod, prediction_type):
    """E[x0 | x_t] from the network's output.

    epsilon:      x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
    v_prediction: x0 = sqrt(abar) x_t - sqrt(1 - abar) v
    sample:       x0 = output
    """
    if prediction_type == "sample":
        return model_output
    a = _per_sample(abar_at(alphas_cumprod, timesteps), sample).to(model_output.dtype)
    if prediction_type == "epsilon":
        return (sample - (1 - a).sqrt() * model_output) / a.sqrt()
    if prediction_type == "v_prediction":
        return a.sqrt() * sample - (1 - a).sqrt() * model_output
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def model_output_from_x0(x0, sample, timesteps, alphas_cumprod, prediction_type):
    """The inverse of ``x0_from_model_output``: what the network would output for this x0."""
    if prediction_type == "sample":
        return x0
    a = _per_sample(abar_at(alphas_cumprod, timesteps), sample).to(x0.dtype)
    eps = (sample - a.sqrt() * x0) / (1 - a).sqrt()
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return a.sqrt() * eps - (1 - a).sqrt() * x0
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def _tweedie_lambda(alphas_cumprod, timesteps, observed_timesteps):
    """lam = s2_n / s2_t with s2 = (1 - abar) / abar (0 for a clean observation)."""
    a_t = abar_at(alphas_cumprod, timesteps).double()
    a_n = observation_abar(alphas_cumprod, observed_timesteps).double()
    lam = ((1 - a_n) / a_n) / ((1 - a_t) / a_t)
    return lam, a_t, a_n


def predict_observation(x0_pred, sample, timesteps, observed_timesteps, alphas_cumprod):
    """E[x_tn | x_t] from E[x0 | x_t]: Tweedie's formula used twice.

    With s2 = (1 - abar) / abar and lam = s2_n / s2_t,

        E[x_tn | x_t] = sqrt(abar_n) * (lam * x_t / sqrt(abar_t) + (1 - lam) * E[x0 | x_t]).
    """
    lam, a_t, a_n = _tweedie_lambda(alphas_cumprod, timesteps, observed_timesteps)
    dtype = x0_pred.dtype
    c_x = _per_sample((a_n.sqrt() * lam / a_t.sqrt()).to(dtype), sample)
    c_0 = _per_sample((a_n.sqrt() * (1 - lam)).to(dtype), sample)
    return c_x * sample.to(dtype) + c_0 * x0_pred


def epsilon_matched_weight(timesteps, observed_timesteps, alphas_cumprod, cap=DEFAULT_WEIGHT_CAP):
    """SNR(t) / (abar_n (1 - lam)^2), the weight that turns the observation error into the
    usual epsilon loss: the x0 error enters the observation error scaled by sqrt(abar_n)(1 - lam),
    and the epsilon error is sqrt(SNR(t)) times the x0 error.

    The factor 1 / (abar_n (1 - lam)^2) diverges as t -> t_n (and so does the variance of the
    loss), so it is capped at ``cap``: no sample weighs more than ``cap`` times its epsilon-loss
    weight SNR(t). Clean samples (lam = 0, abar_n = 1) get exactly SNR(t)."""
    lam, a_t, a_n = _tweedie_lambda(alphas_cumprod, timesteps, observed_timesteps)
    snr = a_t / (1 - a_t)
    amplification = 1.0 / (a_n * (1 - lam) ** 2).clamp(min=1.0 / cap)
    return (snr * amplification).float()


def ambient_tweedie_loss(model_output, sample, observed, timesteps, observed_timesteps, alphas_cumprod,
                         prediction_type="epsilon", weighting="epsilon", weight_cap=DEFAULT_WEIGHT_CAP):
    """Per-sample ambient loss, shape (B,), mean over the other dims.

    ``sample`` is x_t (made from ``observed`` by ``renoise``), ``observed`` is y at t_n.

    weighting="observation": || E[x_tn | x_t]_model - y ||^2, the paper's loss.
    weighting="epsilon": the same times ``epsilon_matched_weight`` (capped at ``weight_cap``),
        so each timestep weighs as in the usual epsilon loss. For clean samples (t_n = 0)
        this is exactly the ordinary epsilon loss.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    dtype = _compute_dtype(model_output)
    x0_pred = x0_from_model_output(model_output.to(dtype), sample.to(dtype), timesteps, alphas_cumprod, prediction_type)
    pred_obs = predict_observation(x0_pred, sample.to(dtype), timesteps, observed_timesteps, alphas_cumprod)
    loss = (pred_obs - observed.to(dtype)).pow(2).mean(dim=tuple(range(1, pred_obs.ndim)))
    if weighting == "epsilon":
        loss = loss * epsilon_matched_weight(timesteps, observed_timesteps, alphas_cumprod, weight_cap).to(loss.device)
    return loss


def posterior_step(x0_pred, sample, timesteps, prev_timesteps, noise, alphas_cumprod):
    """One stochastic DDPM-posterior step from t down to s < t: a draw of q(x_s | x_t, x0 = x0_pred).

    With r = abar_t / abar_s:
        mean = sqrt(abar_s)(1 - r)/(1 - abar_t) x0 + sqrt(r)(1 - abar_s)/(1 - abar_t) x_t
        var  = (1 - abar_s)(1 - r)/(1 - abar_t)
    """
    dtype = _compute_dtype(sample)
    a_t = _per_sample(abar_at(alphas_cumprod, timesteps).to(dtype), sample)
    a_s = _per_sample(abar_at(alphas_cumprod, prev_timesteps).to(dtype), sample)
    r = a_t / a_s
    mean = (a_s.sqrt() * (1 - r) * x0_pred.to(dtype) + r.sqrt() * (1 - a_s) * sample.to(dtype)) / (1 - a_t)
    var = ((1 - a_s) * (1 - r) / (1 - a_t)).clamp(min=0)
    return (mean + var.sqrt() * noise.to(dtype)).to(sample.dtype)


def draw_delta(batch: int, max_delta, min_delta: int = 1, generator=None, device=None) -> torch.Tensor:
    """The chains' lengths delta ~ U{min_delta, ..., max_delta}, per sample; ``max_delta`` an int or
    a per-sample (B,) tensor (e.g. each sample's own t_n)."""
    gen_device = generator.device if generator is not None else device
    if isinstance(max_delta, torch.Tensor):
        u = torch.rand((batch,), generator=generator, device=gen_device).to(device)
        span = max_delta.to(device).long() - min_delta + 1
        return min_delta + (u * span).long().clamp(max=span - 1)
    return torch.randint(min_delta, max_delta + 1, (batch,), generator=generator, device=gen_device).to(device)


def consistency_loss(denoiser: Denoiser, sample, timesteps, alphas_cumprod, *, anchor_x0=None,
                     num_steps=1, min_delta=1, max_delta=100, weight=1.0,
                     anchor_grad=True, chain_grad=False, one_sided=False, generator=None, delta=None, chain_noise=None):
    """Consistency of the model with its own reverse process, per sample, shape (B,).

    From x_t, two independent chains of ``num_steps`` stochastic DDPM-posterior steps, each
    driven by the model's own x0 prediction, go down to s = max(t - delta, 0) with
    delta ~ U{min_delta, ..., max_delta}. With h(x, t) the model's E[x0 | x_t] and
    a = h(x_t, t) the anchor, the loss is the unbiased estimate of ||E[h(x_s, s) | x_t] - a||^2

        weight * mean( (h(x'_1, s) - a) * (h(x'_2, s) - a) ).

    ``denoiser(x, t)`` returns h(x, t). It is called with the anchor batch of B samples (unless
    ``anchor_x0`` is given, e.g. from the ambient loss's forward pass on the same x_t, t) and with
    2B samples, the two chains stacked as [chain 1; chain 2]: a conditional denoiser repeats its
    conditioning twice along the batch for those calls. Both chains go through the model in one
    batched call per step. ``anchor_grad``: the anchor carries gradients; ``chain_grad``: the
    chain's intermediate steps carry gradients. The final predictions h(x'_i, s) always do.

    ``delta`` (B,) and ``chain_noise`` (``num_steps`` tensors of the chains' shape, 2B x ...) are the
    random draws, made here from ``generator`` in that order when not given; given, the loss is a
    deterministic function of its inputs (what a compiled step needs: no generator inside).

    ``max_delta`` is an int or a per-sample (B,) tensor. ``weight`` is a float or a per-sample (B,)
    tensor. Where the term helps and where it harms (which t, weight, max_delta, chain steps):
    docs/toy_results.md and docs/image_results.md.
    """
    smallest = int(max_delta.min()) if isinstance(max_delta, torch.Tensor) else max_delta
    if num_steps < 1 or not 1 <= min_delta <= smallest:
        raise ValueError(f"need num_steps >= 1 and 1 <= min_delta <= max_delta, got {num_steps}, {min_delta}, {max_delta}")
    b = sample.shape[0]
    device = sample.device
    gen_device = generator.device if generator is not None else device
    if anchor_x0 is None:
        with torch.set_grad_enabled(anchor_grad and torch.is_grad_enabled()):
            anchor_x0 = denoiser(sample, timesteps)
    anchor = anchor_x0 if anchor_grad else anchor_x0.detach()

    if delta is None:
        delta = draw_delta(b, max_delta, min_delta, generator=generator, device=device)
    t = timesteps.long()
    s = (t - delta).clamp(min=0)
    t2, s2 = t.repeat(2), s.repeat(2)

    with torch.set_grad_enabled(chain_grad and torch.is_grad_enabled()):
        x = sample.repeat(2, *([1] * (sample.ndim - 1)))
        x0 = anchor_x0.repeat(2, *([1] * (sample.ndim - 1)))
        if not chain_grad:
            x0 = x0.detach()
        current = t2
        for k in range(1, num_steps + 1):
            if k > 1:
                x0 = denoiser(x, current)
            nxt = t2 - ((t2 - s2) * k) // num_steps
            if chain_noise is None:
                noise = torch.randn(x.shape, generator=generator, device=gen_device, dtype=torch.float32).to(device)
            else:
                noise = chain_noise[k - 1]
            x = posterior_step(x0, x, current, nxt, noise, alphas_cumprod)
            current = nxt
    if not chain_grad:
        x = x.detach()
    a = anchor.float()
    if one_sided:
        h1 = denoiser(x[:b], s).float()
        with torch.no_grad():
            h2 = denoiser(x[b:], s).float()
        # value (h1 - a)(h2 - a), gradient 2 (h2 - a) dh1
        product = (2 * h1 - h1.detach() - a) * (h2 - a).detach()
    else:
        h = denoiser(x, s2).float()
        h1, h2 = h[:b], h[b:]
        product = (h1 - a) * (h2 - a)
    loss = product.mean(dim=tuple(range(1, sample.ndim)))
    if isinstance(weight, torch.Tensor):
        weight = weight.to(loss.device)
    return weight * loss
