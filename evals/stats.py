"""Paired statistics for before/after scores on the same items."""

from __future__ import annotations

import math

import numpy as np


def paired_bootstrap_ci(baseline, intervened, *, resamples: int = 2000, seed: int = 0, level: float = 0.95):
    """Percentile CI of mean(intervened) - mean(baseline), resampling items with replacement."""
    differences = np.asarray(intervened, dtype=float) - np.asarray(baseline, dtype=float)
    rng = np.random.default_rng(seed)
    means = differences[rng.integers(0, len(differences), size=(resamples, len(differences)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def mcnemar_p(baseline, intervened) -> float:
    """Exact two-sided McNemar test on paired 0/1 outcomes (a binomial test on the discordant pairs)."""
    base = np.asarray(baseline) > 0.5
    after = np.asarray(intervened) > 0.5
    lost, gained = int((base & ~after).sum()), int((~base & after).sum())
    n = lost + gained
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(lost, gained) + 1)) / 2**n
    return min(1.0, 2 * tail)
