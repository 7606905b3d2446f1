"""Real 8x8 handwritten digits for the image experiment: data splits, a small pixel-space UNet
trained with the project's ``step.AmbientObjective``, sampling with ``sdxl_ambient.sampling``, and
the fixed feature space (a small classifier) in which quality is measured.

Used by ``benchmarks/image_experiment.py`` and ``tests/test_image_experiment.py``.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from sdxl_ambient.objectives import add_noise, x0_from_model_output
from sdxl_ambient.sampling import ddim_denoise, sampling_timesteps
from sdxl_ambient.step import AmbientObjective

NUM_TRAIN_TIMESTEPS = 1000
NUM_CLASSES = 10


def sdxl_alphas_cumprod() -> torch.Tensor:
    """abar of SDXL's DDPM schedule: scaled_linear betas 0.00085..0.012, 1000 steps (diffusers' table)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=NUM_TRAIN_TIMESTEPS).alphas_cumprod.clone()


# ----------------------------------------------------------------------------- data


@dataclass
class Split:
    images: torch.Tensor  # (N, 1, 8, 8) in [-1, 1]
    labels: torch.Tensor  # (N,)

    def of_classes(self, classes) -> Split:
        keep = torch.isin(self.labels, torch.as_tensor(list(classes)))
        return Split(self.images[keep], self.labels[keep])

    def first_per_class(self, per_class: int, skip: int = 0) -> Split:
        """``per_class`` images of each class present (after the first ``skip``), in class order."""
        idx = torch.cat([torch.nonzero(self.labels == c).flatten()[skip:skip + per_class] for c in self.labels.unique()])
        return Split(self.images[idx], self.labels[idx])

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Digits:
    """scikit-learn's 1,797 scans, split per class: half to train diffusion models on, a quarter
    to train the feature classifier on, a quarter as the clean reference for the Frechet distance."""

    train: Split
    classifier: Split
    reference: Split


def load_digits(seed: int = 0) -> Digits:
    from sklearn.datasets import load_digits as sklearn_digits

    raw = sklearn_digits()
    images = torch.tensor(raw.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # grey levels 0..16 -> [-1, 1]
    labels = torch.tensor(raw.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    parts = {"train": [], "classifier": [], "reference": []}
    for c in range(NUM_CLASSES):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        half, three_quarters = len(idx) // 2, (3 * len(idx)) // 4
        parts["train"].append(idx[:half])
        parts["classifier"].append(idx[half:three_quarters])
        parts["reference"].append(idx[three_quarters:])
    return Digits(**{k: Split(images[torch.cat(v)], labels[torch.cat(v)]) for k, v in parts.items()})


def observations(images: torch.Tensor, t_n: int, seed: int, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Each image noised once to t_n with its own fixed noise, as the trainer's latent cache does."""
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    return add_noise(images, torch.full((len(images),), t_n), noise, alphas_cumprod)


# ----------------------------------------------------------------------------- model


def make_unet(width: int = 16, seed: int = 0):
    """diffusers' UNet2DModel on 1x8x8 pixels: two levels (8x8, 4x4), self-attention at 4x4 and in
    the middle block (whose to_q / to_k / to_v / to_out.0 projections are the LoRA targets)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(width, 2 * width),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=8, attention_head_dim=8)


def unet_net(unet):
    """The UNet as ``net(x_t, t)`` -> epsilon, the form ``AmbientObjective`` calls."""
    return lambda x, t: unet(x, t, return_dict=False)[0]


def unet_denoiser(unet, alphas_cumprod):
    """The UNet as ``denoiser(x_t, t)`` -> E[x0 | x_t], the form the samplers call."""
    net = unet_net(unet)
    return lambda x, t: x0_from_model_output(net(x, t), x, t, alphas_cumprod, "epsilon")


def add_lora(unet, rank: int = 8) -> list[nn.Parameter]:
    """A peft LoRA adapter on the attention projections, configured as ``models.add_unet_lora``
    configures SDXL's (rank, alpha = rank, gaussian init); every other weight is frozen.
    UNet2DModel has no ``add_adapter``, so the adapter is injected with peft directly."""
    from peft import LoraConfig, inject_adapter_in_model

    from sdxl_ambient.models import UNET_ATTENTION_TARGETS

    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(UNET_ATTENTION_TARGETS))
    inject_adapter_in_model(config, unet)
    for name, p in unet.named_parameters():
        p.requires_grad_("lora_" in name)
    return [p for p in unet.parameters() if p.requires_grad]


@contextlib.contextmanager
def adapter_disabled(unet):
    """The base model inside a LoRA-adapted UNet: every peft layer's adapter off for the block."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield unet
    finally:
        for m in layers:
            m.enable_adapters(True)


def train(unet, observed: torch.Tensor, observed_timestep: int, objective: AmbientObjective, *, steps: int,
          batch_size: int = 128, lr: float = 2e-3, seed: int = 0, params=None) -> dict:
    """Adam with a cosine-decayed learning rate on ``objective`` (the trainer's step): random batches
    of the observations, all at ``observed_timestep`` (0: clean). Returns the seconds and the mean
    loss terms of the last 10% of steps."""
    params = list(params if params is not None else unet.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    net = unet_net(unet)
    tail = {"ambient": [], "consistency": []}
    unet.train()
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(observed), (batch_size,), generator=g)
        t_n = torch.full((batch_size,), observed_timestep, dtype=torch.long)
        losses = objective(net, observed[idx], t_n, generator=g)
        opt.zero_grad(set_to_none=True)
        losses["loss"].mean().backward()
        opt.step()
        sched.step()
        if step >= steps - max(1, steps // 10):
            for k, values in tail.items():
                if k in losses:
                    values.append(losses[k].mean().item())
    unet.eval()
    return {"seconds": time.perf_counter() - start, **{k: sum(v) / len(v) for k, v in tail.items() if v}}


@torch.no_grad()
def sample(denoiser, num: int, alphas_cumprod, *, stop: int = 0, step_size: int = 20, seed: int = 1234,
           batch_size: int = 500) -> torch.Tensor:
    """``num`` images by deterministic DDIM from t = 999 down to ``stop`` in steps of about
    ``step_size`` timesteps, then E[x0 | x_stop] (``sampling.ddim_denoise``): stop = 0 is full
    sampling, stop = t_n + margin truncated sampling with the Tweedie jump. Clipped to [-1, 1]."""
    timesteps = sampling_timesteps(max(1, math.ceil((NUM_TRAIN_TIMESTEPS - 1 - stop) / step_size)), stop=stop)
    noise = torch.randn(num, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    out = [ddim_denoise(denoiser, noise[i:i + batch_size], timesteps, alphas_cumprod) for i in range(0, num, batch_size)]
    return torch.cat(out).clamp(-1, 1)


# ----------------------------------------------------------------------------- measures


class DigitClassifier(nn.Module):
    """An MLP on the 64 pixels; its 32-unit hidden layer is the fixed feature space."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, 32), nn.SiLU())
        self.head = nn.Linear(32, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(split: Split, seed: int = 0, epochs: int = 300) -> DigitClassifier:
    """Full-batch Adam on clean images (the held-out classifier split)."""
    torch.manual_seed(seed)
    model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(epochs):
        loss = nn.functional.cross_entropy(model(split.images), split.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) of two feature sets (N, D)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


@dataclass
class Quality:
    """Frechet distance to clean reference images in the classifier's feature space, and the
    classifier's mean confidence (largest softmax probability) on the samples."""

    classifier: DigitClassifier
    reference: torch.Tensor  # (N, 1, 8, 8)

    def __post_init__(self):
        with torch.no_grad():
            self._reference_features = self.classifier.features(self.reference)

    @torch.no_grad()
    def __call__(self, samples: torch.Tensor) -> dict:
        logits = self.classifier(samples)
        probs = logits.softmax(-1)
        return {"fd": frechet_distance(self.classifier.features(samples), self._reference_features),
                "confidence": float(probs.max(-1).values.mean()),
                "class_histogram": torch.bincount(probs.argmax(-1), minlength=NUM_CLASSES).tolist()}


def copy_features(images: torch.Tensor, mean_image: torch.Tensor) -> torch.Tensor:
    """The space copying is measured in: pixels minus the mean training image, flattened (cosine
    similarity of these is 1 only for the same image up to contrast)."""
    return (images - mean_image).flatten(1)
