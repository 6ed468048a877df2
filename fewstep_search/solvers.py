"""Probability-flow ODE solvers with one signature: `solve(denoiser, x, sigmas, *, callback=None) -> Tensor`.

ODE: `dx/dsigma = (x - D(x, sigma)) / sigma`. `sigmas` is a descending 1-D tensor; a solver returns the state at
the last sigma, and a last sigma of 0 makes the last step a plain denoiser call.

**The last step.** A schedule's nodes run from sigma_max down to sigma_min > 0, but the sampler that is scored,
trained and exported runs them with sigma_min replaced by 0 (`sampling_sigmas`): the last step lands on
`D(x_1, sigma_1)`, as k-diffusion's and diffusers' samplers end, and N steps cost exactly N model calls. `sample`
is that sampler; the true error, Phase-2's chains and every export go through `sampling_sigmas`, so the E a run
reports is the E of the sampler a user runs.

Arithmetic follows x's dtype; sigmas stay tensors, so every solver is differentiable with respect to the schedule
(the LD3-style true-error objective relies on that).

`callback`, when given, is called after every network evaluation with a dict `{"i", "x", "sigma", "denoised"}`
(the state the model saw, its sigma, and its output), the k-diffusion convention.

Solvers live in `SOLVERS` (name -> function); `get_solver(name)` looks one up with a clear error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from fewstep_search.denoiser import Denoiser
from fewstep_search.schedules import prior_scale

__all__ = [
    "FIRST_ORDER_SOLVERS",
    "Solver",
    "SOLVERS",
    "get_solver",
    "ddim",
    "heun",
    "dpmpp_2m",
    "reference",
    "rk4_interval",
    "substeps_for",
    "nfe_of",
    "sampling_sigmas",
    "sample",
]

Callback = Callable[[dict[str, Any]], None] | None


class Solver(Protocol):
    def __call__(self, denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, callback: Callback = None) -> Tensor: ...


def sampling_sigmas(sigmas: Tensor | Sequence[Any]) -> Any:
    """The nodes a sampler runs for a schedule: the same with the last (sigma_min) replaced by 0.

    A tensor stays a tensor (differentiable in the other nodes); a sequence (floats, or 0-dim tensors of a
    learned schedule) becomes a tuple. The one place the project's last-step convention is written.
    """
    if isinstance(sigmas, Tensor):
        return torch.cat([sigmas[:-1], sigmas.new_zeros(1)])
    return (*tuple(sigmas)[:-1], 0.0)


def _check_sigmas(sigmas: Tensor) -> None:
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D tensor with >= 2 values, got shape {tuple(sigmas.shape)}")
    if not bool(torch.all(sigmas[1:] < sigmas[:-1])):
        raise ValueError("sigmas must be strictly decreasing")
    if bool(torch.any(sigmas[:-1] <= 0)) or bool(sigmas[-1] < 0):
        raise ValueError("sigmas must be positive (only the last may be 0)")


def _denoise(denoiser: Denoiser, x: Tensor, sigma: Tensor, i: int, callback: Callback) -> Tensor:
    d = denoiser(x, sigma.to(x.dtype).expand(x.shape[0]))
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "denoised": d})
    return d


class Steps:
    """One pass of a one-call-per-step solver down `sigmas`, a step at a time: `steps(i, x, d)` is the state at
    `sigmas[i + 1]` from the state `x` at `sigmas[i]` and the model's output `d` there.

    Why step objects: the whole-solve functions below (`ddim`, `dpmpp_2m`, `ipndm`) and the diffusers scheduler
    of the exports (`fewstep_search.integrations.diffusers_scheduler`), which the pipeline calls once per step,
    take the same steps, so what is exported is what was scored. A multistep solver keeps its history in the
    instance: make a new one per pass. Call order: i = 0, 1, ..., N - 1.
    """

    def __init__(self, sigmas: Tensor) -> None:
        self.sigmas = sigmas

    def __call__(self, i: int, x: Tensor, d: Tensor) -> Tensor:
        raise NotImplementedError


class DDIMSteps(Steps):
    """First order (DDIM = Euler in sigma): `x_{i-1} = r x_i + (1 - r) D(x_i, sigma_i)`, `r = sigma_{i-1}/sigma_i`;
    into 0 (r = 0) the step lands on D."""

    def __call__(self, i: int, x: Tensor, d: Tensor) -> Tensor:
        r = (self.sigmas[i + 1] / self.sigmas[i]).to(x.dtype)
        return r * x + (1 - r) * d


def _solve_by_steps(make: type[Steps], denoiser: Denoiser, x: Tensor, sigmas: Tensor, callback: Callback) -> Tensor:
    _check_sigmas(sigmas)
    steps = make(sigmas)
    for i in range(sigmas.numel() - 1):
        x = steps(i, x, _denoise(denoiser, x, sigmas[i], i, callback))
    return x


def ddim(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, callback: Callback = None) -> Tensor:
    """First order (DDIM = Euler in sigma): `x_{i-1} = r x_i + (1 - r) D(x_i, sigma_i)`, `r = sigma_{i-1}/sigma_i`."""
    return _solve_by_steps(DDIMSteps, denoiser, x, sigmas, callback)


def heun(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, callback: Callback = None) -> Tensor:
    """Second order Heun (EDM Algorithm 1, deterministic); Euler on a final step into sigma = 0. 2 NFE per step."""
    _check_sigmas(sigmas)
    for i in range(sigmas.numel() - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        ds = (s_next - s).to(x.dtype)
        d = _denoise(denoiser, x, s, i, callback)
        slope = (x - d) / s.to(x.dtype)
        x_euler = x + ds * slope
        if float(s_next.detach()) == 0.0:
            x = x_euler
            continue
        d2 = _denoise(denoiser, x_euler, s_next, i, callback)
        slope2 = (x_euler - d2) / s_next.to(x.dtype)
        x = x + ds * 0.5 * (slope + slope2)
    return x


class DPMpp2MSteps(Steps):
    """DPM-Solver++(2M) (Lu et al. 2022), multistep second order in lambda = -log sigma; the first step is DDIM and
    a step into 0 lands on D."""

    def __init__(self, sigmas: Tensor) -> None:
        super().__init__(sigmas)
        self.old_d: Tensor | None = None
        self.h_last: Tensor | None = None

    def __call__(self, i: int, x: Tensor, d: Tensor) -> Tensor:
        s, s_next = self.sigmas[i], self.sigmas[i + 1]
        if float(s_next.detach()) == 0.0:
            return d
        h = torch.log(s) - torch.log(s_next)
        r_x = (s_next / s).to(x.dtype)  # = exp(-h)
        if self.old_d is None or self.h_last is None:
            d_eff = d
        else:
            ratio = (self.h_last / h).to(x.dtype)
            d_eff = (1 + 1 / (2 * ratio)) * d - (1 / (2 * ratio)) * self.old_d
        self.old_d, self.h_last = d, h
        return r_x * x + (1 - r_x) * d_eff


def dpmpp_2m(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, callback: Callback = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), multistep second order in lambda = -log sigma; first step is DDIM."""
    return _solve_by_steps(DPMpp2MSteps, denoiser, x, sigmas, callback)


def rk4_interval(
    denoiser: Denoiser,
    x: Tensor,
    s0: Tensor,
    s1: Tensor,
    *,
    substeps: int,
    d0: Tensor | None = None,
    callback: Callback = None,
    i: int = 0,
) -> Tensor:
    """Classical RK4 in t = log sigma (`dx/dt = x - D(x, e^t)`) from sigma `s0` down to `s1 > 0`.

    The one RK4 step of the project: the reference solver, the bank and Phase-2's teacher all call it.
    `d0`, when given, is `D(x, s0)` already computed (saves one evaluation). 4 * substeps evaluations
    (one fewer with d0). Differentiable in x (the bank's gain sweep backpropagates through it).
    """
    if substeps < 1:
        raise ValueError(f"substeps must be >= 1, got {substeps}")
    t0, t1 = torch.log(s0), torch.log(s1)
    h = (t1 - t0) / substeps
    hx = h.to(x.dtype)

    def f(xv: Tensor, log_s: Tensor) -> Tensor:
        return xv - _denoise(denoiser, xv, torch.exp(log_s), i, callback)

    for j in range(substeps):
        t = t0 + j * h
        k1 = x - d0 if (j == 0 and d0 is not None) else f(x, t)
        k2 = f(x + 0.5 * hx * k1, t + 0.5 * h)
        k3 = f(x + 0.5 * hx * k2, t + 0.5 * h)
        k4 = f(x + hx * k3, t + h)
        x = x + hx / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def substeps_for(s0: float, s1: float, max_log_step: float) -> int:
    """RK4 sub-steps that keep every sub-step within `max_log_step` in log sigma (at least 1).

    Why bounded: one RK4 step across a long interval is unstable on the ODE's linear part (80 -> 4,
    h = -3, multiplies by 1.375 instead of e^-3 = 0.05; docs/design.md), so accurate targets need short steps.
    """
    if max_log_step <= 0:
        raise ValueError(f"max_log_step must be > 0, got {max_log_step}")
    return max(1, math.ceil(abs(math.log(float(s0) / float(s1))) / max_log_step - 1e-9))


def reference(
    denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, callback: Callback = None, substeps: int = 8
) -> Tensor:
    """Accurate solve: classical RK4 in t = log sigma (`dx/dt = x - D(x, e^t)`) with `substeps` per interval.

    4 * substeps evaluations per interval; accuracy is checked by step halving in the tests (4th order).
    A final interval into sigma = 0 is a denoiser call (use a small positive sigma_min for an accurate end).
    """
    _check_sigmas(sigmas)
    if substeps < 1:
        raise ValueError(f"substeps must be >= 1, got {substeps}")
    for i in range(sigmas.numel() - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        if float(s_next.detach()) == 0.0:
            x = _denoise(denoiser, x, s, i, callback)
            break
        x = rk4_interval(denoiser, x, s, s_next, substeps=substeps, callback=callback, i=i)
    return x


SOLVERS: dict[str, Solver] = {"ddim": ddim, "euler": ddim, "heun": heun, "dpmpp_2m": dpmpp_2m, "reference": reference}
FIRST_ORDER_SOLVERS = ("ddim", "euler")
"""Solvers whose output is a convex combination of the model's outputs (Euler is DDIM in the EDM convention):
the only ones B_w and B_0 bound, and the ones the Phase-2 loss was first written for."""

_NFE_PER_STEP = {"ddim": 1, "euler": 1, "heun": 2, "dpmpp_2m": 1}


def get_solver(name: str) -> Solver:
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; known: {', '.join(SOLVERS)}") from None


def nfe_of(name: str, steps: int) -> int:
    """Network evaluations a solver spends on `steps` intervals (Heun's last step into 0 excluded)."""
    if name not in _NFE_PER_STEP:
        raise ValueError(f"no fixed NFE count for solver {name!r}")
    return _NFE_PER_STEP[name] * steps


# ---------------------------------------------------------------- iPNDM (appended; registered below)

_AB_COEFFS: tuple[tuple[float, ...], ...] = (
    (1.0,),
    (3 / 2, -1 / 2),
    (23 / 12, -16 / 12, 5 / 12),
    (55 / 24, -59 / 24, 37 / 24, -9 / 24),
)
"""Adams-Bashforth weights of orders 1-4 for equal steps, newest slope first (iPNDM's table)."""


class IPNDMSteps(Steps):
    """iPNDM's steps (see `ipndm`): Adams-Bashforth on eps with the equal-step table, history kept here."""

    def __init__(self, sigmas: Tensor) -> None:
        super().__init__(sigmas)
        self.history: list[Tensor] = []  # newest first

    def __call__(self, i: int, x: Tensor, d: Tensor) -> Tensor:
        s, s_next = self.sigmas[i], self.sigmas[i + 1]
        if float(s_next.detach()) == 0.0:
            return d
        self.history.insert(0, (x - d) / s.to(x.dtype))
        del self.history[len(_AB_COEFFS):]
        coeffs = _AB_COEFFS[len(self.history) - 1]
        slope = sum(c * e for c, e in zip(coeffs, self.history, strict=True))
        return x + (s_next - s).to(x.dtype) * slope


def ipndm(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, callback: Callback = None) -> Tensor:
    """iPNDM (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator", the improved
    PNDM): 4th-order Adams-Bashforth on the epsilon form `dx/dsigma = eps(x, sigma) = (x - D(x, sigma)) / sigma`
    with a lower-order multistep warm start (orders 1, 2, 3 on the first three steps) instead of PNDM's Runge-Kutta
    start, so every step costs one network evaluation (1 NFE per step).

    In the EDM convention the exponential integrator of the epsilon form is the identity in sigma, so a step is
    `x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * sum_j a_j eps_{i-j}` with the fixed equal-step coefficients
    (`_AB_COEFFS`), as DEIS and AMED use it; on non-uniform schedules those coefficients are an approximation (the
    price of the fixed table). A final step into sigma = 0 lands on `D(x_1, sigma_1)` (the export convention).
    """
    return _solve_by_steps(IPNDMSteps, denoiser, x, sigmas, callback)


SOLVERS["ipndm"] = ipndm
_NFE_PER_STEP["ipndm"] = 1
__all__.append("ipndm")

STEPS: dict[str, type[Steps]] = {"ddim": DDIMSteps, "euler": DDIMSteps, "dpmpp_2m": DPMpp2MSteps,
                                 "ipndm": IPNDMSteps}
"""The solvers that take one model call per step, as step objects (what a step-at-a-time sampler runs)."""


def steps_for(solver: str, sigmas: Tensor) -> Steps:
    """A fresh pass of `solver`'s steps down `sigmas` (ValueError for a solver without single-call steps)."""
    if solver not in STEPS:
        raise ValueError(f"solver {solver!r} has no one-call steps; those that do: {', '.join(STEPS)}")
    return STEPS[solver](sigmas)


__all__ += ["Steps", "STEPS", "steps_for"]


def sample(
    denoiser: Denoiser,
    schedule: Any,
    noise: Tensor,
    *,
    solver: str | None = None,
    callback: Callback = None,
) -> Tensor:
    """Sample with a result: `solver` (default: the schedule's own) on the schedule's nodes, last step into 0.

    `schedule` is a `fewstep_search.Schedule` (or a descending sigma tensor ending at sigma_min, taken as EDM);
    `noise` is standard normal [B, *shape], as a pipeline draws it, and the start is the family's prior
    `prior_scale(schedule.family, sigma_max) * noise` (`sigma_max * noise` for an EDM model). This is the sampler
    every score, Phase-2 chain and export of the project runs (`sampling_sigmas`), so its output from the same
    noise is what the exported scheduler gives in the model's own pipeline, to float round-off. Returns the
    sample in the EDM convention, i.e. x0 (a VP model's x0, a flow model's x0).

    Example:
        >>> import torch
        >>> from fewstep_search import karras, sample
        >>> x0 = sample(lambda x, s: 0.5 * x, karras(4, 0.002, 80.0), torch.randn(2, 3))
    """
    sigmas = schedule if isinstance(schedule, Tensor) else schedule.tensor()
    name = solver if solver is not None else getattr(schedule, "solver", "ddim")
    wide = torch.float32 if noise.device.type == "mps" else torch.float64
    sigmas = sigmas.to(device=noise.device, dtype=wide)
    start = prior_scale(getattr(schedule, "family", "edm"), float(sigmas[0])) * noise
    return get_solver(name)(denoiser, start, sampling_sigmas(sigmas), callback=callback)
