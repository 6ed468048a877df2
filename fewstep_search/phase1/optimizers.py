"""Schedule optimizers behind one small interface, and their registry.

| name         | domain                              | method                                                |
|--------------|-------------------------------------|-------------------------------------------------------|
| none         | any                                 | the start itself (the heuristic baselines)            |
| dp           | bw or b0, on the `grid`             | exact dynamic program on the bank grid                |
| adam         | continuous parameterization         | Adam on autograd gradients, projected on the box      |
| lbfgsb       | continuous parameterization         | scipy L-BFGS-B, autograd gradients, the box           |
| trust_constr | continuous parameterization         | scipy trust-constr, BFGS Hessian, linear constraints  |

The Optuna samplers (`tpe`, `cmaes`) are in `samplers`, the chains (`dp_adam`) in `chains`, the published peers
(`gits`, `dm_nonuniform`, `ays`, `ld3`) in `peers`; `registry` gathers them all. A new optimizer is one subclass
of `ScheduleOptimizer` plus an entry in the registry; custom ones can also be handed to the search engine
directly (`extra_optimizers`), which ships them to the workers.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from fewstep_search.dp import dp_optimal
from fewstep_search.phase1.parameterizations import GridIndices, Parameterization
from fewstep_search.phase1.problem import Objective, Problem
from fewstep_search.schedules import Schedule

__all__ = [
    "OptimizeResult",
    "ScheduleOptimizer",
    "Identity",
    "GridDP",
    "Adam",
    "LBFGSB",
    "TrustConstr",
    "positive_int",
    "theta0",
]


@dataclass(frozen=True)
class OptimizeResult:
    """The best schedule an optimizer evaluated, its objective value on the fit trajectories, and the cost."""

    schedule: Schedule
    value: float
    start_value: float
    evaluations: int


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _positive_float(name: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


class ScheduleOptimizer(ABC):
    """Minimizes a `Problem` (objective o parameterization on the fit trajectories) from a start schedule.

    Call order:
      1. `opt = Subclass(**hyper)`: keyword-only hyper-parameters, validated here (ValueError).
      2. `opt.check(objective=..., parameterization=...)`: raises ValueError when the pair is outside the
         optimizer's domain. Cheap (no evaluations); the search calls it in the driver before any trial runs.
      3. `opt.minimize(problem, start)`: evaluates the start, calls `run`, and returns the best schedule
         evaluated (so the result is never worse than the start on the problem's objective).
    Subclasses implement `run`, which evaluates through `problem` (its record keeps the best point), and
    override `check` where their domain is narrower. Instances hold only their hyper-parameters: picklable
    (they travel to Ray workers) and reusable; `run` keeps no state on `self`.
    """

    name: ClassVar[str]

    @property
    def hyper(self) -> dict[str, Any]:
        """The hyper-parameters, as recorded with a trial (JSON-able)."""
        return {}

    def check(self, *, objective: Objective, parameterization: type[Parameterization]) -> None:
        """Default domain: any objective on a continuous (differentiable) parameterization."""
        if not parameterization.differentiable:
            raise ValueError(
                f"optimizer {self.name!r} needs a continuous parameterization, not {parameterization.name!r}"
            )

    @abstractmethod
    def run(self, problem: Problem, start: Schedule) -> None:
        """Search, evaluating candidates through `problem` (loss / value / value_and_grad / value_of)."""

    def minimize(self, problem: Problem, start: Schedule) -> OptimizeResult:
        self.check(objective=problem.objective, parameterization=type(problem.parameterization))
        start_value = problem.value_of(start)
        if not math.isfinite(start_value):
            raise ValueError(f"the start schedule {start.name} has a non-finite objective ({start_value})")
        self.run(problem, start)
        if problem.best_schedule is None:  # cannot happen: the start was evaluated and is finite
            raise RuntimeError(f"optimizer {self.name!r} recorded no evaluation")
        return OptimizeResult(problem.best_schedule, problem.best_value, start_value, problem.evaluations)


def theta0(problem: Problem, start: Schedule) -> np.ndarray:
    return problem.parameterization.clip(problem.parameterization.encode(start))


class Identity(ScheduleOptimizer):
    """No optimization: the start itself, scored like every other trial (the heuristic baselines)."""

    name = "none"

    def check(self, *, objective: Objective, parameterization: type[Parameterization]) -> None:
        return None

    def run(self, problem: Problem, start: Schedule) -> None:
        return None


class GridDP(ScheduleOptimizer):
    """The exact minimizer of an interval-additive objective over schedules on the bank grid (O(N M^2))."""

    name = "dp"

    def check(self, *, objective: Objective, parameterization: type[Parameterization]) -> None:
        if objective.additive is None:
            raise ValueError(
                f"optimizer 'dp' needs an objective additive over intervals (bw, b0), not {objective.name!r}"
            )
        if parameterization is not GridIndices:
            raise ValueError(
                f"optimizer 'dp' works on the 'grid' parameterization, not {parameterization.name!r}"
            )

    def run(self, problem: Problem, start: Schedule) -> None:
        idx, _ = dp_optimal(problem.cost_matrix(), problem.nfe)
        problem.value_of(Schedule(problem.fit.grid[idx].cpu().numpy(), name="dp"))


class Adam(ScheduleOptimizer):
    """Adam on autograd gradients (the LD3 recipe for the true error), projected on the feasible box.

    Evaluates `steps + 1` points; the best one is kept (E is non-convex and noisy in the coordinates).
    """

    name = "adam"

    def __init__(self, *, steps: int = 150, lr: float = 0.05) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
        self.steps, self.lr = steps, _positive_float("lr", lr)

    @property
    def hyper(self) -> dict[str, Any]:
        return {"steps": self.steps, "lr": self.lr}

    def run(self, problem: Problem, start: Schedule) -> None:
        lo, hi = (torch.tensor(b, dtype=torch.float64, device="cpu") for b in problem.parameterization.bounds())
        # theta lives on the CPU: parameterizations are tiny; the objective moves sigmas to the bank's device.
        theta = torch.tensor(theta0(problem, start), dtype=torch.float64, device="cpu", requires_grad=True)
        opt = torch.optim.Adam([theta], lr=self.lr)
        for _ in range(self.steps + 1):
            opt.zero_grad()
            problem.loss(theta).backward()
            opt.step()
            with torch.no_grad():
                theta.copy_(torch.clamp(theta, lo, hi))


def _scipy_bounds(problem: Problem) -> list[tuple[float | None, float | None]] | None:
    lo, hi = problem.parameterization.bounds()
    if np.all(np.isinf(lo)) and np.all(np.isinf(hi)):
        return None
    return [
        (None if np.isinf(a) else float(a), None if np.isinf(b) else float(b))
        for a, b in zip(lo, hi, strict=True)
    ]


class LBFGSB(ScheduleOptimizer):
    """scipy's L-BFGS-B with exact (autograd) gradients and the parameterization's box."""

    name = "lbfgsb"

    def __init__(self, *, maxiter: int = 100) -> None:
        self.maxiter = positive_int("maxiter", maxiter)

    @property
    def hyper(self) -> dict[str, Any]:
        return {"maxiter": self.maxiter}

    def run(self, problem: Problem, start: Schedule) -> None:
        from scipy.optimize import minimize

        minimize(
            problem.value_and_grad,
            theta0(problem, start),
            jac=True,
            method="L-BFGS-B",
            bounds=_scipy_bounds(problem),
            options={"maxiter": self.maxiter},
        )


class TrustConstr(ScheduleOptimizer):
    """scipy's trust-constr with autograd gradients, a BFGS Hessian, the box and the linear constraints.

    With the `nodes` parameterization the constraints are the monotone ones `p_{i+1} - p_i >= gap`
    (DM-NonUniform's formulation); on unconstrained coordinates it is a trust-region quasi-Newton method.
    """

    name = "trust_constr"

    def __init__(self, *, maxiter: int = 100) -> None:
        self.maxiter = positive_int("maxiter", maxiter)

    @property
    def hyper(self) -> dict[str, Any]:
        return {"maxiter": self.maxiter}

    def run(self, problem: Problem, start: Schedule) -> None:
        from scipy.optimize import BFGS, Bounds, LinearConstraint, minimize

        p = problem.parameterization
        constraints = []
        linear = p.linear_constraints()
        if linear is not None:
            constraints.append(LinearConstraint(*linear))
        lo, hi = p.bounds()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "delta_grad == 0.0": a flat BFGS update, harmless here
            minimize(
                problem.value_and_grad,
                theta0(problem, start),
                jac=True,
                hess=BFGS(),
                method="trust-constr",
                bounds=Bounds(lo, hi),
                constraints=constraints,
                options={"maxiter": self.maxiter},
            )
