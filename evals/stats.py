"""Paired statistics for before/after scores on the same items."""

from __future__ import annotations

import math

import numpy as np


def paired_bootstrap_ci(
    baseline, intervened, *, statistic=None, resamples: int = 2000, seed: int = 0, level: float = 0.95
):
    """Percentile CI of statistic(intervened) - statistic(baseline), resampling items with replacement (the
    same items for both).

    Without `statistic`, the inputs are per-item scores and the statistic is their mean. With it, each input
    is [items, k] per-item counts, and `statistic(sums, n)` maps their sums over a resample ([resamples, k])
    to the metric ([resamples]): a corpus-level metric such as F1 is recomputed on every resample."""
    base, after = np.asarray(baseline, dtype=float), np.asarray(intervened, dtype=float)
    n = len(base)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n, size=(resamples, n))
    if statistic is None:
        differences = (after - base)[picks].mean(axis=1)
    else:
        differences = np.concatenate(
            [  # in blocks of resamples, so that memory stays at a few [block, n, k] arrays
                statistic(after[block].sum(axis=1), n) - statistic(base[block].sum(axis=1), n)
                for block in np.array_split(picks, max(1, resamples // 100))
            ]
        )
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(differences, [tail, 100 - tail])
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
