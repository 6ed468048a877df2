"""One Phase-1 trial: (objective, parameterization, optimizer, hyper-parameters), scored on held-out.

`run_trial` is plain Python (no Ray, no Optuna): the Ray engine calls it in a worker, tests and benchmarks
call it in process. Every trial is scored the same way (DESIGN.md section 2): held-out E, the mean
||x0_hat - x0*|| over the held-out trajectories, is the metric that selects; fit E, and B_w and B_0 on the
held-out trajectories, are reported beside it.

Example:
    >>> spec = TrialSpec(optimizer="adam", objective="direct", parameterization="logits", start="edm",
    ...                  hyper={"steps": 50})
    >>> spec.key
    'adam/direct/logits/edm/lr=0.05,steps=50'
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from fewstep_search.bank import Bank
from fewstep_search.models.base import Denoiser
from fewstep_search.objectives import bound, true_error
from fewstep_search.schedules import SCHEDULE_FAMILIES, Schedule, make_schedule
from fewstep_search.search.optimizers import ScheduleOptimizer, make_optimizer
from fewstep_search.search.parameterizations import PARAMETERIZATIONS, make_parameterization
from fewstep_search.search.problem import Problem, get_objective

__all__ = ["TrialSpec", "TrialRecord", "TrialState", "run_trial", "score_schedule"]

TrialState = Literal["COMPLETE", "FAIL"]
OptimizerFactory = Callable[..., ScheduleOptimizer]


@dataclass(frozen=True)
class TrialSpec:
    """What a trial runs. Plain data (JSON-able): it is the Tune config and the Optuna trial's parameters.

    Args:
        optimizer: a name in `fewstep_search.search.optimizers.OPTIMIZERS` (or the engine's extras).
        objective: "bw", "b0" or "direct" (the true error on the fit trajectories).
        parameterization: a name in `PARAMETERIZATIONS`.
        start: a heuristic family (`fewstep_search.schedules.SCHEDULE_FAMILIES`) the optimizer starts from.
        hyper: the optimizer's keyword hyper-parameters.
        options: the parameterization's keyword options (e.g. spline `knots`).
        seed: for randomized optimizers (samplers).
    """

    optimizer: str
    objective: str = "bw"
    parameterization: str = "logits"
    start: str = "edm"
    hyper: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0

    @property
    def key(self) -> str:
        """A stable identity: the optimizer's resolved hyper-parameters included, so defaults count too."""
        try:
            hyper = make_optimizer(self.optimizer, **self.hyper).hyper
        except ValueError:
            hyper = dict(self.hyper)
        parts = [self.optimizer, self.objective, self.parameterization, self.start]
        extra = {**hyper, **{f"p.{k}": v for k, v in self.options.items()}}
        if self.seed:
            extra["seed"] = self.seed
        if extra:
            parts.append(",".join(f"{k}={_fmt(v)}" for k, v in sorted(extra.items())))
        return "/".join(parts)

    @property
    def label(self) -> str:
        """A short name for tables and schedule files."""
        return f"{self.optimizer}:{self.objective}:{self.parameterization}<-{self.start}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer,
            "objective": self.objective,
            "parameterization": self.parameterization,
            "start": self.start,
            "hyper": dict(self.hyper),
            "options": dict(self.options),
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrialSpec:
        return cls(
            **{
                k: data[k]
                for k in ("optimizer", "objective", "parameterization", "start", "hyper", "options", "seed")
                if k in data
            }
        )

    def validate(self, *, extra_optimizers: Mapping[str, OptimizerFactory] | None = None) -> None:
        """ValueError (one line) if a name is unknown or the optimizer cannot handle this pair. Cheap."""
        objective = get_objective(self.objective)
        if self.parameterization not in PARAMETERIZATIONS:
            raise ValueError(
                f"unknown parameterization {self.parameterization!r}; known: {', '.join(PARAMETERIZATIONS)}"
            )
        if self.start not in SCHEDULE_FAMILIES:
            raise ValueError(f"unknown start {self.start!r}; known: {', '.join(SCHEDULE_FAMILIES)}")
        opt = make_optimizer(self.optimizer, extra=dict(extra_optimizers or {}), **self.hyper)
        try:
            opt.check(objective=objective, parameterization=PARAMETERIZATIONS[self.parameterization])
        except ValueError as exc:
            raise ValueError(f"trial {self.label}: {exc}") from None


def _fmt(v: Any) -> str:
    return json.dumps(v, sort_keys=True) if isinstance(v, (dict, list, tuple)) else str(v)


@dataclass(frozen=True)
class TrialRecord:
    """A finished trial: its spec, state, metrics (COMPLETE) or error (FAIL), and its schedule.

    metrics: `heldout_error` (the selection metric), `fit_error`, `bw` and `b0` (on the held-out
    trajectories), `fit_objective` / `start_objective` (the optimized objective at the end and at the start,
    fit trajectories), `evaluations` (objective evaluations), `seconds` (optimization wall time, scoring
    excluded).
    """

    spec: TrialSpec
    state: TrialState
    metrics: Mapping[str, float] = field(default_factory=dict)
    schedule: Schedule | None = None
    error: str | None = None
    attempts: int = 1

    @property
    def heldout_error(self) -> float:
        return float(self.metrics.get("heldout_error", math.inf))

    @property
    def seconds(self) -> float:
        return float(self.metrics.get("seconds", math.inf))

    def to_report(self) -> dict[str, Any]:
        """A flat JSON-able dict (what a Ray worker reports, what is stored)."""
        return {
            "spec": self.spec.to_dict(),
            "state": self.state,
            "metrics": dict(self.metrics),
            "sigmas": None if self.schedule is None else [float(s) for s in self.schedule.sigmas],
            "error": self.error,
            "attempts": self.attempts,
        }

    @classmethod
    def from_report(cls, data: Mapping[str, Any]) -> TrialRecord:
        spec = TrialSpec.from_dict(data["spec"])
        sigmas = data.get("sigmas")
        return cls(
            spec=spec,
            state=data["state"],
            metrics=dict(data.get("metrics") or {}),
            schedule=None if sigmas is None else Schedule(sigmas, name=spec.label),
            error=data.get("error"),
            attempts=int(data.get("attempts", 1)),
        )


def score_schedule(
    denoiser: Denoiser, bank: Bank, schedule: Schedule, *, solver: str = "ddim", batch_size: int | None = None
) -> dict[str, float]:
    """Held-out E and fit E of a schedule, and B_w, B_0 on the held-out trajectories (no gradients)."""
    held, fit = bank.heldout(), bank.fit()
    s = schedule.tensor()
    with torch.no_grad():
        return {
            "heldout_error": float(true_error(denoiser, held, s, solver=solver, batch_size=batch_size)),
            "fit_error": float(true_error(denoiser, fit, s, solver=solver, batch_size=batch_size)),
            "bw": float(bound(held, s, "bw")),
            "b0": float(bound(held, s, "b0")),
        }


def run_trial(
    spec: TrialSpec,
    *,
    bank: Bank,
    denoiser: Denoiser,
    nfe: int,
    solver: str = "ddim",
    batch_size: int | None = None,
    extra_optimizers: Mapping[str, OptimizerFactory] | None = None,
) -> TrialRecord:
    """Optimize on `bank.fit()` as `spec` says, then score on `bank.heldout()`; returns a COMPLETE record.

    Exceptions propagate (the engine records them as FAIL after its retries).
    """
    spec.validate(extra_optimizers=extra_optimizers)
    lo, hi = bank.sigma_min, bank.sigma_max
    param = make_parameterization(
        spec.parameterization, nfe=nfe, sigma_min=lo, sigma_max=hi, grid=bank.grid, **spec.options
    )
    problem = Problem(
        objective=spec.objective,
        parameterization=param,
        fit=bank.fit(),
        denoiser=denoiser,
        solver=solver,
        batch_size=batch_size,
        seed=spec.seed,
    )
    optimizer = make_optimizer(spec.optimizer, extra=dict(extra_optimizers or {}), **spec.hyper)
    start = make_schedule(spec.start, nfe, lo, hi)
    t0 = time.perf_counter()
    result = optimizer.minimize(problem, start)
    seconds = time.perf_counter() - t0
    schedule = Schedule(result.schedule.sigmas, name=spec.label)
    metrics = {
        **score_schedule(denoiser, bank, schedule, solver=solver, batch_size=batch_size),
        "fit_objective": result.value,
        "start_objective": result.start_value,
        "evaluations": float(result.evaluations),
        "seconds": seconds,
    }
    return TrialRecord(spec=spec, state="COMPLETE", metrics=metrics, schedule=schedule)
