"""The teacher's side of Phase-2: accurate solves over one schedule interval and the ideal outputs they imply.

For the interval `[sigma_i -> sigma_{i-1}]` (written s0 -> s1 here, s0 > s1 > 0) and a state x at s0, the frozen
teacher's accurate solve gives `y = x*(s1)`; the student's DDIM step `r x + (1 - r) D` lands exactly on y when
`D = D_bar = (y - r x) / (1 - r)`, `r = s1 / s0` (docs/design.md section 1, Phase-2). So D_bar is the regression
target, and its accuracy bounds what the student can learn: an error delta in y is an error delta / (1 - r) in
D_bar, i.e. the same delta on the student's step.

Teacher solvers, all classical RK4 with sub-steps bounded in log sigma (`substeps_for`):

* ``"rk4"``: `fewstep_search.solvers.rk4_interval`, RK4 on `dx/dt = x - D(x, e^t)`, t = log sigma.
* ``"rk4_exp"``: RK4 on the exponential-integrator form of the same ODE (Lawson / integrating factor):
  `z = x / sigma`, `lam = -log sigma`, `dz/dlam = D(sigma z, sigma) / sigma`. The linear part `x` of the ODE is
  integrated exactly, so the error scales with how much D varies, not with the size of x. Why it exists: at
  high noise `|x| ~ sigma sqrt(d)` dwarfs the student's residual, and plain RK4 with sub-steps of 0.25 in log
  sigma was measured to give targets whose error is ~20% of the residual on 80 -> 18 (digits, N = 10), where
  this form is ~1% at half the calls (docs/phase2.md has the table). Below sigma ~ 1 it is worse than plain RK4.
* ``"auto"``: the exponential form above sigma = 1, plain RK4 below: the better of the two on each side.

Both are checked by step halving in tests/test_phase2_targets.py.

The last interval. The sampler the student is trained for runs the schedule with sigma_min replaced by 0
(`fewstep_search.solvers.sampling_sigmas`, the sampler every score and export uses), so its last step lands on
its own output. The teacher's state after the last interval is therefore the clean x*(0) = D(x*(sigma_min),
sigma_min), and that interval's target is x*(0) itself (`r = 0`); every end point here is x*(0) too, as the
bank's reference end points are.

The end-to-end term needs only the end point x0* of each noise sample, not the states at the schedule's nodes,
so it has its own solve (`end_point`): iPNDM (one call per step) on a fine Karras (rho = 7) grid, which caches
one state per sample instead of N + 1. On the digits model 100 such steps were as accurate as RK4 through a
10-step schedule's nodes at sub-steps of 0.5 (E 0.0045 against 0.0084, 100 calls against 112) and 200 steps
ten times more (0.0008); both are far below the students' E (0.1-0.5), and each round records the figure
(`phase2.evaluate.teacher_error`; docs/phase2.md, "How accurate the end points are"). Nothing here imports Ray.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from fewstep_search.denoiser import Denoiser
from fewstep_search.solvers import ipndm, rk4_interval, sampling_sigmas, substeps_for

__all__ = ["TeacherSolver", "TEACHER_SOLVERS", "CountingDenoiser", "solve_interval", "ideal_output", "calls_for",
           "end_point", "path_points", "fine_grid"]

TeacherSolver = Literal["rk4", "rk4_exp", "auto"]
TEACHER_SOLVERS: tuple[str, ...] = ("rk4", "rk4_exp", "auto")
AUTO_SPLIT = 1.0
"""`"auto"` uses the exponential form above this sigma and plain RK4 below it (where it was measured better)."""


class CountingDenoiser:
    """A denoiser that counts its calls (in samples: batch size per call), so the cost is measured, not guessed."""

    def __init__(self, inner: Callable[..., Tensor]) -> None:
        self.inner = inner
        self.sample_calls = 0

    def __call__(self, x: Tensor, sigma: Tensor, *cond: Tensor) -> Tensor:
        self.sample_calls += int(x.shape[0])
        return self.inner(x, sigma, *cond)


def _sigma_batch(x: Tensor, sigma: float) -> Tensor:
    return torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)


def _rk4_exp(den: Denoiser, x: Tensor, s0: float, s1: float, substeps: int, d0: Tensor | None) -> Tensor:
    """RK4 in lam = -log sigma on z = x / sigma: `dz/dlam = D(sigma z, sigma) / sigma` (exact linear part)."""
    l0, l1 = -math.log(s0), -math.log(s1)
    h = (l1 - l0) / substeps

    def f(z: Tensor, lam: float) -> Tensor:
        sig = math.exp(-lam)
        return den(z * sig, _sigma_batch(z, sig)) / sig

    z = x / s0
    for j in range(substeps):
        lam = l0 + j * h
        k1 = d0 / s0 if (j == 0 and d0 is not None) else f(z, lam)
        k2 = f(z + 0.5 * h * k1, lam + 0.5 * h)
        k3 = f(z + 0.5 * h * k2, lam + 0.5 * h)
        k4 = f(z + h * k3, lam + h)
        z = z + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
    return z * s1


def _pieces(s0: float, s1: float, solver: str) -> list[tuple[float, float, str]]:
    """The interval as (from, to, form) pieces: `"auto"` splits it at AUTO_SPLIT."""
    if solver != "auto":
        return [(s0, s1, solver)]
    if s1 >= AUTO_SPLIT:
        return [(s0, s1, "rk4_exp")]
    if s0 <= AUTO_SPLIT:
        return [(s0, s1, "rk4")]
    return [(s0, AUTO_SPLIT, "rk4_exp"), (AUTO_SPLIT, s1, "rk4")]


def calls_for(s0: float, s1: float, *, max_log_step: float, solver: str = "rk4", d0_given: bool = False) -> int:
    """Teacher evaluations per sample for one interval (4 per RK4 sub-step, one fewer when D(x, s0) is given)."""
    subs = sum(substeps_for(a, b, max_log_step) for a, b, _ in _pieces(float(s0), float(s1), solver))
    return 4 * subs - int(d0_given)


@torch.no_grad()
def solve_interval(
    teacher: Denoiser,
    x: Tensor,
    s0: float,
    s1: float,
    *,
    max_log_step: float = 0.25,
    solver: TeacherSolver = "rk4",
    d0: Tensor | None = None,
) -> Tensor:
    """The teacher's accurate state at `s1` from `x` at `s0` (no gradient; x's dtype and device).

    `d0` is the teacher's own `D(x, s0)` when already known (never the student's output).
    """
    s0, s1 = float(s0), float(s1)
    if not s0 > s1 > 0:
        raise ValueError(f"an interval needs s0 > s1 > 0, got {s0} -> {s1}")
    if solver not in TEACHER_SOLVERS:
        raise ValueError(f"unknown teacher solver {solver!r}; known: {', '.join(TEACHER_SOLVERS)}")
    for a, b, form in _pieces(s0, s1, solver):
        k = substeps_for(a, b, max_log_step)
        if form == "rk4":
            # sigmas on x's device, so the model is called with sigma beside x (float64 where the device has it)
            wide = torch.float32 if x.device.type == "mps" else torch.float64
            t0 = torch.tensor(a, dtype=wide, device=x.device)
            t1 = torch.tensor(b, dtype=wide, device=x.device)
            x = rk4_interval(teacher, x, t0, t1, substeps=k, d0=d0)
        else:
            x = _rk4_exp(teacher, x, a, b, k, d0)
        d0 = None  # only valid at the interval's start
    return x


def fine_grid(sigma_max: float, sigma_min: float, steps: int, *, rho: float = 7.0,
              device: torch.device | str = "cpu") -> Tensor:
    """`steps + 1` sigmas from sigma_max down to sigma_min, uniform in sigma^(1/rho) (EDM's spacing, float64)."""
    if steps < 1 or not sigma_max > sigma_min > 0:
        raise ValueError(f"a fine grid needs steps >= 1 and sigma_max > sigma_min > 0, got {steps}, "
                         f"{sigma_max} -> {sigma_min}")
    ramp = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    a, b = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    grid = (a + ramp * (b - a)) ** rho
    grid[0], grid[-1] = sigma_max, sigma_min
    wide = torch.float32 if torch.device(device).type == "mps" else torch.float64
    return grid.to(device=device, dtype=wide)


def _with_final_zero(grid: Tensor) -> Tensor:
    """A fine grid that ends at sigma_min, with the last step into 0 after it (x*(0) = D(x*(sigma_min), sigma_min))."""
    return torch.cat([grid, grid.new_zeros(1)])


@torch.no_grad()
def end_point(teacher: Denoiser, x: Tensor, sigma_max: float, sigma_min: float, *, steps: int) -> Tensor:
    """The teacher's clean end point x*(0) from `x` at sigma_max: iPNDM on `fine_grid` down to sigma_min, then the
    step into 0 (`steps + 1` calls per sample)."""
    return ipndm(teacher, x, _with_final_zero(fine_grid(float(sigma_max), float(sigma_min), steps, device=x.device)))


@torch.no_grad()
def path_points(teacher: Denoiser, x: Tensor, nodes: tuple[float, ...], *, steps: int) -> Tensor:
    """The teacher's states [N + 1, B, *shape] at every node of `nodes` (descending, `nodes[0]` the start), the
    last the clean end x*(0): one iPNDM pass on `fine_grid` with the nodes inserted, so the end matches `end_point`
    and the interior states cost no more calls than the nodes add (`steps` + N calls per sample)."""
    grid = fine_grid(float(nodes[0]), float(nodes[-1]), steps, device=x.device)
    merged = torch.unique(torch.cat([grid, torch.tensor(nodes, dtype=grid.dtype, device=grid.device)]))
    merged = merged.flip(0)  # descending, duplicates (the shared end points) gone
    at = {int(torch.argmin((merged - float(s)).abs())): k for k, s in enumerate(nodes)}
    states: list[Tensor | None] = [None] * len(nodes)
    states[0] = x

    def keep(info: dict) -> None:
        k = at.get(int(info["i"]))
        if k is not None and k > 0:
            states[k] = info["x"]

    states[-1] = ipndm(teacher, x, _with_final_zero(merged), callback=keep)
    if any(s is None for s in states):
        raise RuntimeError("path_points: a schedule node was not visited on the merged grid")
    return torch.stack(states)  # type: ignore[arg-type]


def ideal_output(y: Tensor, x: Tensor, s0: float, s1: float) -> Tensor:
    """D_bar = (y - r x) / (1 - r), r = s1 / s0: the output whose DDIM step from x at s0 lands on y at s1."""
    r = float(s1) / float(s0)
    return (y - r * x) / (1.0 - r)


@dataclass(frozen=True)
class IntervalTeacher:
    """The teacher bound to its solver settings: `target(x, i)` is D_bar for interval i of `sigmas`."""

    teacher: Denoiser
    sigmas: tuple[float, ...]
    max_log_step: float = 0.25
    solver: TeacherSolver = "rk4"
    first_max_log_step: float | None = None
    """The first interval's sub-step bound (its targets are cached per noise sample, so a finer one costs little)."""
    end_steps: int | None = None
    """iPNDM steps of `end_point` (the end-to-end term's x0*); None: the end of `trajectory` (RK4 at the nodes)."""

    def step_bound(self, i: int) -> float:
        return self.first_max_log_step if (i == 0 and self.first_max_log_step is not None) else self.max_log_step

    @property
    def nodes(self) -> tuple[float, ...]:
        """The sampler's nodes: `sigmas` with the last replaced by 0 (the module docstring, "The last interval")."""
        return sampling_sigmas(self.sigmas)

    def state(self, x: Tensor, i: int) -> Tensor:
        """x*(sigmas[i + 1]) from x at sigmas[i]; after the last interval the clean x*(0) (one call more)."""
        y = solve_interval(
            self.teacher, x, self.sigmas[i], self.sigmas[i + 1], max_log_step=self.step_bound(i), solver=self.solver
        )
        if i < len(self.sigmas) - 2:
            return y
        with torch.no_grad():
            return self.teacher(y, torch.full((y.shape[0],), float(self.sigmas[-1]), dtype=y.dtype, device=y.device))

    def target(self, x: Tensor, i: int) -> Tensor:
        """D_bar of interval i: the output whose step from x lands on the teacher's state (x*(0) on the last)."""
        return ideal_output(self.state(x, i), x, self.nodes[i], self.nodes[i + 1])

    def trajectory(self, x_start: Tensor) -> Tensor:
        """[N + 1, B, *shape]: the teacher's states at the sampler's nodes from x_start at sigmas[0] (last x*(0))."""
        states = [x_start]
        for i in range(len(self.sigmas) - 1):
            states.append(self.state(states[-1], i))
        return torch.stack(states)

    def end_point(self, x_start: Tensor) -> Tensor:
        """x*(0) from x_start at sigmas[0]: what the end-to-end term is scored against."""
        if self.end_steps is None:
            return self.trajectory(x_start)[-1]
        return end_point(self.teacher, x_start, self.sigmas[0], self.sigmas[-1], steps=self.end_steps)

    def path(self, x_start: Tensor) -> Tensor:
        """[N + 1, B, *shape]: the teacher's states at every node whose last is `end_point` (the path term)."""
        if self.end_steps is None:
            return self.trajectory(x_start)
        return path_points(self.teacher, x_start, self.sigmas, steps=self.end_steps)

    def end_calls_per_sample(self) -> int:
        """Teacher evaluations per sample of `end_point` (the fine solve's, and the step into 0)."""
        return self.calls_per_sample() if self.end_steps is None else self.end_steps + 1

    def path_calls_per_sample(self) -> int:
        """Teacher evaluations per sample of `path`: `end_point`'s, plus one per node inserted in the fine grid."""
        return self.calls_per_sample() if self.end_steps is None else self.end_steps + len(self.sigmas) - 1

    def calls_per_sample(self, intervals: range | None = None) -> int:
        """Teacher evaluations per sample for the given intervals (all by default; the last adds the step into 0)."""
        last = len(self.sigmas) - 2
        idx = intervals if intervals is not None else range(last + 1)
        return sum(
            calls_for(self.sigmas[i], self.sigmas[i + 1], max_log_step=self.step_bound(i), solver=self.solver)
            + int(i == last)
            for i in idx
        )
