"""Sampling schedules: a small immutable `Schedule` value and the heuristic families it is compared against.

A schedule is `sigma_max = sigma_N > ... > sigma_1 > sigma_0 = sigma_min` (docs/design.md section 1), stored as a
descending float64 array of `nfe + 1` values; a first-order solver spends one network evaluation per interval.
Samplers run it with sigma_min replaced by 0 (`fewstep_search.solvers.sampling_sigmas`), so exactly `nfe` calls.

Every optimizer moves one shared parameterization, the softmax-logit form in log sigma
(`sigmas_from_logits` / `logits_from_sigmas`): N logits -> N positive log-sigma decrements that sum to
`log(sigma_max / sigma_min)`, so any logits give a valid schedule with exact endpoints.

Example:
    >>> from fewstep_search.schedules import karras
    >>> s = karras(4, sigma_min=0.002, sigma_max=80.0)
    >>> s.nfe, round(float(s.sigmas[0]), 3), round(float(s.sigmas[-1]), 3)
    (4, 80.0, 0.002)
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fewstep_search.noise import ContinuousVP, DiscreteVP, cosine_alpha_bar

__all__ = [
    "Schedule",
    "MODEL_FAMILIES",
    "prior_scale",
    "karras",
    "log_uniform",
    "polyexponential",
    "vp_time_uniform",
    "vp_time_quadratic",
    "cosine",
    "flow_uniform",
    "flow_shift3",
    "SCHEDULE_FAMILIES",
    "BEST_START",
    "DEFAULT_HEURISTICS",
    "make_schedule",
    "sigmas_from_logits",
    "logits_from_sigmas",
    "check_range",
]


def check_range(nfe: int, sigma_min: float, sigma_max: float) -> None:
    """Validate a budget and a noise range with messages a user can act on."""
    if isinstance(nfe, bool) or not isinstance(nfe, (int, np.integer)):
        raise ValueError(f"nfe must be an integer, got {nfe!r}")
    if nfe < 1:
        raise ValueError(f"nfe (the number of network evaluations) must be >= 1, got {nfe}")
    if not (math.isfinite(sigma_min) and math.isfinite(sigma_max)):
        raise ValueError(f"sigma_min and sigma_max must be finite, got {sigma_min}, {sigma_max}")
    if sigma_min <= 0:
        raise ValueError(f"sigma_min must be > 0, got {sigma_min}")
    if sigma_min >= sigma_max:
        raise ValueError(f"sigma_min must be < sigma_max, got sigma_min={sigma_min} >= sigma_max={sigma_max}")


MODEL_FAMILIES = ("edm", "vp", "flow")
"""The coordinates a model's sampler works in: EDM sigma, a VP (DDPM) model's timesteps, a flow model's t."""


def prior_scale(family: str, sigma_max: float) -> float:
    """The start of a solve is `prior_scale * noise`, noise ~ N(0, I): the prior a sampler of `family` draws, in
    the EDM coordinates (x = x0 + sigma eps) every solve here works in.

    edm: `sigma_max`; vp: a DDPM pipeline starts from x_T = noise, and x = x_T / alpha_T, so `sqrt(1 + sigma_max^2)`;
    flow: a flow pipeline starts from x_t = noise at t_max, and x = x_t / (1 - t), so `1 + sigma_max`. Why not
    sigma_max everywhere: the exported scheduler must give the tool's samples from the pipeline's own noise, and
    the bank's trajectories must start where the pipeline starts (the two differ by a factor 1 + 1/sigma_max for
    flow models, 0.1% at T = 1000).
    """
    if family not in MODEL_FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(MODEL_FAMILIES)}")
    if family == "vp":
        return math.sqrt(1.0 + sigma_max**2)
    if family == "flow":
        return 1.0 + sigma_max
    return float(sigma_max)


@dataclass(frozen=True, eq=False)
class Schedule:
    """Descending float64 noise levels visited by a sampler: first sigma_max, last sigma_min (both > 0).

    A result is the sigmas together with the solver they were searched (and trained) for and the family of the
    model, so the schedule carries both: `solver` (a `fewstep_search.solvers.SOLVERS` name) and `family`
    (`MODEL_FAMILIES`). Equality and hashing look at the sigmas only. Immutable: the array is copied and made
    read-only, so a schedule can be shared and hashed by value.
    """

    sigmas: np.ndarray
    name: str = field(default="custom", compare=False)
    solver: str = field(default="ddim", compare=False)
    family: str = field(default="edm", compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.solver, str) or not self.solver:
            raise ValueError(f"a schedule's solver must be a solver name, got {self.solver!r}")
        if self.family not in MODEL_FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; expected one of {', '.join(MODEL_FAMILIES)}")
        arr = np.array(self.sigmas, dtype=np.float64, copy=True).reshape(-1)
        if arr.size < 2:
            raise ValueError(f"a schedule needs at least 2 sigmas, got {arr.size}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"schedule sigmas must be finite, got {arr.tolist()}")
        if np.any(arr <= 0):
            raise ValueError(f"schedule sigmas must be positive (append 0 only on export), got {arr.tolist()}")
        bad = np.nonzero(np.diff(arr) >= 0)[0]
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                "schedule sigmas must be strictly decreasing; "
                f"sigmas[{i}]={arr[i]:.6g} <= sigmas[{i + 1}]={arr[i + 1]:.6g}"
            )
        arr.setflags(write=False)
        object.__setattr__(self, "sigmas", arr)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schedule) and bool(np.array_equal(self.sigmas, other.sigmas))

    def __hash__(self) -> int:
        return hash(self.sigmas.tobytes())

    @property
    def nfe(self) -> int:
        """Network evaluations for a first-order solver: the number of intervals."""
        return int(self.sigmas.size - 1)

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[-1])

    def tensor(self, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float64) -> Tensor:
        """The sigmas as a descending 1-D tensor (what solvers take), on the CPU unless `device` says."""
        return torch.tensor(self.sigmas, dtype=dtype, device="cpu" if device is None else device)

    def with_final_zero(self) -> np.ndarray:
        """Deprecated: appends a 0, which costs `nfe + 1` calls; use `fewstep_search.export.export_sigmas`.

        Kept (unchanged, with a DeprecationWarning) only so existing callers do not silently get another
        schedule; `export_sigmas` replaces sigma_min by 0 instead, spending exactly the budget.
        """
        import warnings

        warnings.warn(
            "Schedule.with_final_zero() appends a 0 and costs nfe + 1 model calls; use "
            "fewstep_search.export.export_sigmas(schedule), which replaces sigma_min by 0 (exactly nfe calls)",
            DeprecationWarning,
            stacklevel=2,
        )
        return np.append(self.sigmas, 0.0)

    def log_sigmas(self) -> np.ndarray:
        return np.log(self.sigmas)

    def lambdas(self) -> np.ndarray:
        """Half log-SNR `lambda = -log sigma` at every node (ascending)."""
        return -np.log(self.sigmas)

    def vp_timesteps(self, vp: ContinuousVP | DiscreteVP) -> np.ndarray:
        """The VP times (continuous t in [0, 1], or fractional discrete timesteps) of every node."""
        return np.asarray(vp.t(self.sigmas), dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "nfe": self.nfe, "sigmas": [float(s) for s in self.sigmas],
                "solver": self.solver, "family": self.family}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Schedule:
        """The inverse of `to_dict`; a JSON object without `solver` / `family` (an older run) means DDIM, EDM."""
        if not isinstance(data, dict) or "sigmas" not in data:
            raise ValueError("a schedule JSON object needs a 'sigmas' list")
        sched = cls(np.asarray(data["sigmas"], dtype=np.float64), name=str(data.get("name", "custom")),
                    solver=str(data.get("solver", "ddim")), family=str(data.get("family", "edm")))
        if "nfe" in data and int(data["nfe"]) != sched.nfe:
            raise ValueError(f"schedule JSON says nfe={data['nfe']} but has {sched.nfe + 1} sigmas")
        return sched

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __repr__(self) -> str:
        vals = ", ".join(f"{s:.4g}" for s in self.sigmas)
        return f"Schedule({self.name}, nfe={self.nfe}, solver={self.solver}, family={self.family}, sigmas=[{vals}])"


# ---------------------------------------------------------------- families


def karras(nfe: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Schedule:
    """EDM schedule (Karras et al. 2022, eq. 5): uniform in sigma^(1/rho)."""
    check_range(nfe, sigma_min, sigma_max)
    ramp = np.linspace(0.0, 1.0, nfe + 1)
    a, b = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    s = (a + ramp * (b - a)) ** rho
    s[0], s[-1] = sigma_max, sigma_min
    return Schedule(s, name=f"edm_rho{rho:g}")


def log_uniform(nfe: int, sigma_min: float, sigma_max: float) -> Schedule:
    """Uniform in log sigma, i.e. uniform in logSNR (the DPM-Solver default)."""
    check_range(nfe, sigma_min, sigma_max)
    s = np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), nfe + 1))
    s[0], s[-1] = sigma_max, sigma_min
    return Schedule(s, name="log_uniform")


def polyexponential(nfe: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> Schedule:
    """k-diffusion's polyexponential: log sigma interpolated along a ramp^rho (rho=1 is log-uniform)."""
    check_range(nfe, sigma_min, sigma_max)
    ramp = np.linspace(1.0, 0.0, nfe + 1) ** rho
    s = np.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min))
    s[0], s[-1] = sigma_max, sigma_min
    return Schedule(s, name=f"polyexp_rho{rho:g}")


def _vp_schedule(
    nfe: int, sigma_min: float, sigma_max: float, vp: ContinuousVP | DiscreteVP | None, power: float, name: str
) -> Schedule:
    check_range(nfe, sigma_min, sigma_max)
    vp = vp if vp is not None else ContinuousVP()
    t_hi, t_lo = float(vp.t(sigma_max)), float(vp.t(sigma_min))
    ramp = np.linspace(1.0, 0.0, nfe + 1)
    # Spacing uniform in t^(1/power) between the endpoint times (power=1: time-uniform, 2: time-quadratic).
    t = (t_lo ** (1 / power) + ramp * (t_hi ** (1 / power) - t_lo ** (1 / power))) ** power
    s = np.asarray(vp.sigma(t), dtype=np.float64)
    s[0], s[-1] = sigma_max, sigma_min
    return Schedule(s, name=name)


def vp_time_uniform(
    nfe: int, sigma_min: float, sigma_max: float, vp: ContinuousVP | DiscreteVP | None = None
) -> Schedule:
    """Uniform in VP time t (DDPM/DDIM 'linear' spacing); continuous VP-SDE by default, or a DDPM table."""
    return _vp_schedule(nfe, sigma_min, sigma_max, vp, 1.0, "vp_time_uniform")


def vp_time_quadratic(
    nfe: int, sigma_min: float, sigma_max: float, vp: ContinuousVP | DiscreteVP | None = None
) -> Schedule:
    """Uniform in sqrt(t) (DDIM's 'quadratic' time spacing, Song et al. 2021)."""
    return _vp_schedule(nfe, sigma_min, sigma_max, vp, 2.0, "vp_time_quadratic")


def cosine(nfe: int, sigma_min: float, sigma_max: float, s: float = 0.008) -> Schedule:
    """Time-uniform steps of the iDDPM cosine noise schedule (Nichol & Dhariwal 2021), continuous in t."""
    check_range(nfe, sigma_min, sigma_max)
    f0 = float(cosine_alpha_bar(0.0, s))

    def t_of(sig: float) -> float:
        ab = f0 / (1.0 + sig**2)  # alpha_bar(t) = f(t)/f(0) = 1/(1+sigma^2)
        return float(np.arccos(np.sqrt(ab)) * 2 / math.pi * (1 + s) - s)

    t = np.linspace(t_of(sigma_max), t_of(sigma_min), nfe + 1)
    sig = np.sqrt(f0 / cosine_alpha_bar(t, s) - 1.0)
    sig[0], sig[-1] = sigma_max, sigma_min
    return Schedule(sig, name="cosine")


def flow_uniform(nfe: int, sigma_min: float, sigma_max: float, shift: float = 1.0) -> Schedule:
    """What a flow-matching sampler runs by default: uniform in flow time t = sigma / (1 + sigma), then shifted.

    `FlowMatchEulerDiscreteScheduler(shift=s)` spaces t uniformly and applies `s t / (1 + (s - 1) t)`, which is
    `sigma -> s sigma`; so the unshifted times run between the endpoints divided by s (docs/flow.md).
    """
    check_range(nfe, sigma_min, sigma_max)
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a positive number, got {shift}")
    lo, hi = sigma_min / shift, sigma_max / shift
    t = np.linspace(hi / (1 + hi), lo / (1 + lo), nfe + 1)
    sig = shift * t / (1 - t)
    sig[0], sig[-1] = sigma_max, sigma_min
    return Schedule(sig, name="flow_uniform" if shift == 1.0 else f"flow_shift{shift:g}")


def flow_shift3(nfe: int, sigma_min: float, sigma_max: float) -> Schedule:
    """The flow default with shift 3 (SD3's default scheduler setting)."""
    return flow_uniform(nfe, sigma_min, sigma_max, shift=3.0)


BEST_START = "best"
"""Not a family: the start of a costly search trial that means the schedule of the best finished cheap trial
(lowest select E) of the same solver (the DP optima, the bound trials, the one-shot peers, the heuristics)."""

SCHEDULE_FAMILIES: dict[str, Callable[..., Schedule]] = {
    "edm": karras,
    "log_uniform": log_uniform,
    "polyexponential": polyexponential,
    "vp_time_uniform": vp_time_uniform,
    "vp_time_quadratic": vp_time_quadratic,
    "cosine": cosine,
    "flow_uniform": flow_uniform,
    "flow_shift3": flow_shift3,
}


DEFAULT_HEURISTICS: tuple[str, ...] = ("edm", "log_uniform", "vp_time_uniform", "vp_time_quadratic")
"""The hand-made schedules every search scores as baselines (the reference all ratios are taken against)."""


def make_schedule(family: str, nfe: int, sigma_min: float, sigma_max: float, **options: Any) -> Schedule:
    """Build a heuristic schedule by family name (see `SCHEDULE_FAMILIES`)."""
    try:
        fn = SCHEDULE_FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown schedule family {family!r}; known: {', '.join(SCHEDULE_FAMILIES)}") from None
    return fn(nfe, sigma_min, sigma_max, **options)


# ---------------------------------------------------------------- the shared parameterization


MIN_STEP_SHARE = 1e-6
"""The least share of the log-sigma span a logits schedule gives one step: on the default span (80 -> 0.002)
neighbouring sigmas then differ by at least 1e-5 relative, far above float32's resolution (1.2e-7)."""


def sigmas_from_logits(logits: Tensor, sigma_min: float, sigma_max: float) -> Tensor:
    """Differentiable map from N logits to N+1 descending sigmas with exact endpoints.

    `log sigma_i = log sigma_max - log(sigma_max/sigma_min) * cumsum(w)_i` with the step shares
    `w = MIN_STEP_SHARE + (1 - N MIN_STEP_SHARE) softmax(logits)`, so every real vector is a valid schedule (no
    constraints for the optimizer) and the map is smooth. Why the floor: with a bare softmax an extreme logit
    (an L-BFGS-B line search tries them) shrinks a step below the resolution of float32, two sigmas collide when
    the bank's solve casts them, and the trial failed with "sigmas must be strictly decreasing" after finding its
    best point (tests/test_schedules.py).
    """
    n = logits.shape[-1]
    span = math.log(sigma_max / sigma_min)
    share = MIN_STEP_SHARE + (1.0 - n * MIN_STEP_SHARE) * torch.softmax(logits, dim=-1)
    frac = torch.cumsum(share, dim=-1)
    zero = torch.zeros_like(frac[..., :1])
    log_s = math.log(sigma_max) - span * torch.cat([zero, frac], dim=-1)
    s = torch.exp(log_s)
    # Pin the endpoints exactly (cumsum of the shares is 1 only up to rounding).
    s = torch.cat([s[..., :1] * 0 + sigma_max, s[..., 1:-1], s[..., -1:] * 0 + sigma_min], dim=-1)
    return s


def logits_from_sigmas(sigmas: Sequence[float] | np.ndarray | Schedule) -> Tensor:
    """Inverse of `sigmas_from_logits` (up to an additive constant): logits = log of the log-sigma decrements
    (their shares of the span, less the floor)."""
    arr = sigmas.sigmas if isinstance(sigmas, Schedule) else np.asarray(sigmas, dtype=np.float64)
    dec = -np.diff(np.log(arr))
    if np.any(dec <= 0):
        raise ValueError("sigmas must be strictly decreasing to convert to logits")
    # a step below the floor maps to the floor's schedule (the nearest the forward map can reach)
    soft = np.maximum(dec / dec.sum() - MIN_STEP_SHARE, 1e-300) / (1.0 - dec.size * MIN_STEP_SHARE)
    return torch.tensor(np.log(soft), dtype=torch.float64, device="cpu")
