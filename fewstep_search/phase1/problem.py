"""One trial's problem: minimize an objective of `parameterization.decode(theta)` on the fit trajectories.

Objectives (docs/design.md section 1), all functions of a descending sigma tensor, differentiable:

| name   | what                                                    | needs the model | additive (grid DP) |
|--------|---------------------------------------------------------|-----------------|--------------------|
| bw     | B_w, the propagation-weighted bound                     | no              | yes                |
| b0     | B_0, the plain convex-combination bound                 | no              | yes                |
| direct | E, the true error of the first-order solve (LD3)        | yes             | no                 |

A `Problem` also keeps score of every evaluation (count, best value, best schedule), so every optimizer
returns the best point it evaluated, whatever its own notion of a final iterate (E is non-convex; line
searches overshoot). A `monitor`, when set, is called every `monitor_every` evaluations with the problem: the
engine reports progress through it and stops a trial that cannot win by raising `StopTrial` from it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fewstep_search.bank import Bank
from fewstep_search.denoiser import Denoiser
from fewstep_search.objectives import BoundKind, bound, grid_cost_matrix, true_error
from fewstep_search.phase1.parameterizations import Parameterization
from fewstep_search.schedules import Schedule

__all__ = ["Objective", "OBJECTIVES", "Problem", "StopTrial", "get_objective"]


class StopTrial(Exception):  # noqa: N818 (a control-flow signal, not an error)
    """Raised by a monitor to end a trial early; the trial keeps the best schedule it evaluated."""


@dataclass(frozen=True)
class Objective:
    """A named objective; `additive`: the grid-cost kind when it is a sum over intervals (DP is exact)."""

    name: str
    needs_model: bool
    additive: BoundKind | None
    evaluate: Callable[[Problem, Tensor], Tensor]


def _bound(kind: BoundKind) -> Callable[[Problem, Tensor], Tensor]:
    return lambda problem, sigmas: bound(problem.fit, sigmas, kind)


def _direct(problem: Problem, sigmas: Tensor) -> Tensor:
    if problem.denoiser is None:
        raise ValueError("the 'direct' objective needs a denoiser")
    return true_error(
        problem.denoiser, problem.direct_fit, sigmas, solver=problem.solver, batch_size=problem.batch_size
    )


OBJECTIVES: dict[str, Objective] = {
    "bw": Objective("bw", needs_model=False, additive="bw", evaluate=_bound("bw")),
    "b0": Objective("b0", needs_model=False, additive="b0", evaluate=_bound("b0")),
    "direct": Objective("direct", needs_model=True, additive=None, evaluate=_direct),
}


def get_objective(name: str) -> Objective:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; known: {', '.join(OBJECTIVES)}") from None


class Problem:
    """`minimize_theta objective(parameterization.decode(theta))` on `fit`, with every evaluation recorded.

    Args:
        objective: a name in `OBJECTIVES`.
        parameterization: the coordinates (built for the same nfe and the bank's sigma range).
        fit: the bank's fit trajectories (never the select or test ones).
        direct_fit: the trajectories the true-error objective solves (default `fit`; a subset of it makes each
            evaluation cheaper: the bounds and the peers still see all of `fit`).
        denoiser: needed by `direct`.
        solver, batch_size: how `direct` solves (see `fewstep_search.objectives.true_error`).
        seed: for optimizers with randomness (samplers).
        deadline: a `time.perf_counter()` time; the first evaluation after it ends the trial (`StopTrial`)
            with the best schedule so far: a wall-time budget per trial, whatever the optimizer's own budget.
    """

    def __init__(
        self,
        *,
        objective: str,
        parameterization: Parameterization,
        fit: Bank,
        direct_fit: Bank | None = None,
        denoiser: Denoiser | None = None,
        solver: str = "ddim",
        batch_size: int | None = None,
        seed: int = 0,
        monitor: Callable[[Problem], None] | None = None,
        monitor_every: int = 10,
        deadline: float | None = None,
    ) -> None:
        self.objective = get_objective(objective)
        if self.objective.needs_model and denoiser is None:
            raise ValueError(f"objective {objective!r} needs a denoiser")
        p = parameterization
        if not (
            math.isclose(p.sigma_max, fit.sigma_max, rel_tol=1e-9)
            and math.isclose(p.sigma_min, fit.sigma_min, rel_tol=1e-9)
        ):
            raise ValueError(
                f"parameterization spans [{p.sigma_min:g}, {p.sigma_max:g}], "
                f"the bank [{fit.sigma_min:g}, {fit.sigma_max:g}]"
            )
        self.parameterization = parameterization
        self.fit, self.denoiser = fit, denoiser
        self.direct_fit = fit if direct_fit is None else direct_fit
        self.solver, self.batch_size, self.seed = solver, batch_size, int(seed)
        if monitor_every < 1:
            raise ValueError(f"monitor_every must be >= 1, got {monitor_every}")
        self.monitor, self.monitor_every = monitor, int(monitor_every)
        self.deadline = deadline
        self.evaluations = 0
        self.best_value = math.inf
        self.best_schedule: Schedule | None = None
        self._cost: Tensor | None = None

    @property
    def nfe(self) -> int:
        return self.parameterization.nfe

    def derive(
        self, *, objective: str | None = None, parameterization: Parameterization | None = None
    ) -> Problem:
        """The same bank and model with another objective or parameterization, and a fresh record (chains)."""
        return Problem(
            objective=objective or self.objective.name,
            parameterization=parameterization or self.parameterization,
            fit=self.fit,
            direct_fit=self.direct_fit,
            denoiser=self.denoiser,
            solver=self.solver,
            batch_size=self.batch_size,
            seed=self.seed,
            monitor=self._forward_monitor if (self.monitor is not None or self.deadline is not None) else None,
            monitor_every=self.monitor_every,
            deadline=self.deadline,
        )

    def _forward_monitor(self, sub: Problem) -> None:
        """A derived problem's checkpoints report the parent's best (what the trial will return)."""
        if sub.best_value < self.best_value and sub.objective is self.objective:
            self.best_value, self.best_schedule = sub.best_value, sub.best_schedule
        if self.monitor is not None:
            self.monitor(self)

    # ------------------------------------------------------------ evaluation

    def sigmas_loss(self, sigmas: Tensor) -> Tensor:
        """The objective of a schedule (descending sigmas tensor), differentiable; recorded."""
        loss = self.objective.evaluate(self, sigmas)
        value = float(loss.detach())
        self.evaluations += 1
        if math.isfinite(value) and value < self.best_value:
            self.best_value = value
            self.best_schedule = Schedule(sigmas.detach().double().cpu().numpy(), name=self.parameterization.name)
        if self.monitor is not None and self.evaluations % self.monitor_every == 0:
            self.monitor(self)
        if self.deadline is not None and time.perf_counter() > self.deadline and self.best_schedule is not None:
            if self.monitor is not None:
                self.monitor(self)  # a derived problem hands its best to the trial's problem first
            raise StopTrial
        return loss

    def loss(self, theta: Tensor) -> Tensor:
        """The objective of theta, differentiable (theta float64 [P])."""
        return self.sigmas_loss(self.parameterization.decode(theta))

    def value(self, theta: np.ndarray | Tensor) -> float:
        """The objective of theta, without gradients."""
        with torch.no_grad():
            return float(self.loss(torch.as_tensor(np.asarray(theta, dtype=np.float64), device="cpu")))

    def value_of(self, schedule: Schedule) -> float:
        """The objective of a schedule (any schedule with the bank's endpoints, not only the family's)."""
        with torch.no_grad():
            return float(self.sigmas_loss(schedule.tensor()))

    def value_and_grad(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        """(objective, d objective / d theta) for scipy-style optimizers."""
        th = torch.tensor(np.asarray(theta, dtype=np.float64), device="cpu", requires_grad=True)
        loss = self.loss(th)
        (grad,) = torch.autograd.grad(loss, th)
        return float(loss.detach()), grad.cpu().numpy().copy()

    def cost_matrix(self) -> Tensor:
        """The [M, M] grid cost of an additive objective (cached); ValueError for `direct`."""
        if self.objective.additive is None:
            raise ValueError(f"objective {self.objective.name!r} is not additive over intervals; no grid DP")
        if self._cost is None:
            self._cost = grid_cost_matrix(self.fit, self.objective.additive)
        return self._cost

    def summary(self) -> dict[str, Any]:
        return {
            "objective": self.objective.name,
            "parameterization": self.parameterization.name,
            "evaluations": self.evaluations,
            "best_value": self.best_value,
        }
