"""Honest intervals and paired tests for per-item scores of methods run on the same items.

wilson_interval   95% Wilson score interval of a proportion (k successes of n)
bootstrap_mean    percentile bootstrap interval of a mean (F1 and other non-binary scores)
paired_bootstrap  mean difference of two methods on the same items, its interval and a two-sided p
mcnemar_exact     exact McNemar test on paired binary outcomes (binomial on the discordant pairs)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np


def _z(confidence: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(0.5 + confidence / 2))


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials; (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    if not 0 <= k <= n:
        raise ValueError(f"k = {k} successes out of n = {n}")
    z = _z(confidence)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_mean(x: Sequence[float], n_boot: int = 10_000, seed: int = 0,
                   confidence: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of x."""
    x = np.asarray(x, dtype=np.float64)
    if len(x) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)


@dataclass(frozen=True)
class PairedResult:
    diff: float  # mean(x) - mean(y)
    lo: float
    hi: float
    p_value: float

    def to_json(self) -> dict:
        return asdict(self)


def paired_bootstrap(x: Sequence[float], y: Sequence[float], n_boot: int = 10_000, seed: int = 0,
                     confidence: float = 0.95) -> PairedResult:
    """Items resampled with replacement (the same items for both methods): the mean difference, its
    percentile interval, and a two-sided p-value (twice the smaller tail of the bootstrap differences
    around 0, the usual percentile-test approximation; at least 1/n_boot when nonzero difference)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired scores need the same items: {x.shape} vs {y.shape}")
    d = x - y
    if len(d) == 0:
        return PairedResult(float("nan"), float("nan"), float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)
    lo, hi = np.quantile(boots, [(1 - confidence) / 2, (1 + confidence) / 2])
    if np.all(d == 0):
        p = 1.0
    else:
        tail = min(np.mean(boots <= 0), np.mean(boots >= 0))
        p = float(min(1.0, max(2 * tail, 1.0 / n_boot)))
    return PairedResult(float(d.mean()), float(lo), float(hi), p)


@dataclass(frozen=True)
class McNemarResult:
    only_x: int  # items x got right and y wrong
    only_y: int  # items y got right and x wrong
    p_value: float  # exact two-sided

    def to_json(self) -> dict:
        return asdict(self)


def mcnemar_exact(x: Sequence[float], y: Sequence[float]) -> McNemarResult:
    """Exact McNemar test of paired binary outcomes: two-sided binomial test (p = 1/2) on the
    discordant pairs, p = min(1, 2 * P[Bin(b + c, 1/2) <= min(b, c)])."""
    from scipy.stats import binom

    x, y = np.asarray(x) > 0.5, np.asarray(y) > 0.5
    if x.shape != y.shape:
        raise ValueError(f"paired outcomes need the same items: {x.shape} vs {y.shape}")
    b, c = int(np.sum(x & ~y)), int(np.sum(~x & y))
    if b + c == 0:
        return McNemarResult(b, c, 1.0)
    p = min(1.0, 2.0 * float(binom.cdf(min(b, c), b + c, 0.5)))
    return McNemarResult(b, c, p)
