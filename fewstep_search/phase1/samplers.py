"""Optuna samplers as schedule optimizers: TPE and CMA-ES on a parameterization's finite search box.

| name  | domain                      | method                                              |
|-------|-----------------------------|-----------------------------------------------------|
| tpe   | continuous parameterization | Optuna TPE sampler, its own in-memory study         |
| cmaes | continuous parameterization | Optuna CMA-ES sampler around the start, own study   |

Optuna is imported only when a sampler runs, so importing this module stays cheap.
"""

from __future__ import annotations

import math
import warnings
from abc import abstractmethod
from typing import Any

import numpy as np

from fewstep_search.phase1._optuna import quiet_optuna
from fewstep_search.phase1.optimizers import ScheduleOptimizer, positive_int, theta0
from fewstep_search.phase1.problem import Problem, StopTrial
from fewstep_search.schedules import Schedule

__all__ = ["TPE", "CMAES"]


class _OptunaSampler(ScheduleOptimizer):
    """An Optuna sampler driving the parameterization's coordinates inside its search box.

    Each run gets its own in-memory study (inner studies are never mixed with the search's record); the
    start's coordinates are enqueued as the first trial, so the sampler always knows a good point.
    """

    def __init__(self, *, n_trials: int = 60) -> None:
        self.n_trials = positive_int("n_trials", n_trials)

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
        x0 = dict(zip(names, np.clip(theta0(problem, start), lo, hi).tolist(), strict=True))
        with quiet_optuna() as optuna:
            study = optuna.create_study(
                direction="minimize",
                storage=optuna.storages.InMemoryStorage(),
                sampler=self.sampler(x0=x0, box=(lo, hi), seed=problem.seed),
            )
            study.enqueue_trial(x0)

            stopped: list[StopTrial] = []

            def objective(trial: Any) -> float:
                theta = [
                    trial.suggest_float(n, float(a), float(b)) for n, a, b in zip(names, lo, hi, strict=True)
                ]
                try:
                    return problem.value(np.asarray(theta))
                except StopTrial as stop:  # early stopping is not a failure: end the inner study quietly
                    stopped.append(stop)
                    study.stop()
                    return math.inf

            study.optimize(objective, n_trials=self.n_trials)
        if stopped:
            raise stopped[0]


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
        with warnings.catch_warnings():
            # x0 / sigma0 are deprecated since Optuna 4.9 (removal planned for 6.0). Without them CMA-ES would
            # start from the box centre, a different search: an Optuna that no longer takes them is an error
            # here, never a silent change.
            warnings.simplefilter("ignore", category=FutureWarning)
            try:
                return optuna.samplers.CmaEsSampler(
                    x0=x0, sigma0=self.SIGMA0, seed=seed, warn_independent_sampling=False
                )
            except TypeError as exc:
                raise ValueError(
                    f"optimizer 'cmaes': this Optuna's CmaEsSampler does not take a start point ({exc})"
                ) from None
