"""A 2-D toy for the ambient objectives: an analytic Gaussian mixture (exact posteriors),
a small time-conditioned MLP, its training loop and a DDIM sampler that ends with a Tweedie jump.

Ground truth for the objectives: ``tests/test_objectives.py`` tests them against the exact
posteriors, ``benchmarks/toy_mixture.py`` measures their settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from sdxl_ambient import objectives as obj

NUM_TRAIN_TIMESTEPS = 1000


def sdxl_alphas_cumprod(dtype=torch.float32) -> torch.Tensor:
    """SDXL's DDPM schedule: scaled_linear betas 0.00085..0.012 over 1000 steps, abar = cumprod(1 - beta)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, NUM_TRAIN_TIMESTEPS, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).to(dtype)


@dataclass
class GaussianMixture:
    """sum_k w_k N(mu_k, diag(std_k^2)); means and stds are (K, D), weights (K,)."""

    means: torch.Tensor
    stds: torch.Tensor
    weights: torch.Tensor

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.means.shape[1], generator=generator, dtype=self.means.dtype)
        return self.means[k] + self.stds[k] * eps

    def noised(self, abar: float | torch.Tensor) -> GaussianMixture:
        """The law of sqrt(abar) x0 + sqrt(1 - abar) eps, again a Gaussian mixture (scalar abar)."""
        abar = torch.as_tensor(abar, dtype=self.means.dtype)
        return GaussianMixture(abar.sqrt() * self.means, (abar * self.stds ** 2 + 1 - abar).sqrt(), self.weights)

    def posterior_mean(self, x: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
        """E[x0 | x_t = x] for x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, abar of shape (B,) or scalar.

        Responsibilities r_k(x) times the per-component linear posteriors
        mu_k + sqrt(abar) s_k^2 / (abar s_k^2 + 1 - abar) (x - sqrt(abar) mu_k)."""
        a = torch.as_tensor(abar, dtype=x.dtype).reshape(-1, 1, 1)  # (B|1, 1, 1)
        mu, s2 = self.means[None], self.stds[None] ** 2  # (1, K, D)
        var = a * s2 + 1 - a
        diff = x[:, None] - a.sqrt() * mu
        log_p = -0.5 * (diff ** 2 / var + var.log()).sum(-1) + self.weights.log()[None]
        resp = torch.softmax(log_p, dim=1)[..., None]
        return (resp * (mu + a.sqrt() * s2 / var * diff)).sum(1)


def ring_mixture(num_components: int = 8, radius: float = 1.5, std: float = 0.15, dtype=torch.float32) -> GaussianMixture:
    """Equal-weight isotropic components on a circle: the training toy (latent-like unit scale)."""
    angle = torch.arange(num_components, dtype=torch.float64) * 2 * math.pi / num_components
    means = radius * torch.stack([angle.cos(), angle.sin()], 1)
    stds = torch.full_like(means, std)
    return GaussianMixture(means.to(dtype), stds.to(dtype), torch.full((num_components,), 1.0 / num_components, dtype=dtype))


def exact_denoiser(mixture: GaussianMixture, alphas_cumprod: torch.Tensor):
    """h(x, t) = E[x0 | x_t = x] of ``mixture`` on the diffusers timestep grid."""
    return lambda x, t: mixture.posterior_mean(x, obj.abar_at(alphas_cumprod, t).to(x.dtype))


class TimeMLP(nn.Module):
    """eps_theta(x, t): a 3-hidden-layer SiLU MLP on [x, sinusoidal embedding of t]."""

    def __init__(self, dim: int = 2, width: int = 128, embed_dim: int = 32):
        super().__init__()
        self.register_buffer("freqs", torch.exp(-math.log(1000.0) * torch.arange(embed_dim // 2) / (embed_dim // 2)))
        self.net = nn.Sequential(
            nn.Linear(dim + embed_dim, width), nn.SiLU(),
            nn.Linear(width, width), nn.SiLU(),
            nn.Linear(width, width), nn.SiLU(),
            nn.Linear(width, dim),
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        angles = t.float()[:, None] * self.freqs[None]
        return self.net(torch.cat([x, angles.sin(), angles.cos()], 1))


def model_denoiser(model: TimeMLP, alphas_cumprod: torch.Tensor):
    """h(x, t): the MLP's epsilon output turned into its x0 prediction."""
    return lambda x, t: obj.x0_from_model_output(model(x, t), x, t, alphas_cumprod, "epsilon")


@dataclass
class TrainConfig:
    """What a toy run trains on and with which objective.

    objective: "ambient" (Tweedie loss on observations at t_n, t ~ U{t_n..T-1}),
    "naive" (the observations treated as clean: epsilon loss, t ~ U{0..T-1}),
    "oracle" (clean data, epsilon loss)."""

    objective: str = "ambient"
    observed_timestep: int = 100
    weighting: str = "epsilon"
    weight_cap: float = obj.DEFAULT_WEIGHT_CAP
    consistency_weight: float = 0.0
    consistency_steps: int = 1
    consistency_max_delta: int | None = None  # None: t_n
    anchor_grad: bool = True
    consistency_window: int | None = None  # only samples with t < t_n + window get the term (None: all)
    trainer_objective: bool = False  # ambient (+ consistency) through step.AmbientObjective, as the trainer runs it
    steps: int = 3000
    batch_size: int = 1024
    lr: float = 2e-3
    dataset_size: int = 50_000
    seed: int = 0


def make_observations(mixture: GaussianMixture, config: TrainConfig, alphas_cumprod, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The training set: (data, t_n per sample). Noisy observations for ambient/naive, clean for oracle."""
    clean = mixture.sample(config.dataset_size, generator)
    t_n = torch.full((config.dataset_size,), config.observed_timestep, dtype=torch.long)
    observed = obj.add_noise(clean, t_n, torch.randn(clean.shape, generator=generator), alphas_cumprod)
    if config.objective == "oracle":
        return clean, torch.zeros_like(t_n)
    if config.objective == "naive":
        return observed, torch.zeros_like(t_n)
    if config.objective == "ambient":
        return observed, t_n
    raise ValueError(f"unknown objective {config.objective!r}")


def training_loss(model, y, t_n, config: TrainConfig, alphas_cumprod, generator) -> torch.Tensor:
    """One batch's loss: the ambient Tweedie loss (plain epsilon loss when t_n = 0), plus the consistency term."""
    if config.trainer_objective:
        from sdxl_ambient.step import AmbientObjective

        objective = AmbientObjective(alphas_cumprod, weighting=config.weighting, weight_cap=config.weight_cap,
                                     consistency_weight=config.consistency_weight, consistency_steps=config.consistency_steps,
                                     consistency_max_delta=config.consistency_max_delta or config.observed_timestep,
                                     consistency_fraction=1.0,  # the whole batch, as the toy's tables were measured
                                     num_train_timesteps=NUM_TRAIN_TIMESTEPS)
        return objective(model, y, t_n, generator=generator)["loss"].mean()
    t = obj.draw_timesteps(t_n, NUM_TRAIN_TIMESTEPS, generator)
    x_t = obj.renoise(y, t_n, t, torch.randn(y.shape, generator=generator), alphas_cumprod)
    out = model(x_t, t)
    weighting = "epsilon" if config.objective != "ambient" else config.weighting
    loss = obj.ambient_tweedie_loss(out, x_t, y, t, t_n, alphas_cumprod, "epsilon", weighting, config.weight_cap).mean()
    if config.consistency_weight > 0:
        keep = torch.ones_like(t, dtype=torch.bool) if config.consistency_window is None else t < t_n + config.consistency_window
        x0 = obj.x0_from_model_output(out, x_t, t, alphas_cumprod, "epsilon")
        max_delta = config.consistency_max_delta or config.observed_timestep
        term = obj.consistency_loss(
            model_denoiser(model, alphas_cumprod), x_t[keep], t[keep], alphas_cumprod, anchor_x0=x0[keep],
            num_steps=config.consistency_steps, max_delta=max_delta, weight=config.consistency_weight,
            anchor_grad=config.anchor_grad, generator=generator)
        loss = loss + term.sum() / y.shape[0]
    return loss


def train(mixture: GaussianMixture, config: TrainConfig, alphas_cumprod) -> TimeMLP:
    """Train a fresh TimeMLP (Adam, cosine-decayed lr) on ``config``'s data and objective."""
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    model = TimeMLP()
    data, t_n = make_observations(mixture, config, alphas_cumprod, generator)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.steps)
    for _ in range(config.steps):
        idx = torch.randint(0, data.shape[0], (config.batch_size,), generator=generator)
        loss = training_loss(model, data[idx], t_n[idx], config, alphas_cumprod, generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def ddim_timesteps(stop: int, num_steps: int) -> list[int]:
    """Decreasing integer timesteps from T-1 down to ``stop`` (inclusive), about evenly spaced."""
    grid = torch.linspace(NUM_TRAIN_TIMESTEPS - 1, stop, num_steps + 1).round().long().tolist()
    return sorted(set(grid), reverse=True)


@torch.no_grad()
def ddim_sample(denoiser, noise: torch.Tensor, alphas_cumprod, stop: int = 0, num_steps: int = 50) -> torch.Tensor:
    """Deterministic DDIM from x_{T-1} = noise down to timestep ``stop``, then one Tweedie jump x0 = h(x, stop).

    x_s = sqrt(abar_s) h + sqrt(1 - abar_s) (x_t - sqrt(abar_t) h) / sqrt(1 - abar_t)."""
    x = noise
    steps = ddim_timesteps(stop, num_steps)
    for t, s in zip(steps[:-1], steps[1:]):
        tt = torch.full((x.shape[0],), t, dtype=torch.long)
        h = denoiser(x, tt)
        a_t, a_s = alphas_cumprod[t].to(x.dtype), alphas_cumprod[s].to(x.dtype)
        eps = (x - a_t.sqrt() * h) / (1 - a_t).sqrt()
        x = a_s.sqrt() * h + (1 - a_s).sqrt() * eps
    return denoiser(x, torch.full((x.shape[0],), steps[-1], dtype=torch.long))


def sample_distance(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean Euclidean distance between paired samples (same starting noise)."""
    return (samples.double() - reference.double()).norm(dim=1).mean().item()
