"""Reference computations the sampling tests compare against, written from the formulas and not
from sdxl_ambient's code: deterministic DDIM, and the exact denoiser of Gaussian data."""

from __future__ import annotations

import torch


def reference_ddim(eps_at, x_t: torch.Tensor, timesteps: list[int], alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """DDIM (eta = 0) from x_t at timesteps[0] through the given timesteps; returns the x0 estimate at the last.

    At t with abar = a: x0 = (x - sqrt(1 - a) eps(x, t)) / sqrt(a); the next x is sqrt(a') x0 + sqrt(1 - a') eps."""
    x = x_t.double()
    for i, t in enumerate(timesteps):
        a = alphas_cumprod[t].double()
        eps = eps_at(x, t).double()
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        if i == len(timesteps) - 1:
            return x0
        a_next = alphas_cumprod[timesteps[i + 1]].double()
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    raise ValueError("no timesteps")


def gaussian_denoiser(mean: torch.Tensor, std: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """E[x0 | x_t] for x0 ~ N(mean, diag(std^2)) and x_t = sqrt(a) x0 + sqrt(1 - a) eps: linear in x_t,
    mean + sqrt(a) std^2 (x_t - sqrt(a) mean) / (a std^2 + 1 - a)."""
    s2 = std.double() ** 2
    return mean + a.sqrt() * s2 * (x_t - a.sqrt() * mean) / (a * s2 + 1 - a)


def gaussian_epsilon(mean: torch.Tensor, std: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The exact epsilon-prediction for Gaussian data: (x_t - sqrt(a) E[x0 | x_t]) / sqrt(1 - a)."""
    return (x_t - a.sqrt() * gaussian_denoiser(mean, std, x_t, a)) / (1 - a).sqrt()


def gaussian_flow_solution(mean, std, x_t, a_from, a_to) -> torch.Tensor:
    """E[x0 | x] at a_to after following the probability-flow ODE exactly from x_t at a_from.

    With y = x / sqrt(a) and sigma^2 = (1 - a) / a the ODE is dy/dsigma = (y - E[x0 | y]) / sigma, which
    for Gaussian data keeps (y - mean) / sqrt(std^2 + sigma^2) constant."""
    s2 = std.double() ** 2
    sig2_from, sig2_to = (1 - a_from) / a_from, (1 - a_to) / a_to
    y_to = mean + (x_t.double() / a_from.sqrt() - mean) * ((s2 + sig2_to) / (s2 + sig2_from)).sqrt()
    return gaussian_denoiser(mean, std, y_to * a_to.sqrt(), a_to)
