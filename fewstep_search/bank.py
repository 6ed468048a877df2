"""The trajectory bank: K accurate reference trajectories of one model, cached on a log-sigma grid.

Contract (STYLE.md lesson 7). A `Bank` is immutable after construction and holds, for K trajectories started at
`x_N ~ N(0, sigma_max^2 I)` and solved accurately (RK4 in log sigma, `substeps` per grid cell) down an M-point grid
uniform in log sigma (`grid[0] = sigma_max > ... > grid[M-1] = sigma_min`):

* `x_start [K, *shape]` and `x_end [K, *shape]`: the start and the accurate end point x0* (the true-error target);
* `denoised [K, M, r]`: the model outputs D*(grid_j) on the trajectory, flattened; r = prod(shape), or fewer
  dims when stored as a fixed random (Johnson-Lindenstrauss) projection, which preserves the distances B_w needs;
  optionally float16;
* `phi [K, M]`: the RMS gain of the flow Jacobian from grid_j down to sigma_min (DESIGN.md: one backward
  vector-Jacobian sweep per random probe gives phi at every grid point at once); phi = 1 at sigma_min;
* `states [K, M, *shape]` (optional, small models): the trajectory states themselves;
* `fit_idx` / `heldout_idx`: a fixed split. Schedules are fitted on `fit` and scored on `heldout`, never both.

Why cached: every bound evaluation and every optimizer trial reuses the same trajectories, so the expensive
accurate solve happens once per model. On disk it is one safetensors file; the metadata (model id, grid, seeds,
shape, solver settings) is stored beside the tensors and checked on load, so a bank is never silently reused for
another model or range.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fewstep_search.models.base import CheckedDenoiser, Denoiser

__all__ = ["Bank", "BankMismatchError", "build_bank", "log_grid", "load_bank"]

BANK_FORMAT_VERSION = 1
_META_KEY = "fewstep_bank"
_TENSOR_FIELDS = ("grid", "x_start", "x_end", "denoised", "phi", "states", "fit_idx", "heldout_idx", "projection")


class BankMismatchError(ValueError):
    """A saved bank does not match the model, range or shape it is being loaded for."""


def log_grid(sigma_min: float, sigma_max: float, size: int) -> Tensor:
    """Descending float64 grid, uniform in log sigma, with exact endpoints."""
    if size < 2:
        raise ValueError(f"grid size must be >= 2, got {size}")
    g = torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), size, dtype=torch.float64))
    g[0], g[-1] = sigma_max, sigma_min
    return g


@dataclass(frozen=True)
class Bank:
    """Reference trajectories on a log-sigma grid (see the module docstring for the contract)."""

    grid: Tensor
    x_start: Tensor
    x_end: Tensor
    denoised: Tensor
    phi: Tensor
    fit_idx: Tensor
    heldout_idx: Tensor
    states: Tensor | None = None
    projection: Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_trajectories(self) -> int:
        return int(self.x_start.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x_start.shape[1:])

    @property
    def sigma_min(self) -> float:
        return float(self.grid[-1])

    @property
    def sigma_max(self) -> float:
        return float(self.grid[0])

    def subset(self, idx: Tensor) -> Bank:
        """A bank restricted to trajectories `idx` (its own fit/held-out indices are then all of them)."""
        idx = idx.long()
        k = idx.numel()
        all_idx = torch.arange(k)
        return Bank(
            grid=self.grid,
            x_start=self.x_start[idx],
            x_end=self.x_end[idx],
            denoised=self.denoised[idx],
            phi=self.phi[idx],
            fit_idx=all_idx,
            heldout_idx=all_idx,
            states=None if self.states is None else self.states[idx],
            projection=self.projection,
            meta=dict(self.meta),
        )

    def fit(self) -> Bank:
        """The trajectories schedules are optimized on."""
        return self.subset(self.fit_idx)

    def heldout(self) -> Bank:
        """The trajectories schedules are scored on."""
        return self.subset(self.heldout_idx)

    # ------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (temp file + rename) to a safetensors file; returns the path."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            name: getattr(self, name).contiguous()
            for name in _TENSOR_FIELDS
            if getattr(self, name) is not None
        }
        meta = {_META_KEY: json.dumps({**self.meta, "format_version": BANK_FORMAT_VERSION})}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path


def load_bank(path: str | os.PathLike[str], *, expect: dict[str, Any] | None = None) -> Bank:
    """Load a bank saved by `Bank.save`; `expect` (e.g. model_id, sigma_min, sigma_max, shape) must match its metadata.

    Raises `FileNotFoundError`, `ValueError` (not a bank file) or `BankMismatchError` with a one-line reason.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"bank file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw_meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise ValueError(f"bank file {path} could not be read as safetensors: {exc}") from None
    if _META_KEY not in raw_meta:
        raise ValueError(f"{path} is a safetensors file but not a fewstep-search bank (no '{_META_KEY}' metadata)")
    meta = json.loads(raw_meta[_META_KEY])
    if meta.get("format_version") != BANK_FORMAT_VERSION:
        raise BankMismatchError(f"bank {path} has format {meta.get('format_version')}, expected {BANK_FORMAT_VERSION}")
    for key, want in (expect or {}).items():
        have = meta.get(key)
        same = (
            math.isclose(float(have), float(want), rel_tol=1e-9)
            if isinstance(want, float) and have is not None
            else (list(have) if isinstance(have, (list, tuple)) else have)
            == (list(want) if isinstance(want, (list, tuple)) else want)
        )
        if not same:
            raise BankMismatchError(f"bank {path} was built for {key}={have!r}, but {key}={want!r} was requested")
    missing = [k for k in ("grid", "x_start", "x_end", "denoised", "phi", "fit_idx", "heldout_idx") if k not in tensors]
    if missing:
        raise ValueError(f"bank file {path} lacks tensors {missing}")
    return Bank(
        **{k: tensors.get(k) for k in _TENSOR_FIELDS if k in tensors or k in ("states", "projection")},
        meta=meta,
    )


# ---------------------------------------------------------------- construction


def _rk4_step(denoiser: Denoiser, x: Tensor, s0: Tensor, s1: Tensor, substeps: int, d0: Tensor | None) -> Tensor:
    """RK4 in t = log sigma from s0 to s1 (`dx/dt = x - D(x, e^t)`); `d0`, if given, is D(x, s0) already known."""
    t0, t1 = torch.log(s0), torch.log(s1)
    h = (t1 - t0) / substeps
    hx = float(h)
    batch = x.shape[0]

    def f(xv: Tensor, t: Tensor) -> Tensor:
        return xv - denoiser(xv, torch.exp(t).to(xv.dtype).expand(batch))

    for j in range(substeps):
        t = t0 + j * h
        k1 = x - d0 if (j == 0 and d0 is not None) else f(x, t)
        k2 = f(x + 0.5 * hx * k1, t + 0.5 * h)
        k3 = f(x + 0.5 * hx * k2, t + 0.5 * h)
        k4 = f(x + hx * k3, t + h)
        x = x + hx / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def _solve_on_grid(
    denoiser: Denoiser, x: Tensor, grid: Tensor, substeps: int, keep_states: bool, tick: Callable[[], None]
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Accurate solve along the grid; returns (x_end, denoised [B, M, d], states [B, M, *shape] or None)."""
    m = grid.numel()
    batch = x.shape[0]
    outs, states = [], []
    for j in range(m):
        s = grid[j]
        d = denoiser(x, s.to(x.dtype).expand(batch))
        outs.append(d.reshape(batch, -1))
        if keep_states:
            states.append(x)
        if j < m - 1:
            x = _rk4_step(denoiser, x, s, grid[j + 1], substeps, d)
        tick()
    return x, torch.stack(outs, 1), (torch.stack(states, 1) if keep_states else None)


def _gains(
    denoiser: Denoiser,
    states: Tensor,
    grid: Tensor,
    *,
    probes: int,
    substeps: int,
    generator: torch.Generator,
    tick: Callable[[], None],
) -> Tensor:
    """phi[k, j]: RMS gain of the flow Jacobian from grid_j to sigma_min, by one backward VJP sweep per probe."""
    k, m = states.shape[0], states.shape[1]
    shape = states.shape[2:]
    v = torch.randn((probes * k, *shape), dtype=states.dtype, generator=generator)
    v0 = v.flatten(1).pow(2).sum(1).reshape(probes, k).sum(0)
    phi2 = torch.empty(k, m, dtype=torch.float64)
    phi2[:, -1] = 1.0
    for j in range(m - 2, -1, -1):
        with torch.enable_grad():
            xj = states[:, j].repeat(probes, *([1] * len(shape))).detach().requires_grad_(True)
            y = _rk4_step(denoiser, xj, grid[j], grid[j + 1], substeps, None)
            (v,) = torch.autograd.grad(y, xj, grad_outputs=v)
        v = v.detach()
        phi2[:, j] = (v.flatten(1).pow(2).sum(1).reshape(probes, k).sum(0) / v0).double()
        tick()
    return phi2.sqrt()


def build_bank(
    denoiser: Denoiser,
    *,
    shape: tuple[int, ...],
    sigma_min: float,
    sigma_max: float,
    n_trajectories: int = 256,
    grid_size: int = 128,
    heldout_fraction: float = 0.5,
    substeps: int = 2,
    probes: int = 2,
    gain_substeps: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
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
        n_trajectories: K; split into fit / held-out by `heldout_fraction` (seeded).
        grid_size: M, the points of the log-sigma grid (the DP's resolution).
        substeps: RK4 sub-steps per grid cell for the reference solve (M=128, 2 sub-steps: ~1e-7 relative).
        probes: random covectors per trajectory for the gain phi; `gain_substeps` RK4 sub-steps in its VJPs.
        batch_size: trajectories per chunk (memory); all at once by default.
        keep_states: store the trajectory states (default: when prod(shape) <= 4096).
        store_float16 / project_dim: compress `denoised` for big models (B_w needs only distances).
        model_id: recorded in the metadata and checked when the bank is loaded again.
    """
    from fewstep_search.schedules import check_range

    check_range(1, sigma_min, sigma_max)
    if n_trajectories < 2:
        raise ValueError(f"n_trajectories must be >= 2 (a fit and a held-out part), got {n_trajectories}")
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    den = denoiser if isinstance(denoiser, CheckedDenoiser) else CheckedDenoiser(denoiser)
    numel = int(np.prod(shape))
    keep = numel <= 4096 if keep_states is None else keep_states
    grid = log_grid(sigma_min, sigma_max, grid_size)
    gen = torch.Generator().manual_seed(seed)
    x_start = (torch.randn((n_trajectories, *shape), generator=gen, dtype=torch.float64) * sigma_max).to(dtype)
    chunk = batch_size or n_trajectories
    total_ticks = (2 * grid_size - 1) * math.ceil(n_trajectories / chunk)

    from fewstep_search.progress import task_progress

    ends, outs, sts, phis = [], [], [], []
    with task_progress("building reference bank", total=total_ticks, enabled=progress) as tick:
        for lo in range(0, n_trajectories, chunk):
            xs = x_start[lo : lo + chunk].to(device)
            with torch.no_grad():
                x_end, d, st_run = _solve_on_grid(den, xs, grid.to(device), substeps, True, tick)
            phis.append(
                _gains(den, st_run, grid.to(device), probes=probes, substeps=gain_substeps, generator=gen, tick=tick)
                .cpu()
            )
            ends.append(x_end.cpu())
            outs.append(d.cpu())
            if keep:
                sts.append(st_run.cpu())

    denoised = torch.cat(outs)
    projection = None
    if project_dim is not None and project_dim < denoised.shape[-1]:
        pg = torch.Generator().manual_seed(seed + 7919)
        projection = torch.randn(denoised.shape[-1], project_dim, generator=pg, dtype=denoised.dtype)
        projection /= math.sqrt(project_dim)
        denoised = denoised @ projection
    if store_float16:
        denoised = denoised.half()
    perm = torch.randperm(n_trajectories, generator=gen)
    n_held = max(1, min(n_trajectories - 1, round(heldout_fraction * n_trajectories)))
    meta = {
        "model_id": model_id,
        "sigma_min": float(sigma_min),
        "sigma_max": float(sigma_max),
        "shape": list(shape),
        "grid_size": grid_size,
        "n_trajectories": n_trajectories,
        "seed": seed,
        "dtype": str(dtype).removeprefix("torch."),
        "substeps": substeps,
        "probes": probes,
        "gain_substeps": gain_substeps,
        "heldout_fraction": heldout_fraction,
        "store_float16": store_float16,
        "project_dim": project_dim,
    }
    return Bank(
        grid=grid,
        x_start=x_start,
        x_end=torch.cat(ends),
        denoised=denoised,
        phi=torch.cat(phis),
        fit_idx=perm[n_held:].sort().values,
        heldout_idx=perm[:n_held].sort().values,
        states=torch.cat(sts) if keep else None,
        projection=projection,
        meta=meta,
    )
