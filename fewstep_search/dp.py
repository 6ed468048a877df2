"""Exact minimization of an interval-additive cost over schedules whose nodes lie on a grid.

Given C[a, b] = cost of one step from grid[a] down to grid[b] (a < b; +inf elsewhere), find indices
`0 = j_0 < j_1 < ... < j_N = M-1` minimizing sum_i C[j_{i-1}, j_i]. Value iteration over the number of steps:
`V_n[b] = min_a V_{n-1}[a] + C[a, b]`, O(N M^2) time, vectorized per step (GITS / docs/design.md "Additivity and DP").
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

__all__ = ["dp_optimal"]


def dp_optimal(cost: Tensor | np.ndarray, nfe: int) -> tuple[np.ndarray, float]:
    """(indices [nfe+1], minimal cost) of the best path from node 0 to node M-1 with exactly `nfe` steps."""
    c = cost.detach().cpu().numpy() if isinstance(cost, Tensor) else np.asarray(cost, dtype=np.float64)
    m = c.shape[0]
    if c.shape != (m, m):
        raise ValueError(f"cost must be square, got shape {c.shape}")
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    if nfe > m - 1:
        raise ValueError(f"nfe={nfe} needs a grid of at least {nfe + 1} points, the grid has {m}")
    value = np.full(m, np.inf)
    value[0] = 0.0
    back = np.zeros((nfe, m), dtype=np.int64)
    for n in range(nfe):
        total = value[:, None] + c  # [a, b]
        back[n] = np.argmin(total, axis=0)
        value = total[back[n], np.arange(m)]
    if not np.isfinite(value[m - 1]):
        raise ValueError("no finite path on the grid: the cost matrix has inf/NaN where steps are needed")
    path = [m - 1]
    for n in range(nfe - 1, -1, -1):
        path.append(int(back[n][path[-1]]))
    return np.asarray(path[::-1]), float(value[m - 1])
