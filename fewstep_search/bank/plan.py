"""A `BankPlan`: everything that determines a bank's contents, and the per-trajectory seeded draws it makes.

Determinism: every random draw is per trajectory, from a generator seeded by (seed, stream, trajectory index):
the start noise, the gain probes, and (per bank) the split and the projection. So a bank does not depend on the
chunk size, the number of probes does not move the split, and shards built by separate workers assemble into the
same bank as a single-process build.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fewstep_search.bank.container import SPLIT_NAMES
from fewstep_search.denoiser import Denoiser, advertised, family_of, is_conditional
from fewstep_search.schedules import check_range, prior_scale

__all__ = ["BankPlan", "log_grid", "plan_for"]

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


def _split_sizes(k: int, select_fraction: float, test_fraction: float) -> dict[str, int]:
    n_select = max(1, round(select_fraction * k))
    n_test = max(1, round(test_fraction * k))
    return {"fit": k - n_select - n_test, "select": n_select, "test": n_test}


def _seeded_split(k: int, select_fraction: float, test_fraction: float, seed: int) -> Tensor:
    """[k] int8 set codes: a seeded permutation, the first `test` of it test, the next `select` select."""
    sizes = _split_sizes(k, select_fraction, test_fraction)
    perm = torch.randperm(k, generator=_generator(seed, _STREAM_SPLIT))
    codes = torch.zeros(k, dtype=torch.int8)
    codes[perm[: sizes["test"]]] = SPLIT_NAMES.index("test")
    codes[perm[sizes["test"] : sizes["test"] + sizes["select"]]] = SPLIT_NAMES.index("select")
    return codes


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
    split_conditions: bool = False
    """Split by condition, not by trajectory: every trajectory of a condition lies in that condition's set, so a
    prompt set's test prompts never inform a choice (text-to-image pipelines advertise it)."""

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
        if self.split_conditions and self.n_conditions < 3:
            raise ValueError(f"a prompt set is split into fit, select and test prompts: it needs at least 3 prompts, "
                             f"got {self.n_conditions}")

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
        if self.split_conditions:
            codes = self.split()
            return {name: int((codes == i).sum()) for i, name in enumerate(SPLIT_NAMES)}
        return _split_sizes(self.n_trajectories, self.select_fraction, self.test_fraction)

    def split(self) -> Tensor:
        """[K] int8 set codes: a seeded permutation, the first `test` of it test, the next `select` select (of
        the trajectories, or of the conditions with `split_conditions`)."""
        if self.split_conditions:
            return self.condition_split()[self.cond()]  # type: ignore[index]
        return _seeded_split(self.n_trajectories, self.select_fraction, self.test_fraction, self.seed)

    def condition_split(self) -> Tensor:
        """[C] int8 set codes of the conditions (`split_conditions`)."""
        return _seeded_split(self.n_conditions, self.select_fraction, self.test_fraction, self.seed)

    def decision_conditions(self) -> Tensor | None:
        """The conditions a decision may look at: all of them, or the fit and select ones with `split_conditions`."""
        if self.n_conditions <= 0:
            return None
        if not self.split_conditions:
            return torch.arange(self.n_conditions)
        return torch.nonzero(self.condition_split() != SPLIT_NAMES.index("test")).flatten()

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
    settings.setdefault("split_conditions", bool(advertised(denoiser, "split_conditions")))
    return BankPlan(shape=tuple(shape), dtype=dtype_name, keep_states=keep, n_conditions=n_cond, **settings)
