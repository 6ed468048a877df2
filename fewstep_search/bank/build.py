"""Building a bank: `solve_chunk` solves one chunk of a `BankPlan`'s trajectories (`bank.plan`: what to solve),
streamed, and `build_bank` assembles them.

Streaming (why peak memory is O(chunk x M x d + K x M x r), never O(K x M x d)): a chunk of trajectories is solved
down the grid, its gains are swept backwards along its states, its outputs are projected and cast to the stored
dtype, and only then is the next chunk solved; full-size states are kept only when asked (small models).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fewstep_search.bank.container import Bank
from fewstep_search.bank.memory import default_chunk, refuse_if_too_big
from fewstep_search.bank.plan import BankPlan, log_grid, plan_for
from fewstep_search.denoiser import CheckedDenoiser, Denoiser, bind_condition
from fewstep_search.progress import task_progress
from fewstep_search.solvers import rk4_interval

__all__ = [
    "plan_for",
    "BankAssembler",
    "BankPlan",
    "ChunkResult",
    "assemble",
    "build_bank",
    "log_grid",
    "solve_chunk",
]


@dataclass(frozen=True)
class ChunkResult:
    """Trajectories lo..hi-1 of a plan, solved and reduced to what the bank stores (CPU tensors)."""

    lo: int
    hi: int
    x_end: Tensor
    denoised: Tensor
    phi: Tensor
    states: Tensor | None


def _solve_on_grid(den: Denoiser, x: Tensor, grid: Tensor, substeps: int, tick: Callable[[], None], *,
                   reduce: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Accurate solve along the grid; returns (x_end, reduced outputs [B, M, r], states [B, M, *shape]).

    x_end is the clean end point x*(0): the output at the last grid point (sigma_min), which the solve computes
    anyway, i.e. the step into 0 every sampler here ends with. Each grid point's output is reduced (projected,
    cast) as soon as it is computed, into preallocated tensors: the chunk never holds its full-size outputs, nor
    a list of rows beside a stacked copy.
    """
    m, batch = grid.numel(), x.shape[0]
    states = x.new_empty((batch, m, *x.shape[1:]))
    outs: Tensor | None = None
    for j in range(m):
        d = den(x, grid[j].to(x.dtype).expand(batch))
        states[:, j] = x
        red = reduce(d)
        if outs is None:
            outs = red.new_empty((batch, m, red.shape[-1]))
        outs[:, j] = red
        if j < m - 1:
            x = rk4_interval(den, x, grid[j], grid[j + 1], substeps=substeps, d0=d)
        else:
            x = d  # the last step into 0: x*(0) = D(x*(sigma_min), sigma_min)
        del d
        tick()
    assert outs is not None  # m >= 2
    return x, outs, states


def _gains(den: Denoiser, states: Tensor, grid: Tensor, v: Tensor, *, probes: int, substeps: int,
           tick: Callable[[], None]) -> Tensor:
    """phi[k, j]: RMS gain of the flow Jacobian from grid_j to sigma_min, one backward VJP sweep per probe.

    `v` [B * probes, *shape] are the probes (trajectory-major); `den` must accept batches of B * probes.
    """
    k, m = states.shape[0], states.shape[1]
    v0 = v.flatten(1).pow(2).sum(1).reshape(k, probes).sum(1)
    phi2 = torch.empty(k, m, dtype=torch.float64)
    phi2[:, -1] = 1.0
    for j in range(m - 2, -1, -1):
        with torch.enable_grad():
            xj = states[:, j].repeat_interleave(probes, dim=0).detach().requires_grad_(True)
            y = rk4_interval(den, xj, grid[j], grid[j + 1], substeps=substeps)
            (v,) = torch.autograd.grad(y, xj, grad_outputs=v)
        v = v.detach()
        phi2[:, j] = (v.flatten(1).pow(2).sum(1).reshape(k, probes).sum(1) / v0).double().cpu()
        tick()
    return phi2.sqrt()


def solve_chunk(
    denoiser: Denoiser,
    plan: BankPlan,
    lo: int,
    hi: int,
    *,
    device: torch.device | str = "cpu",
    projection: Tensor | None = None,
    tick: Callable[[], None] = lambda: None,
) -> ChunkResult:
    """Solve trajectories lo..hi-1 of `plan` and reduce them to what the bank stores (see the module docstring).

    `projection` is `plan.projection()` (passed in so a build computes it once). 2 M - 1 ticks.
    """
    grid = plan.grid().to(device)
    cond = plan.cond()
    cond_chunk = None if cond is None else cond[lo:hi].to(device)
    den = bind_condition(denoiser, cond_chunk)
    xs = plan.x_start(lo, hi).to(device)
    proj = None if projection is None else projection.to(device)
    out_dtype = torch.float16 if plan.store_float16 else plan.torch_dtype

    def reduce(d: Tensor) -> Tensor:
        flat = d.flatten(1)
        if proj is not None:
            flat = flat.float() @ proj
        return flat.to(out_dtype)

    with torch.no_grad():
        x_end, stored, states = _solve_on_grid(den, xs, grid, plan.substeps, tick, reduce=reduce)
    probe_den = bind_condition(denoiser, None if cond_chunk is None else cond_chunk.repeat_interleave(plan.probes))
    phi = _gains(probe_den, states, grid, plan.probes_for(lo, hi).to(device), probes=plan.probes,
                 substeps=plan.gain_substeps, tick=tick)
    kept = states.cpu() if plan.keep_states else None
    del states
    return ChunkResult(lo, hi, x_end.cpu(), stored.cpu(), phi, kept)


class BankAssembler:
    """Fills one bank's tensors chunk by chunk, so a build (or a folder of shards) is never held twice.

    Preallocates x_end, denoised, phi (and states when the plan keeps them) for all K trajectories; `add`
    copies a chunk in (any order, any sizes) and the caller drops the chunk; `bank()` checks that the chunks
    covered 0..K-1 exactly once and returns the `Bank`.
    """

    def __init__(self, plan: BankPlan) -> None:
        k, m, r = plan.n_trajectories, plan.grid_size, plan.stored_dim
        self.plan = plan
        self.x_end = torch.empty((k, *plan.shape), dtype=plan.torch_dtype)
        self.denoised = torch.empty((k, m, r), dtype=torch.float16 if plan.store_float16 else plan.torch_dtype)
        self.phi = torch.empty((k, m), dtype=torch.float64)
        self.states = torch.empty((k, m, *plan.shape), dtype=plan.torch_dtype) if plan.keep_states else None
        self._covered: list[tuple[int, int]] = []

    def add(self, chunk: ChunkResult) -> None:
        lo, hi = chunk.lo, chunk.hi
        if not 0 <= lo < hi <= self.plan.n_trajectories:
            raise ValueError(f"bank chunk {lo}..{hi} is outside 0..{self.plan.n_trajectories}")
        if chunk.denoised.shape[1:] != self.denoised.shape[1:] or chunk.x_end.shape[0] != hi - lo:
            raise ValueError(f"bank chunk {lo}..{hi} has outputs {tuple(chunk.denoised.shape)}, the plan "
                             f"[{hi - lo}, {self.plan.grid_size}, {self.plan.stored_dim}]")
        self.x_end[lo:hi] = chunk.x_end
        self.denoised[lo:hi] = chunk.denoised
        self.phi[lo:hi] = chunk.phi
        if self.states is not None:
            if chunk.states is None:
                raise ValueError(f"bank chunk {lo}..{hi} has no states but the plan keeps them")
            self.states[lo:hi] = chunk.states
        self._covered.append((lo, hi))

    def bank(self) -> Bank:
        expect = 0
        for lo, hi in sorted(self._covered):
            if lo != expect:
                raise ValueError(f"bank chunks do not cover the trajectories contiguously (gap or overlap at {expect})")
            expect = hi
        if expect != self.plan.n_trajectories:
            raise ValueError(f"bank chunks cover {expect} of {self.plan.n_trajectories} trajectories")
        plan = self.plan
        return Bank(grid=plan.grid(), x_start=plan.x_start(0, plan.n_trajectories), x_end=self.x_end,
                    denoised=self.denoised, phi=self.phi, split=plan.split(), states=self.states,
                    projection=plan.projection(), cond=plan.cond(), meta=plan.meta())


def assemble(plan: BankPlan, chunks: Sequence[ChunkResult]) -> Bank:
    """One bank from chunks that cover 0..K-1 (any order, any sizes)."""
    out = BankAssembler(plan)
    for c in chunks:
        out.add(c)
    return out.bank()


def build_bank(
    denoiser: Denoiser,
    *,
    shape: tuple[int, ...],
    sigma_min: float,
    sigma_max: float,
    n_trajectories: int = 256,
    grid_size: int = 128,
    select_fraction: float = 0.25,
    test_fraction: float = 0.25,
    substeps: int = 2,
    probes: int = 2,
    gain_substeps: int = 1,
    seed: int = 0,
    dtype: torch.dtype | str = torch.float64,
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
    keep_states: bool | None = None,
    store_float16: bool = False,
    project_dim: int | None = None,
    model_id: str = "unknown",
    progress: bool = False,
) -> Bank:
    """Solve K reference trajectories accurately and cache what the bounds and the true error need.

    Args:
        shape: per-sample shape of x (without the batch dimension).
        n_trajectories: K; split into fit / select / test by `select_fraction` and `test_fraction` (seeded).
        grid_size: M, the points of the log-sigma grid (the DP's resolution).
        substeps: RK4 sub-steps per grid cell for the reference solve (M=128, 2 sub-steps: ~1e-7 relative).
        probes: random covectors per trajectory for the gain phi; `gain_substeps` RK4 sub-steps in its VJPs.
        batch_size: trajectories per chunk (memory; results do not depend on it); default min(K, 64), fewer
            when one chunk's states would take more than 512 MiB (`default_chunk`).
        keep_states: store the trajectory states (default: when they fit in 256 MiB).
        store_float16 / project_dim: compress `denoised` for big models (B_w needs only distances).
        model_id: recorded in the metadata and checked when the bank is loaded again.
    A conditional model (one that advertises `conditions`) gets its trajectories spread over the conditions.
    """
    den = denoiser if isinstance(denoiser, CheckedDenoiser) else CheckedDenoiser(denoiser)
    plan = plan_for(
        den, shape=shape, sigma_min=sigma_min, sigma_max=sigma_max, n_trajectories=n_trajectories,
        grid_size=grid_size, select_fraction=select_fraction, test_fraction=test_fraction, substeps=substeps,
        probes=probes, gain_substeps=gain_substeps, seed=seed, dtype=dtype, keep_states=keep_states,
        store_float16=store_float16, project_dim=project_dim, model_id=model_id,
    )
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chunk = batch_size or default_chunk(plan)
    refuse_if_too_big(plan, chunk=chunk)
    projection = plan.projection()
    ticks = (2 * grid_size - 1) * math.ceil(n_trajectories / chunk)
    out = BankAssembler(plan)
    with task_progress("building reference bank", total=ticks, enabled=progress) as tick:
        for lo in range(0, n_trajectories, chunk):
            hi = min(n_trajectories, lo + chunk)
            out.add(solve_chunk(den, plan, lo, hi, device=device, projection=projection, tick=tick))
    return out.bank()
