"""Spread: percentile bootstrap confidence intervals of a mean and of a paired difference."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Interval:
    """A mean and its (1 - alpha) percentile bootstrap interval, over n items."""

    mean: float
    low: float
    high: float
    n: int

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def fmt(self, scale: float = 1.0, digits: int = 1) -> str:
        m, lo, hi = (scale * v for v in (self.mean, self.low, self.high))
        return f"{m:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"

    def as_dict(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n}


def bootstrap_means(values: Sequence[float], n_resamples: int = 10_000, seed: int = 0) -> torch.Tensor:
    """Means [n_resamples] (float64) of resamples of `values` drawn with replacement (seeded)."""
    x = torch.as_tensor(values, dtype=torch.float64)
    if x.numel() == 0:
        raise ValueError("bootstrap of an empty sample")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, x.numel(), (n_resamples, x.numel()), generator=gen)
    return x[idx].mean(dim=1)


def mean_interval(values: Sequence[float], alpha: float = 0.05, n_resamples: int = 10_000, seed: int = 0) -> Interval:
    """The mean of `values` and its percentile bootstrap (1 - alpha) interval."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    means = bootstrap_means(values, n_resamples, seed)
    q = torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64)
    low, high = torch.quantile(means, q).tolist()
    x = torch.as_tensor(values, dtype=torch.float64)
    return Interval(float(x.mean()), low, high, x.numel())


def paired_difference(
    a: Sequence[float], b: Sequence[float], alpha: float = 0.05, n_resamples: int = 10_000, seed: int = 0
) -> Interval:
    """mean(a - b) over paired items (the same questions or facts under two settings) with its
    percentile bootstrap interval: items are resampled, each carrying both of its scores."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    return mean_interval([x - y for x, y in zip(a, b)], alpha, n_resamples, seed)
