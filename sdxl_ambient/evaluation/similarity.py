"""Similarity measures of image embeddings (pure torch): the memorisation report's top-1 cosine
similarity to a training set, paired similarities, and their summary statistics."""

from __future__ import annotations

from collections.abc import Sequence

import torch

THRESHOLDS = (0.9, 0.95, 0.99)
PERCENTILES = (50, 90, 95, 99)


def top1_similarity(query: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query row, the largest cosine similarity to a reference row and that row's index."""
    q = torch.nn.functional.normalize(query.float(), dim=-1)
    r = torch.nn.functional.normalize(reference.float(), dim=-1)
    values, indices = (q @ r.T).max(dim=1)
    return values, indices


def paired_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of row i of ``a`` with row i of ``b``."""
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


def similarity_stats(values: torch.Tensor | Sequence[float]) -> dict:
    """count, mean, std, min, max, percentiles p50/p90/p95/p99 and the fractions above 0.9/0.95/0.99."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    if v.numel() == 0:
        raise ValueError("no similarity values")
    stats = {"count": int(v.numel()), "mean": float(v.mean()), "std": float(v.std()) if v.numel() > 1 else 0.0,
             "min": float(v.min()), "max": float(v.max())}
    stats.update({f"p{p}": float(torch.quantile(v, p / 100)) for p in PERCENTILES})
    stats.update({f"frac_above_{t}": float((v > t).double().mean()) for t in THRESHOLDS})
    return stats
