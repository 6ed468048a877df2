"""The `Bank` value and its on-disk format.

Contract. A `Bank` is immutable after construction and holds, for K trajectories started at
`x_N ~ N(0, sigma_max^2 I)` and solved accurately (RK4 in log sigma, `substeps` per grid cell) down an M-point grid
uniform in log sigma (`grid[0] = sigma_max > ... > grid[M-1] = sigma_min`):

* `x_start [K, *shape]` and `x_end [K, *shape]`: the start and the accurate end point x0* (the true-error target):
  the clean sample x*(0) = D(x*(sigma_min), sigma_min), i.e. the accurate solve down to sigma_min followed by the
  same last step into 0 that every sampler of the project takes (`fewstep_search.solvers.sampling_sigmas`);
* `denoised [K, M, r]`: the model outputs D*(grid_j) on the trajectory, flattened; r = prod(shape), or fewer
  dims when stored as a fixed random (Johnson-Lindenstrauss) projection (`projection [d, r]`), which preserves the
  distances B_w needs; optionally float16;
* `phi [K, M]`: the RMS gain of the flow Jacobian from grid_j down to sigma_min (one backward vector-Jacobian
  sweep per random probe gives phi at every grid point at once); phi = 1 at sigma_min;
* `split [K]`: 0 = fit (optimizers see it), 1 = select (the search picks its winner on it), 2 = test (reported,
  never used for a decision). Drawn from a generator of its own, so it does not move with probes or chunking;
* `cond [K]` (conditional models): the index of each trajectory's condition;
* `states [K, M, *shape]` (optional, small models): the trajectory states, which a student's grid outputs are
  recomputed at (Phase-2 rounds). What needs what: B_w and B_0 need `denoised` and `phi`; the true error E needs
  `x_start`, `x_end` (and `cond`); recomputing another model's `denoised` needs `states`.

Why cached: every bound evaluation and every optimizer trial reuses the same trajectories, so the expensive
accurate solve happens once per model. On disk it is one safetensors file written atomically; the metadata (model
id, grid, seeds, shape, solver settings, split sizes) is stored beside the tensors and checked on load, so a bank
is never silently reused for another model or range.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewstep_search.atomic import atomic_path

__all__ = ["Bank", "BankMismatchError", "SPLIT_NAMES", "load_bank", "BANK_FORMAT_VERSION"]

BANK_FORMAT_VERSION = 3
"""3: `x_end` is the clean end point x*(0) (2 stored x*(sigma_min), which no sampler into 0 can reach)."""
_META_KEY = "fewstep_bank"
SPLIT_NAMES = ("fit", "select", "test")
"""The three disjoint trajectory sets, in the order of their codes in `Bank.split`."""
_REQUIRED = ("grid", "x_start", "x_end", "denoised", "phi", "split")
_OPTIONAL = ("states", "projection", "cond")


class BankMismatchError(ValueError):
    """A saved bank does not match the model, range or shape it is being loaded for."""


@dataclass(frozen=True)
class Bank:
    """Reference trajectories on a log-sigma grid (see the module docstring for the contract)."""

    grid: Tensor
    x_start: Tensor
    x_end: Tensor
    denoised: Tensor
    phi: Tensor
    split: Tensor
    states: Tensor | None = None
    projection: Tensor | None = None
    cond: Tensor | None = None
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

    @property
    def device(self) -> torch.device:
        return self.x_start.device

    def indices(self, part: str) -> Tensor:
        """The trajectory indices of one set ("fit", "select" or "test")."""
        if part not in SPLIT_NAMES:
            raise ValueError(f"unknown trajectory set {part!r}; expected one of {', '.join(SPLIT_NAMES)}")
        return torch.nonzero(self.split == SPLIT_NAMES.index(part)).flatten()

    def sizes(self) -> dict[str, int]:
        """Trajectories per set, e.g. {"fit": 64, "select": 32, "test": 32}."""
        return {name: int((self.split == code).sum()) for code, name in enumerate(SPLIT_NAMES)}

    def subset(self, idx: Tensor) -> Bank:
        """The trajectories `idx` (each keeps its set label)."""
        idx = idx.long().to(self.x_start.device)

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[idx.to(t.device)]

        return dataclasses.replace(
            self,
            x_start=self.x_start[idx],
            x_end=self.x_end[idx],
            denoised=self.denoised[idx.to(self.denoised.device)],
            phi=self.phi[idx.to(self.phi.device)],
            split=self.split[idx.to(self.split.device)],
            states=pick(self.states),
            cond=pick(self.cond),
            meta=dict(self.meta),
        )

    def part(self, name: str) -> Bank:
        """One of the three sets as a bank of its own."""
        return self.subset(self.indices(name))

    def fit(self) -> Bank:
        """The trajectories optimizers see."""
        return self.part("fit")

    def select(self) -> Bank:
        """The trajectories the search picks its winner on."""
        return self.part("select")

    def test(self) -> Bank:
        """The trajectories results are reported on; no decision ever looks at them."""
        return self.part("test")

    def fit_conditions(self) -> tuple[int, ...]:
        """The condition indices of the fit trajectories (empty for an unconditional model): what Phase-2 may train
        on. A prompt set's bank is split by prompt, so its select and test prompts are not among them."""
        if self.cond is None:
            return ()
        return tuple(sorted(set(self.cond[self.indices("fit")].tolist())))

    def lean(self) -> Bank:
        """Without the trajectory states (what Phase-1 trials need: half the bytes or less)."""
        return dataclasses.replace(self, states=None)

    def for_trials(self, *, max_state_bytes: int = 64 * 2**20) -> Bank:
        """What Phase-1 trials get: the states kept while small (GITS reads them instead of re-solving the
        teacher), dropped above `max_state_bytes` (they would dominate what is shipped to every worker)."""
        if self.states is None or self.states.numel() * self.states.element_size() <= max_state_bytes:
            return self
        return self.lean()

    def to(self, device: torch.device | str) -> Bank:
        """Every tensor on `device` (the GPU path moves the bank once, not per evaluation)."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return dataclasses.replace(self, **moved)

    def project(self, outputs: Tensor) -> Tensor:
        """Model outputs [..., d] flattened and projected like `denoised` (for a student's grid outputs)."""
        flat = outputs.reshape(*outputs.shape[: outputs.ndim - len(self.shape)], -1)
        if self.projection is not None:
            flat = flat.to(self.projection.dtype) @ self.projection.to(flat.device)
        return flat.to(self.denoised.dtype)

    def with_outputs(self, denoised: Tensor, *, model_id: str) -> Bank:
        """The same trajectories and gains with another model's outputs on the grid (a Phase-2 student)."""
        if denoised.shape != self.denoised.shape:
            raise ValueError(f"outputs have shape {tuple(denoised.shape)}, the bank {tuple(self.denoised.shape)}")
        return dataclasses.replace(self, denoised=denoised, meta={**self.meta, "outputs_of": model_id})

    # ------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically to a safetensors file; returns the path."""
        from safetensors.torch import save_file

        tensors = {
            name: getattr(self, name).detach().cpu().contiguous()
            for name in _REQUIRED + _OPTIONAL
            if getattr(self, name) is not None
        }
        meta = {_META_KEY: json.dumps({**self.meta, "format_version": BANK_FORMAT_VERSION})}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return Path(path)


def _same(have: Any, want: Any) -> bool:
    if isinstance(want, float) and isinstance(have, (int, float)):
        return math.isclose(float(have), want, rel_tol=1e-9)
    if isinstance(want, (list, tuple)) and isinstance(have, (list, tuple)):
        return list(have) == list(want)
    return bool(have == want)


def check_meta(meta: dict[str, Any], expect: dict[str, Any], *, source: str) -> None:
    """BankMismatchError naming the first key of `expect` whose value differs from the bank's."""
    for key, want in expect.items():
        have = meta.get(key)
        if not _same(have, want):
            raise BankMismatchError(f"bank {source} was built for {key}={have!r}, but {key}={want!r} was requested")


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
        raise BankMismatchError(
            f"bank {path} has format {meta.get('format_version')}, this version reads {BANK_FORMAT_VERSION}"
        )
    check_meta(meta, expect or {}, source=str(path))
    missing = [k for k in _REQUIRED if k not in tensors]
    if missing:
        raise ValueError(f"bank file {path} lacks tensors {missing}")
    return Bank(**{k: tensors.get(k) for k in _REQUIRED + _OPTIONAL}, meta=meta)
