"""GITS (Chen et al., ICML 2024, "On the Trajectory Regularity of ODE-based Diffusion Sampling", section 5:
Geometry-Inspired Time Scheduling): pick the N steps of a schedule among the points of a fine teacher grid by
dynamic programming, where the cost of one jump from grid point a down to b is how far a single first-order step
(DDIM = Euler in sigma) started on the teacher trajectory at a lands from the teacher's own state at b.

    C[a, b] = mean_k || xhat_k(a -> b) - x*_k(sigma_b) ||,
    xhat(a -> b) = r x*(sigma_a) + (1 - r) D(x*(sigma_a), sigma_a),   r = sigma_b / sigma_a,
    total(path j_0 = 0 < j_1 < ... < j_N = M-1) = sum_{n=1..N} coeff^(n-1) C[j_{n-1}, j_n].

The cost coefficient (1.15 in the paper) weights the n-th jump of the path by coeff^(n-1): with coeff > 1 the
later (low-noise) jumps, whose errors are not damped by the steps after them, count more. (Scaling every cost by
one constant would not change the argmin; the coefficient enters through the step index, as the authors' recursion
V_k(j) = min_i C[j, i] + coeff * V_{k-1}(i) does.) With coeff = 1 this is `fewstep_search.dp.dp_optimal` of C.

The teacher trajectory is the bank's: its states on the log-sigma grid (`bank.states`) and the model outputs there
(`bank.denoised` when it is not projected), so the cost matrix costs no network call; a lean or projected bank is
re-solved / re-evaluated with one denoiser call per grid point (plus the RK4 sub-steps for missing states).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from fewstep_search.bank import Bank
from fewstep_search.denoiser import Denoiser, bind_condition
from fewstep_search.schedules import Schedule
from fewstep_search.solvers import rk4_interval

__all__ = ["GITS_COEFF", "Metric", "teacher_trajectory", "gits_cost_matrix", "gits_bank_cost", "gits_dp",
           "gits_path_cost", "gits_schedule"]

GITS_COEFF = 1.15
"""The paper's cost coefficient."""

Metric = Literal["l2", "l1", "dev"]


def teacher_trajectory(bank: Bank, denoiser: Denoiser | None = None, *, max_trajectories: int | None = None,
                       batch_size: int = 64) -> tuple[Tensor, Tensor]:
    """(states [K, M, d], outputs [K, M, d]) of the teacher on the bank grid, float64, flattened.

    Uses the bank's states and unprojected outputs when it has them; otherwise solves the first `max_trajectories`
    trajectories again down the grid exactly as the bank was built (RK4 in log sigma, `bank.meta["substeps"]`
    sub-steps per cell, the model's output at each grid point reused as the first stage), or evaluates D at the
    stored states when only the outputs are projected. Needs `denoiser` in those two cases.
    """
    k = bank.n_trajectories if max_trajectories is None else min(bank.n_trajectories, int(max_trajectories))
    if k < 1:
        raise ValueError("GITS needs at least one teacher trajectory")
    if bank.states is not None and bank.projection is None:
        return bank.states[:k].flatten(2).double(), bank.denoised[:k].double()
    if denoiser is None:
        raise ValueError("this bank has no trajectory states or stores projected outputs; GITS needs the denoiser "
                         "to recompute the teacher trajectory on the grid")
    grid = bank.grid.to(bank.x_start.device)
    substeps = int(bank.meta.get("substeps", 2))
    states, outs = [], []
    with torch.no_grad():
        for lo in range(0, k, batch_size):
            hi = min(k, lo + batch_size)
            den = bind_condition(denoiser, None if bank.cond is None else bank.cond[lo:hi])
            xs, ds = [], []
            x = bank.x_start[lo:hi] if bank.states is None else None
            for j in range(grid.numel()):
                if bank.states is not None:
                    x = bank.states[lo:hi, j]
                d = den(x, grid[j].to(x.dtype).expand(x.shape[0]))
                xs.append(x.flatten(1).double())
                ds.append(d.flatten(1).double())
                if bank.states is None and j < grid.numel() - 1:
                    x = rk4_interval(den, x, grid[j], grid[j + 1], substeps=substeps, d0=d)
            states.append(torch.stack(xs, 1))
            outs.append(torch.stack(ds, 1))
    return torch.cat(states), torch.cat(outs)


def _deviation(points: Tensor, start: Tensor, end: Tensor) -> Tensor:
    """Distance of points [K, P, d] from the straight line through start [K, d] and end [K, d] (per trajectory)."""
    axis = end - start
    axis = axis / axis.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    rel = points - start[:, None]
    along = (rel * axis[:, None]).sum(-1, keepdim=True)
    return (rel - along * axis[:, None]).norm(dim=-1)


def gits_cost_matrix(states: Tensor, outputs: Tensor, grid: Tensor, *, metric: Metric = "l2") -> Tensor:
    """C[a, b] (a < b): the cost of one Euler/DDIM jump from grid[a] to grid[b] on the teacher trajectory; +inf
    elsewhere. [M, M] float64.

    `metric`: "l2" (default) or "l1": mean over trajectories of the norm of `xhat(a -> b) - x*(sigma_b)`; "dev": the
    jump's deviation from the straight line between the trajectory's start and end minus the teacher's deviation
    at b (the "trajectory regularity" metric of the authors' release).
    """
    if states.shape != outputs.shape or states.ndim != 3:
        raise ValueError(f"states and outputs must both be [K, M, d], got {tuple(states.shape)}, "
                         f"{tuple(outputs.shape)}")
    m = grid.numel()
    if states.shape[1] != m:
        raise ValueError(f"the trajectory has {states.shape[1]} grid points, the grid {m}")
    g = grid.to(states.device, torch.float64)
    cost = torch.full((m, m), math.inf, dtype=torch.float64, device=states.device)
    dev_teacher = _deviation(states, states[:, 0], states[:, -1]) if metric == "dev" else None
    for a in range(m - 1):
        r = (g[a + 1 :] / g[a])[None, :, None]  # [1, M-a-1, 1]
        jump = r * states[:, a : a + 1] + (1 - r) * outputs[:, a : a + 1]  # [K, M-a-1, d]
        if metric == "l2":
            c = (jump - states[:, a + 1 :]).norm(dim=-1).mean(0)
        elif metric == "l1":
            c = (jump - states[:, a + 1 :]).abs().sum(-1).mean(0)
        elif metric == "dev":
            c = (_deviation(jump, states[:, 0], states[:, -1]) - dev_teacher[:, a + 1 :]).mean(0)
        else:
            raise ValueError(f"unknown GITS metric {metric!r}; expected 'l2', 'l1' or 'dev'")
        cost[a, a + 1 :] = c
    return cost


def gits_dp(cost: Tensor | np.ndarray, nfe: int, *, coeff: float = GITS_COEFF) -> tuple[np.ndarray, float]:
    """(indices [nfe+1] from 0 to M-1, minimal cost): the path minimizing `sum_n coeff^(n-1) C[j_{n-1}, j_n]`.

    Forward value iteration, O(nfe M^2): `V_n[b] = min_a V_{n-1}[a] + coeff^(n-1) C[a, b]`.
    """
    c = cost.detach().cpu().numpy() if isinstance(cost, Tensor) else np.asarray(cost, dtype=np.float64)
    m = c.shape[0]
    if c.shape != (m, m):
        raise ValueError(f"cost must be square, got shape {c.shape}")
    if not (math.isfinite(coeff) and coeff > 0):
        raise ValueError(f"coeff must be a positive number, got {coeff!r}")
    if not 1 <= nfe <= m - 1:
        raise ValueError(f"nfe must be in [1, {m - 1}] on a grid of {m} points, got {nfe}")
    value = np.full(m, np.inf)
    value[0] = 0.0
    back = np.zeros((nfe, m), dtype=np.int64)
    for n in range(nfe):
        total = value[:, None] + coeff**n * c
        back[n] = np.argmin(total, axis=0)
        value = total[back[n], np.arange(m)]
    if not np.isfinite(value[m - 1]):
        raise ValueError("no finite path on the grid: the cost matrix has inf/NaN where steps are needed")
    path = [m - 1]
    for n in range(nfe - 1, -1, -1):
        path.append(int(back[n][path[-1]]))
    return np.asarray(path[::-1]), float(value[m - 1])


def gits_path_cost(cost: Tensor | np.ndarray, indices: np.ndarray | list[int], *, coeff: float = GITS_COEFF) -> float:
    """GITS's objective of one path of grid indices (what `gits_dp` minimizes)."""
    c = cost.detach().cpu().numpy() if isinstance(cost, Tensor) else np.asarray(cost, dtype=np.float64)
    idx = np.asarray(indices)
    return float(sum(coeff**n * c[idx[n], idx[n + 1]] for n in range(idx.size - 1)))


GITS_BATCH_BYTES = 512 * 2**20
"""What one batch of teacher trajectories may take: its states, outputs, one row of jumps and their differences
(four [batch, M, d] float64 tensors). At d = 16384 and M = 256 that is four trajectories a batch; a batch of 64
took 8.6 GiB there."""


def gits_batch(bank: Bank) -> int:
    """Trajectories per batch for the cost: 64, or fewer where four [batch, M, d] float64 tensors pass
    `GITS_BATCH_BYTES`."""
    per_trajectory = 4 * bank.grid.numel() * bank.x_start[0].numel() * 8
    return max(1, min(64, GITS_BATCH_BYTES // per_trajectory))


def gits_bank_cost(bank: Bank, *, denoiser: Denoiser | None = None, metric: Metric = "l2",
                   max_trajectories: int | None = None, batch_size: int | None = None) -> Tensor:
    """The GITS cost matrix of the bank's first `max_trajectories` teacher trajectories, accumulated `batch_size`
    trajectories at a time (it is a mean over trajectories; default `gits_batch`), so memory stays
    O(batch_size M d) even where the teacher is re-solved."""
    k = bank.n_trajectories if max_trajectories is None else min(bank.n_trajectories, int(max_trajectories))
    batch_size = gits_batch(bank) if batch_size is None else batch_size
    if k < 1 or batch_size < 1:
        raise ValueError("GITS needs at least one teacher trajectory and batch_size >= 1")
    total: Tensor | None = None
    for lo in range(0, k, batch_size):
        part = bank.subset(torch.arange(lo, min(k, lo + batch_size), device="cpu"))
        states, outputs = teacher_trajectory(part, denoiser, batch_size=batch_size)
        c = gits_cost_matrix(states, outputs, bank.grid, metric=metric) * part.n_trajectories
        total = c if total is None else total + c
    assert total is not None
    return total / k


def gits_schedule(bank: Bank, nfe: int, *, denoiser: Denoiser | None = None, coeff: float = GITS_COEFF,
                  metric: Metric = "l2", max_trajectories: int | None = None, batch_size: int | None = None
                  ) -> Schedule:
    """The GITS schedule of `nfe` steps on the bank grid, from the bank's (fit) teacher trajectories.

    Example:
        >>> # s = gits_schedule(bank.fit(), 6, denoiser=model)   # nodes are bank-grid points
    """
    cost = gits_bank_cost(bank, denoiser=denoiser, metric=metric, max_trajectories=max_trajectories,
                          batch_size=batch_size)
    idx, _ = gits_dp(cost, nfe, coeff=coeff)
    return Schedule(bank.grid.double().cpu().numpy()[idx], name="gits")
