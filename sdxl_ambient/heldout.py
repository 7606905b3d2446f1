"""The held-out validation loss: the ambient loss on held-out noisy examples, at fixed timesteps and
fixed noise, so it is deterministic and comparable across runs.

Which examples: ``--validation_split`` (a fraction in (0, 1), or a whole count) of the noisy
examples, chosen by a hash of their keys, so every run on the same data holds out the same ones
whatever its seed. Clean examples (t_n = 0) are held out only when there are no noisy ones: in a
mixed run they are the scarce kind.

What it estimates. For an observation y at t_n and x_t renoised from it at t >= t_n, y - E[y | x_t]
is orthogonal to every function of x_t, and E[y | x_t] - pred = sqrt(abar_n)(1 - lam)(E[x0 | x_t] - h(x_t))
for the model's prediction built from its h(x_t) = E[x0 | x_t] (``objectives.predict_observation``), so

    E ||pred(x_t) - y||^2 = abar_n (1 - lam)^2 E ||h(x_t) - E[x0 | x_t]||^2 + C(t),

C(t) not depending on the model. With the training weight w(t) (``--loss_weighting``) the loss is an
unbiased estimate of the so-weighted clean denoising error, up to a constant that is the same for
every model: differences between checkpoints or runs estimate differences of the clean error,
although no clean example is ever seen. At each held-out example the timesteps are the midpoints
of HELD_OUT_TIMESTEPS equal strata of {t_n, ..., T-1} and the renoising noise is drawn from the
example's key, not from any seed of the run: every evaluation sees the same x_t.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sdxl_ambient.data import example_generator
from sdxl_ambient.errors import UserError
from sdxl_ambient.objectives import fixed_timesteps

HELD_OUT_TIMESTEPS = 10  # fixed timesteps per held-out example


def split_size(text: str) -> float | int:
    """``--validation_split``: a fraction in (0, 1) of the noisy examples, or a whole count >= 1."""
    value = float(text)
    if value.is_integer() and value >= 1:
        return int(value)
    if not 0 < value < 1:
        raise ValueError(text)
    return value


@dataclass(frozen=True)
class HeldOutSettings:
    """How many examples to hold out and how often to evaluate them."""

    split: float | int
    every_steps: int = 500


def choose(examples: list[tuple[int, int, str, int]], split: float | int) -> set[tuple[int, int]]:
    """The (part, index) of the held-out examples among ``examples`` ((part, index, key, t_n) each)."""
    noisy = [e for e in examples if e[3] > 0] or examples
    count = split if isinstance(split, int) else max(1, round(split * len(noisy)))
    if count > len(noisy) or count >= len(examples):
        raise UserError(f"--validation_split {split} would hold out {count} of the {len(noisy)} noisy examples and leave "
                        f"too few of the {len(examples)} to train on")
    order = sorted(noisy, key=lambda e: hashlib.sha256(f"held-out\x00{e[2]}".encode()).hexdigest())
    return {(part, index) for part, index, _, _ in order[:count]}


def fixed_noise(shape, key: str, j: int) -> torch.Tensor:
    """The renoising noise of held-out example ``key`` at its j-th fixed timestep."""
    return torch.randn(shape, generator=example_generator("held-out", key, f"t{j}"))


class HeldOutLoss:
    """The held-out examples of a training set in batches of one latent shape, and their loss."""

    def __init__(self, items: list[tuple[object, int]], batch_size: int):
        """``items``: (latent cache, index) of each held-out example."""
        by_shape: dict[tuple, list] = {}
        shapes = {id(cache): cache.latent_shapes() for cache, _ in items}
        for cache, index in items:
            by_shape.setdefault(tuple(shapes[id(cache)][index]), []).append((cache, index))
        self.batches = [group[s:s + batch_size] for group in by_shape.values() for s in range(0, len(group), batch_size)]
        self.levels = sorted({cache.ambient_timesteps[i] for cache, i in items})

    def __len__(self) -> int:
        return sum(len(b) for b in self.batches)

    @torch.no_grad()
    def sums(self, objective, net_for: Callable[[dict], Callable], device, rank: int = 0, world: int = 1):
        """(sum of the per-example losses, number of examples) per t_n (``self.levels``), over this process's
        share of the batches; ``net_for(batch)`` is the conditioned network of a batch (on ``device``)."""
        totals = torch.zeros(len(self.levels), dtype=torch.float64, device=device)
        counts = torch.zeros(len(self.levels), dtype=torch.float64, device=device)
        for batch_items in self.batches[rank::world]:
            batch = torch.utils.data.default_collate([cache[i] for cache, i in batch_items])
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            y, t_n = batch["observed"].float(), batch["observed_timestep"]
            net = net_for(batch)
            per_example = torch.zeros(len(batch_items), dtype=torch.float64, device=device)
            for j, t in enumerate(fixed_timesteps(t_n, objective.num_train_timesteps, HELD_OUT_TIMESTEPS)):
                noise = torch.stack([fixed_noise(y.shape[1:], key, j) for key in batch["key"]]).to(device)
                per_example += objective.ambient_loss(net, y, t_n, t, noise).double()
            slot = torch.tensor([self.levels.index(int(level)) for level in t_n.tolist()], device=device)
            totals.index_add_(0, slot, per_example / HELD_OUT_TIMESTEPS)
            counts.index_add_(0, slot, torch.ones_like(per_example))
        return totals, counts

    def logs(self, totals: torch.Tensor, counts: torch.Tensor) -> dict[str, float]:
        """``validation_loss`` (all held-out examples) and, when their t_n differ, ``validation_loss_tn<t_n>``."""
        logs = {"validation_loss": float(totals.sum() / counts.sum().clamp(min=1))}
        if len(self.levels) > 1:
            logs.update({f"validation_loss_tn{level}": float(totals[k] / counts[k].clamp(min=1))
                         for k, level in enumerate(self.levels)})
        return logs
