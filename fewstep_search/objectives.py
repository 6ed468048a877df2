"""Objectives on a bank: the convex-combination weights, the bounds B_0 and B_w, and the true error E.

Notation (docs/design.md section 1): a schedule is a descending tensor `s = [sigma_N, ..., sigma_0]`, `u = 1/sigma`.
The first-order solver's output is `x0_hat = (sigma_0/sigma_N) x_N + sum_i w_i D(x_i, sigma_i)` with
`w_i = sigma_0 (u_{i-1} - u_i)`. Interval i (from sigma_i down to sigma_{i-1}) costs

    c_i = mean_k  g_k(sigma_{i-1}) * integral_{u_i}^{u_{i-1}} ||D*_k(u) - D*_k(u_i)|| du

with `g = sigma * phi` for B_w and `g = sigma_0` for B_0 (docs/design.md: B_w = B_0 when D ignores x). Because the bound
is a sum over intervals, its minimum over schedules on the bank grid is a dynamic program (`grid_cost_matrix` +
`fewstep_search.dp`); `bound` is the same quantity for off-grid schedules, differentiable in `s`, with D*
interpolated linearly in log sigma and each integral done by Gauss-Legendre quadrature in log sigma.

`true_error` is the quantity that matters: `E(s) = mean_k ||Solve_s(x_N^k) - x0*^k||`, N network evaluations per
trajectory, differentiable through the solver (LD3). The solve is the sampler users run (its last step into 0,
`fewstep_search.solvers.sampling_sigmas`) and x0* the bank's clean end point x*(0), so E is the error of the
exported sampler.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

from fewstep_search.bank import Bank
from fewstep_search.denoiser import Denoiser, bind_condition
from fewstep_search.solvers import get_solver, sampling_sigmas

__all__ = [
    "BoundKind",
    "convex_weights",
    "grid_cost_matrix",
    "bound",
    "true_error",
    "trajectory_errors",
    "grid_bound",
    "check_endpoints",
]

BoundKind = Literal["bw", "b0"]


def convex_weights(sigmas: Tensor) -> tuple[Tensor, Tensor]:
    """(w, c): the first-order solver's output is `c x_N + sum_j w_j D(x_j, sigmas[j])`, j = 0..N-1.

    `w_j = sigma_0 (1/sigmas[j+1] - 1/sigmas[j]) >= 0`, `c = sigma_0 / sigma_N`, and `sum w = 1 - c`.
    """
    u = 1.0 / sigmas
    s0 = sigmas[-1]
    return s0 * (u[1:] - u[:-1]), s0 / sigmas[0]


def _gain(bank: Bank, kind: BoundKind) -> Tensor:
    """g_k(grid_j) [K, M]: sigma * phi for B_w, the constant sigma_0 for B_0."""
    if kind == "bw":
        return bank.grid[None, :] * bank.phi.double()
    if kind == "b0":
        return torch.full_like(bank.phi, bank.sigma_min, dtype=torch.float64)
    raise ValueError(f"unknown bound {kind!r}; expected 'bw' or 'b0'")


def grid_cost_matrix(bank: Bank, kind: BoundKind = "bw", *, chunk: int = 64) -> Tensor:
    """C[a, b] (a < b): the cost of one solver step from grid[a] down to grid[b]; +inf elsewhere. [M, M] float64.

    The integral over u is the trapezoid rule on the grid points between a and b. O(M^2 K r) work, in chunks of
    trajectories so memory stays O(chunk M^2).
    """
    m = bank.grid.numel()
    u = 1.0 / bank.grid  # ascending
    du = (u[1:] - u[:-1])[None, None, :]  # [1, 1, M-1]
    gain = _gain(bank, kind)  # [K, M]
    total = torch.zeros(m, m, dtype=torch.float64, device=bank.grid.device)
    for lo in range(0, bank.n_trajectories, chunk):
        d = bank.denoised[lo : lo + chunk].double()  # [k, M, r]
        dist = torch.cdist(d, d, compute_mode="donot_use_mm_for_euclid_dist")  # [k, a, j] = ||D*(j) - D*(a)||
        trap = 0.5 * (dist[:, :, 1:] + dist[:, :, :-1]) * du  # [k, a, M-1]
        cum = torch.cat([torch.zeros_like(trap[:, :, :1]), torch.cumsum(trap, dim=2)], dim=2)  # [k, a, j<=b]
        integral = cum - torch.diagonal(cum, dim1=1, dim2=2)[:, :, None]  # from u_a (not u_0) to u_b
        total += (gain[lo : lo + chunk, None, :] * integral).sum(0)
    cost = total / bank.n_trajectories
    upper = torch.triu(torch.ones(m, m, dtype=torch.bool, device=cost.device), diagonal=1)
    return torch.where(upper, cost, torch.full_like(cost, float("inf")))


def grid_bound(cost: Tensor, indices: np.ndarray | list[int]) -> float:
    """The bound of a schedule whose nodes are grid points `indices` (ascending indices = descending sigmas)."""
    idx = np.asarray(indices)
    return float(cost[idx[:-1], idx[1:]].sum())


def _interp(values: Tensor, grid: Tensor, sigma: Tensor) -> Tensor:
    """Linear interpolation in log sigma of per-grid values [K, M, ...] at scalar-tensor sigmas [Q] -> [K, Q, ...]."""
    lg = torch.log(grid)  # descending
    pos = (lg[0] - torch.log(sigma)) / (lg[0] - lg[-1]) * (grid.numel() - 1)
    pos = pos.clamp(0, grid.numel() - 1)
    lo = pos.detach().floor().long().clamp(max=grid.numel() - 2)
    frac = (pos - lo.to(pos.dtype)).to(values.dtype)
    shape = (1, -1) + (1,) * (values.ndim - 2)
    return values[:, lo] * (1 - frac.reshape(shape)) + values[:, lo + 1] * frac.reshape(shape)


def bound(bank: Bank, sigmas: Tensor, kind: BoundKind = "bw", *, quad_points: int = 16,
          max_elements: int = 2**23) -> Tensor:
    """B_w or B_0 of an arbitrary schedule (descending, endpoints = the bank's), differentiable in `sigmas`.

    Each interval's integral over u is `integral ||D*(l) - D*(l_i)|| e^{-l} dl` over l = log sigma, by
    `quad_points`-point Gauss-Legendre; D*, phi interpolated linearly in log sigma on the bank grid. The
    intervals are done together (one gather for all their quadrature nodes: the bound is evaluated hundreds of
    times per optimizer run), in groups of at most `max_elements` interpolated values so memory stays bounded.
    """
    sigmas = sigmas.to(device=bank.grid.device, dtype=torch.float64)
    nodes, weights = np.polynomial.legendre.leggauss(quad_points)
    nodes_t = torch.tensor((nodes + 1) / 2, dtype=torch.float64, device=sigmas.device)  # on [0, 1]
    weights_t = torch.tensor(weights / 2, dtype=torch.float64, device=sigmas.device)
    d_all = bank.denoised.double()
    gain = _gain(bank, kind)  # [K, M]
    k, r = d_all.shape[0], d_all.shape[-1]
    n = sigmas.numel() - 1
    group = max(1, min(n, max_elements // max(1, k * quad_points * r)))
    total = sigmas.new_zeros(())
    for start in range(0, n, group):
        hi, lo = sigmas[start : start + group], sigmas[start + 1 : start + group + 1]  # [G]
        l_hi, l_lo = torch.log(hi), torch.log(lo)
        lq = l_lo[:, None] + (l_hi - l_lo)[:, None] * nodes_t[None, :]  # [G, Q] quadrature nodes in log sigma
        g = hi.numel()
        d_q = _interp(d_all, bank.grid, torch.exp(lq).reshape(-1)).reshape(k, g, quad_points, r)
        d_i = _interp(d_all, bank.grid, hi)  # [K, G, r]
        dist = (d_q - d_i[:, :, None]).norm(dim=-1)  # [K, G, Q]
        integral = (dist * torch.exp(-lq)[None] * weights_t).sum(-1) * (l_hi - l_lo)[None]  # [K, G]
        g_lo = _interp(gain, bank.grid, lo)  # [K, G]
        total = total + (g_lo * integral).mean(0).sum()
    return total


def check_endpoints(bank: Bank, sigmas: Tensor) -> None:
    """ValueError unless `sigmas` starts at the bank's sigma_max and ends at its sigma_min (or at 0).

    The trajectories start at sigma_max (a schedule that starts elsewhere solves another problem); the last node is
    the schedule's sigma_min, or the 0 that replaces it when sampled (the two are scored the same).
    """
    first, last = float(sigmas[0].detach()), float(sigmas[-1].detach())
    if abs(first - bank.sigma_max) > 1e-9 * bank.sigma_max:
        raise ValueError(f"schedule starts at {first:.6g}, the bank at sigma_max={bank.sigma_max:.6g}")
    if last != 0.0 and abs(last - bank.sigma_min) > 1e-9 * bank.sigma_min:
        raise ValueError(f"schedule ends at {last:.6g}, the bank at sigma_min={bank.sigma_min:.6g} (or 0)")


def _has_trainable_weights(denoiser: object) -> bool:
    return isinstance(denoiser, torch.nn.Module) and any(p.requires_grad for p in denoiser.parameters())


def _chunk_errors(denoiser: Denoiser, bank: Bank, solve, sigmas: Tensor, lo: int, hi: int) -> Tensor:
    """[hi - lo] ||Solve_s(x_N^k) - x0*^k|| of trajectories lo:hi, in float64, the last step into 0."""
    x = bank.x_start[lo:hi]
    den = bind_condition(denoiser, None if bank.cond is None else bank.cond[lo:hi])
    out = solve(den, x, sampling_sigmas(sigmas.to(device=x.device, dtype=x.dtype)))
    return (out - bank.x_end[lo:hi].to(out)).flatten(1).norm(dim=1).double()


def _chunk_error_sum(denoiser: Denoiser, bank: Bank, solve, sigmas: Tensor, lo: int, hi: int) -> Tensor:
    return _chunk_errors(denoiser, bank, solve, sigmas, lo, hi).sum()


@torch.no_grad()
def trajectory_errors(denoiser: Denoiser, bank: Bank, sigmas: Tensor, *, solver: str = "ddim",
                      batch_size: int | None = None) -> Tensor:
    """[K] float64: each trajectory's error `||Solve_s(x_N^k) - x0*^k||` (`true_error` is their mean), for
    intervals and paired comparisons over trajectories."""
    check_endpoints(bank, sigmas)
    solve, k = get_solver(solver), bank.n_trajectories
    chunk = batch_size or k
    return torch.cat([_chunk_errors(denoiser, bank, solve, sigmas, lo, lo + chunk).cpu() for lo in range(0, k, chunk)])


class _ChunkedTrueError(torch.autograd.Function):
    """E with a backward pass that holds one chunk's graph at a time.

    Why: summing every chunk's error into one tensor keeps all chunks' graphs until the single `backward()`, so
    the memory of a gradient step is O(K N d) whatever the chunk size (2.07 GiB for one Adam trial at d = 16384,
    K_fit = 512, N = 6). Here the forward runs without a graph and the backward solves each chunk again under
    autograd and accumulates its gradient: one more forward pass per step, O(chunk N d) memory, the same value
    and gradient. Gradients reach `sigmas` only (the search freezes the model's weights).
    """

    @staticmethod
    def forward(ctx, sigmas: Tensor, denoiser: Denoiser, bank: Bank, solve, chunk: int) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(sigmas)
        ctx.args = (denoiser, bank, solve, chunk)
        k = bank.n_trajectories
        with torch.no_grad():
            total = sum(_chunk_error_sum(denoiser, bank, solve, sigmas, lo, lo + chunk) for lo in range(0, k, chunk))
        return torch.as_tensor(total, dtype=torch.float64, device=sigmas.device) / k

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        (sigmas,) = ctx.saved_tensors
        denoiser, bank, solve, chunk = ctx.args
        k = bank.n_trajectories
        leaf = sigmas.detach().requires_grad_(True)
        grad = torch.zeros_like(leaf)
        with torch.enable_grad():
            for lo in range(0, k, chunk):
                (g,) = torch.autograd.grad(_chunk_error_sum(denoiser, bank, solve, leaf, lo, lo + chunk), leaf)
                grad += g
        return (grad * (grad_out / k)).to(sigmas.dtype), None, None, None, None


def true_error(
    denoiser: Denoiser,
    bank: Bank,
    sigmas: Tensor,
    *,
    solver: str = "ddim",
    batch_size: int | None = None,
) -> Tensor:
    """E(s) = mean_k ||Solve_s(x_N^k) - x0*^k|| over the bank's trajectories, differentiable in `sigmas`.

    `sigmas` must start at the bank's sigma_max (the trajectories start there) and end at its sigma_min (or 0);
    the solve runs them with the last replaced by 0, the sampler every export gives (`sampling_sigmas`).
    Computed in the bank's dtype on the bank's device; batches of `batch_size` trajectories bound the memory,
    of the backward pass too: with more than one batch, a model without trainable weights and `sigmas` that
    need a gradient, the backward re-solves one batch at a time (`_ChunkedTrueError`). A model whose weights
    need gradients keeps the plain graph, so they get theirs. A conditional model is called with each
    trajectory's condition (`bank.cond`).
    """
    check_endpoints(bank, sigmas)
    solve = get_solver(solver)
    k = bank.n_trajectories
    chunk = batch_size or k
    if chunk < k and torch.is_grad_enabled() and sigmas.requires_grad and not _has_trainable_weights(denoiser):
        return _ChunkedTrueError.apply(sigmas, denoiser, bank, solve, chunk)
    total = sigmas.new_zeros((), dtype=torch.float64)
    for lo in range(0, k, chunk):
        total = total + _chunk_error_sum(denoiser, bank, solve, sigmas, lo, lo + chunk)
    return total / k
