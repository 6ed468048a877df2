"""Building a bank: a `BankPlan` (what to solve) and `solve_chunk` (one chunk of trajectories, streamed).

Streaming (why peak memory is O(chunk x M x d + K x M x r), never O(K x M x d)): a chunk of trajectories is solved
down the grid, its gains are swept backwards along its states, its outputs are projected and cast to the stored
dtype, and only then is the next chunk solved; full-size states are kept only when asked (small models).

Determinism: every random draw is per trajectory, from a generator seeded by (seed, stream, trajectory index):
the start noise, the gain probes, and (per bank) the split and the projection. So a bank does not depend on the
chunk size, the number of probes does not move the split, and shards built by separate workers assemble into the
same bank as a single-process build.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fewstep_search.bank.container import SPLIT_NAMES, Bank
from fewstep_search.bank.memory import default_chunk, refuse_if_too_big
from fewstep_search.denoiser import CheckedDenoiser, Denoiser, bind_condition, family_of, is_conditional
from fewstep_search.progress import task_progress
from fewstep_search.schedules import check_range, prior_scale
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

_STREAM_START, _STREAM_PROBE, _STREAM_SPLIT, _STREAM_PROJECTION = 1, 2, 3, 4
_STATES_IN_MEMORY_BYTES = 256 * 2**20
"""Default `keep_states`: keep the trajectory states when they take at most this much memory."""


def log_grid(sigma_min: float, sigma_max: float, size: int) -> Tensor:
    """Descending float64 grid, uniform in log sigma, with exact endpoints."""
    if size < 2:
        raise ValueError(f"grid size must be >= 2, got {size}")
    g = torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), size, dtype=torch.float64))
    g[0], g[-1] = sigma_max, sigma_min
    return g


def _generator(seed: int, stream: int, index: int = 0) -> torch.Generator:
    state = np.random.SeedSequence(entropy=int(seed), spawn_key=(stream, int(index))).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


@dataclass(frozen=True)
class BankPlan:
    """Everything that determines a bank's contents (and its metadata); see `build_bank` for the meaning."""

    shape: tuple[int, ...]
    sigma_min: float
    sigma_max: float
    n_trajectories: int = 256
    grid_size: int = 128
    select_fraction: float = 0.25
    test_fraction: float = 0.25
    substeps: int = 2
    probes: int = 2
    gain_substeps: int = 1
    seed: int = 0
    dtype: str = "float64"
    project_dim: int | None = None
    store_float16: bool = False
    keep_states: bool = True
    n_conditions: int = 0
    model_id: str = "unknown"
    family: str = "edm"
    """The model's family: trajectories start from its own prior (`schedules.prior_scale`)."""

    def __post_init__(self) -> None:
        check_range(1, self.sigma_min, self.sigma_max)
        prior_scale(self.family, self.sigma_max)  # refuses an unknown family
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if self.n_trajectories < 3:
            raise ValueError(
                f"n_trajectories must be >= 3 (a fit, a select and a test part), got {self.n_trajectories}")
        for name in ("select_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {value}")
        if self.select_fraction + self.test_fraction >= 1.0:
            raise ValueError("select_fraction + test_fraction must leave trajectories to fit on (sum < 1)")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"bank dtype must be float32 or float64, got {self.dtype!r}")
        for name in ("grid_size", "substeps", "probes", "gain_substeps"):
            if getattr(self, name) < (2 if name == "grid_size" else 1):
                raise ValueError(f"{name} must be >= {2 if name == 'grid_size' else 1}, got {getattr(self, name)}")
        if self.project_dim is not None and self.project_dim < 1:
            raise ValueError(f"project_dim must be >= 1, got {self.project_dim}")

    @property
    def dim(self) -> int:
        return int(np.prod(self.shape))

    @property
    def stored_dim(self) -> int:
        """r: the width of `denoised` (the projection's, when one is used)."""
        return self.dim if self.project_dim is None or self.project_dim >= self.dim else int(self.project_dim)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def grid(self) -> Tensor:
        return log_grid(self.sigma_min, self.sigma_max, self.grid_size)

    def split_sizes(self) -> dict[str, int]:
        k = self.n_trajectories
        n_select = max(1, round(self.select_fraction * k))
        n_test = max(1, round(self.test_fraction * k))
        return {"fit": k - n_select - n_test, "select": n_select, "test": n_test}

    def split(self) -> Tensor:
        """[K] int8 set codes: a seeded permutation, the first `test` of it test, the next `select` select."""
        sizes = self.split_sizes()
        perm = torch.randperm(self.n_trajectories, generator=_generator(self.seed, _STREAM_SPLIT))
        codes = torch.zeros(self.n_trajectories, dtype=torch.int8)
        codes[perm[: sizes["test"]]] = SPLIT_NAMES.index("test")
        codes[perm[sizes["test"] : sizes["test"] + sizes["select"]]] = SPLIT_NAMES.index("select")
        return codes

    def cond(self) -> Tensor | None:
        """[K] condition indices, spread evenly (k mod C), or None for an unconditional model."""
        if self.n_conditions <= 0:
            return None
        return torch.arange(self.n_trajectories) % self.n_conditions

    def x_start(self, lo: int, hi: int) -> Tensor:
        """Start states of trajectories lo..hi-1: the family's prior at sigma_max (`prior_scale` times float64
        normal draws), cast to the bank dtype."""
        # Filled row by row (not stacked from a list of float64 rows): K x d float64 is never all in memory.
        out = torch.empty((hi - lo, *self.shape), dtype=self.torch_dtype)
        scale = prior_scale(self.family, self.sigma_max)
        for i, k in enumerate(range(lo, hi)):
            row = torch.randn(self.shape, generator=_generator(self.seed, _STREAM_START, k), dtype=torch.float64)
            out[i] = row * scale
        return out

    def probes_for(self, lo: int, hi: int) -> Tensor:
        """[(hi - lo) * probes, *shape] random covectors, trajectory-major (probes of one trajectory adjacent)."""
        rows = [
            torch.randn((self.probes, *self.shape), generator=_generator(self.seed, _STREAM_PROBE, k),
                        dtype=torch.float64)
            for k in range(lo, hi)
        ]
        return torch.cat(rows).to(self.torch_dtype)

    def projection(self) -> Tensor | None:
        """The fixed Johnson-Lindenstrauss matrix [d, r] (entries N(0, 1/r)), or None when r = d."""
        if self.stored_dim == self.dim:
            return None
        g = _generator(self.seed, _STREAM_PROJECTION)
        p = torch.randn(self.dim, self.stored_dim, generator=g, dtype=torch.float32)
        return p / math.sqrt(self.stored_dim)

    def meta(self) -> dict[str, object]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d.pop("keep_states")
        d["split_sizes"] = self.split_sizes()
        return d


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


def plan_for(denoiser: Denoiser, *, shape: tuple[int, ...], dtype: torch.dtype | str = torch.float64,
             keep_states: bool | None = None, **settings: Any) -> BankPlan:
    """The `BankPlan` that `build_bank(denoiser, shape=..., **settings)` solves (the sharded build takes it too).

    `keep_states=None` keeps the states when they fit in 256 MiB; a conditional model's conditions are counted.
    """
    dtype_name = str(dtype).removeprefix("torch.")
    numel = int(np.prod(shape))
    item = 4 if dtype_name == "float32" else 8
    k, m = settings.get("n_trajectories", 256), settings.get("grid_size", 128)
    keep = k * m * numel * item <= _STATES_IN_MEMORY_BYTES if keep_states is None else keep_states
    n_cond = len(denoiser.conditions) if is_conditional(denoiser) else 0  # type: ignore[attr-defined]
    settings.setdefault("family", family_of(denoiser))
    return BankPlan(shape=tuple(shape), dtype=dtype_name, keep_states=keep, n_conditions=n_cond, **settings)


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
