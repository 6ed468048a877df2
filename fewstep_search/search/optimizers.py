"""Schedule optimizers behind one small interface (STYLE.md lesson 6), and their registry.

| name         | domain                              | method                                                |
|--------------|-------------------------------------|-------------------------------------------------------|
| none         | any                                 | the start itself (the heuristic baselines)            |
| dp           | bw or b0, on the `grid`             | exact dynamic program on the bank grid                |
| adam         | continuous parameterization         | Adam on autograd gradients, projected on the box      |
| lbfgsb       | continuous parameterization         | scipy L-BFGS-B, autograd gradients, the box           |
| trust_constr | continuous parameterization         | scipy trust-constr, BFGS Hessian, linear constraints  |
| tpe          | continuous parameterization         | Optuna TPE sampler, its own in-memory study           |
| cmaes        | continuous parameterization         | Optuna CMA-ES sampler around the start, own study     |
| dp_adam      | DP on a bound, then any continuous  | chain: `dp` on `dp_objective`, then `adam`            |

A new optimizer is one subclass of `ScheduleOptimizer` plus an entry in `OPTIMIZERS`; custom ones can also be
handed to the search engine directly (`extra_optimizers`), which ships them to the workers.

Example:
    >>> from fewstep_search.search.optimizers import make_optimizer
    >>> make_optimizer("adam", steps=10).hyper
    {'steps': 10, 'lr': 0.05}
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from fewstep_search.dp import dp_optimal
from fewstep_search.schedules import Schedule
from fewstep_search.search._optuna import quiet_optuna
from fewstep_search.search.parameterizations import GridIndices, Parameterization, make_parameterization
from fewstep_search.search.problem import Objective, Problem

__all__ = [
    "OptimizeResult",
    "ScheduleOptimizer",
    "Identity",
    "GridDP",
    "Adam",
    "LBFGSB",
    "TrustConstr",
    "TPE",
    "CMAES",
    "Stage",
    "Chain",
    "DPThenAdam",
    "OPTIMIZERS",
    "make_optimizer",
]


@dataclass(frozen=True)
class OptimizeResult:
    """The best schedule an optimizer evaluated, its objective value on the fit trajectories, and the cost."""

    schedule: Schedule
    value: float
    start_value: float
    evaluations: int


def _positive_int(name: str, value: Any) -> int:
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


def _theta0(problem: Problem, start: Schedule) -> np.ndarray:
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
        problem.value_of(Schedule(problem.fit.grid[idx].numpy(), name="dp"))


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
        lo, hi = (torch.tensor(b, dtype=torch.float64) for b in problem.parameterization.bounds())
        theta = torch.tensor(_theta0(problem, start), dtype=torch.float64, requires_grad=True)
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
        self.maxiter = _positive_int("maxiter", maxiter)

    @property
    def hyper(self) -> dict[str, Any]:
        return {"maxiter": self.maxiter}

    def run(self, problem: Problem, start: Schedule) -> None:
        from scipy.optimize import minimize

        minimize(
            problem.value_and_grad,
            _theta0(problem, start),
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
        self.maxiter = _positive_int("maxiter", maxiter)

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
                _theta0(problem, start),
                jac=True,
                hess=BFGS(),
                method="trust-constr",
                bounds=Bounds(lo, hi),
                constraints=constraints,
                options={"maxiter": self.maxiter},
            )


class _OptunaSampler(ScheduleOptimizer):
    """An Optuna sampler driving the parameterization's coordinates inside its search box.

    Each run gets its own in-memory study (inner studies are never mixed with the search's record); the
    start's coordinates are enqueued as the first trial, so the sampler always knows a good point.
    """

    def __init__(self, *, n_trials: int = 60) -> None:
        self.n_trials = _positive_int("n_trials", n_trials)

    @property
    def hyper(self) -> dict[str, Any]:
        return {"n_trials": self.n_trials}

    @abstractmethod
    def sampler(self, *, x0: dict[str, float], box: tuple[np.ndarray, np.ndarray], seed: int) -> Any:
        """The Optuna sampler for one inner study."""

    def run(self, problem: Problem, start: Schedule) -> None:
        p = problem.parameterization
        lo, hi = p.search_box()
        if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
            raise ValueError(
                f"parameterization {p.name!r} has no finite search box for optimizer {self.name!r}"
            )
        names = [f"theta_{i}" for i in range(p.dim)]
        x0 = dict(zip(names, np.clip(_theta0(problem, start), lo, hi).tolist(), strict=True))
        with quiet_optuna() as optuna:
            study = optuna.create_study(
                direction="minimize",
                storage=optuna.storages.InMemoryStorage(),
                sampler=self.sampler(x0=x0, box=(lo, hi), seed=problem.seed),
            )
            study.enqueue_trial(x0)

            def objective(trial: Any) -> float:
                theta = [
                    trial.suggest_float(n, float(a), float(b)) for n, a, b in zip(names, lo, hi, strict=True)
                ]
                return problem.value(np.asarray(theta))

            study.optimize(objective, n_trials=self.n_trials)


class TPE(_OptunaSampler):
    """Optuna's Tree-structured Parzen Estimator (multivariate), best on the low-dimensional families."""

    name = "tpe"

    def sampler(self, *, x0: dict[str, float], box: tuple[np.ndarray, np.ndarray], seed: int) -> Any:
        import optuna

        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, n_startup_trials=min(10, self.n_trials)
        )


class CMAES(_OptunaSampler):
    """Optuna's CMA-ES sampler (needs the `cmaes` package), centred on the start with a quarter-box step."""

    name = "cmaes"
    SIGMA0 = 0.05
    """Initial step, in Optuna's CMA-ES units (each coordinate scaled to [0, 1] over its box): a local search
    around the start. Its default (1/6) jumps so far that E at the samples is worse than at a good start."""

    def sampler(self, *, x0: dict[str, float], box: tuple[np.ndarray, np.ndarray], seed: int) -> Any:
        import optuna

        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise ValueError("optimizer 'cmaes' needs the 'cmaes' package: pip install cmaes") from None
        sigma0 = self.SIGMA0
        with warnings.catch_warnings():
            # x0 / sigma0 are deprecated since Optuna 4.9 (removal planned for 6.0); without them CMA-ES
            # starts from the box centre, and the enqueued start trial is still evaluated first.
            warnings.simplefilter("ignore", category=FutureWarning)
            try:
                return optuna.samplers.CmaEsSampler(
                    x0=x0, sigma0=sigma0, seed=seed, warn_independent_sampling=False
                )
            except TypeError:
                return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)


@dataclass(frozen=True)
class Stage:
    """One stage of a chain: an optimizer and, where not the trial's, its objective / parameterization."""

    optimizer: ScheduleOptimizer
    objective: str | None = None
    parameterization: str | None = None


class Chain(ScheduleOptimizer):
    """Stages run in order, each from the previous stage's best; the result is scored on the trial's.

    Stages with their own objective or parameterization work on a derived problem (same bank and model).
    """

    name = "chain"

    def __init__(self, *, stages: Sequence[Stage]) -> None:
        if not stages:
            raise ValueError("a chain needs at least one stage")
        self.stages = tuple(stages)

    @property
    def hyper(self) -> dict[str, Any]:
        return {
            "stages": [
                {
                    "optimizer": s.optimizer.name,
                    "objective": s.objective,
                    "parameterization": s.parameterization,
                    **s.optimizer.hyper,
                }
                for s in self.stages
            ]
        }

    def check(self, *, objective: Objective, parameterization: type[Parameterization]) -> None:
        from fewstep_search.search.parameterizations import PARAMETERIZATIONS
        from fewstep_search.search.problem import get_objective

        for s in self.stages:
            param = PARAMETERIZATIONS[s.parameterization] if s.parameterization else parameterization
            s.optimizer.check(
                objective=get_objective(s.objective) if s.objective else objective, parameterization=param
            )

    def run(self, problem: Problem, start: Schedule) -> None:
        current = start
        for s in self.stages:
            param = None
            if s.parameterization is not None:
                p = problem.parameterization
                param = make_parameterization(
                    s.parameterization,
                    nfe=p.nfe,
                    sigma_min=p.sigma_min,
                    sigma_max=p.sigma_max,
                    grid=problem.fit.grid,
                )
            sub = problem.derive(objective=s.objective, parameterization=param)
            current = s.optimizer.minimize(sub, current).schedule
            problem.evaluations += sub.evaluations  # the chain's cost is all of its stages'
        problem.value_of(current)


class DPThenAdam(Chain):
    """DESIGN.md's recipe: the exact grid DP of a bound (`dp_objective`), then Adam on the trial's."""

    name = "dp_adam"

    def __init__(self, *, dp_objective: str = "bw", steps: int = 150, lr: float = 0.05) -> None:
        if dp_objective not in ("bw", "b0"):
            raise ValueError(f"dp_objective must be 'bw' or 'b0', got {dp_objective!r}")
        self.dp_objective = dp_objective
        super().__init__(
            stages=[
                Stage(GridDP(), objective=dp_objective, parameterization=GridIndices.name),
                Stage(Adam(steps=steps, lr=lr)),
            ]
        )

    @property
    def hyper(self) -> dict[str, Any]:
        adam = self.stages[-1].optimizer
        return {"dp_objective": self.dp_objective, **adam.hyper}


OPTIMIZERS: dict[str, Callable[..., ScheduleOptimizer]] = {
    cls.name: cls for cls in (Identity, GridDP, Adam, LBFGSB, TrustConstr, TPE, CMAES, DPThenAdam)
}


def make_optimizer(
    name: str, *, extra: dict[str, Callable[..., ScheduleOptimizer]] | None = None, **hyper: Any
) -> ScheduleOptimizer:
    """An optimizer by registry name (or from `extra`) with keyword hyper-parameters; ValueError if not."""
    registry = {**OPTIMIZERS, **(extra or {})}
    try:
        factory = registry[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(registry)}") from None
    try:
        return factory(**hyper)
    except TypeError as exc:
        raise ValueError(f"optimizer {name!r}: bad hyper-parameters {sorted(hyper)} ({exc})") from None
