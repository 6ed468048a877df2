"""Intervals over trajectories: a reported mean error comes with a 95% percentile-bootstrap interval.

Why bootstrap over trajectories: the per-trajectory errors of one schedule are far from normal (a few trajectories
that end in another mode dominate the mean), and two schedules scored on the same trajectories are compared
pairwise (resampling the same trajectory indices for both), which is much tighter than two separate intervals.
"""

from __future__ import annotations

import numpy as np

__all__ = ["bootstrap_mean", "paired_difference", "BOOTSTRAP_REPS"]

BOOTSTRAP_REPS = 2000
"""Resamples per interval: the 2.5% / 97.5% percentiles move by well under a tenth of the width beyond this."""


def _indices(n: int, *, reps: int, seed: int) -> np.ndarray:
    if n < 2:
        raise ValueError(f"an interval needs at least 2 trajectories, got {n}")
    return np.random.default_rng(seed).integers(0, n, size=(reps, n))


def bootstrap_mean(values: np.ndarray, *, level: float = 0.95, reps: int = BOOTSTRAP_REPS,
                   seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean of per-trajectory values and its percentile bootstrap interval."""
    v = np.asarray(values, dtype=np.float64)
    means = v[_indices(v.size, reps=reps, seed=seed)].mean(1)
    lo, hi = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return float(v.mean()), float(lo), float(hi)


def paired_difference(a: np.ndarray, b: np.ndarray, *, level: float = 0.95, reps: int = BOOTSTRAP_REPS,
                      seed: int = 0) -> tuple[float, float, float]:
    """(mean(a) - mean(b), low, high) with the same trajectories resampled for both; an interval that excludes 0
    says the two differ on this set of trajectories."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"a paired comparison needs the same trajectories, got {x.shape} and {y.shape}")
    return bootstrap_mean(x - y, level=level, reps=reps, seed=seed)
