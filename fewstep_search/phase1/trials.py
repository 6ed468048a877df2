"""One Phase-1 trial: (objective, parameterization, optimizer, solver, hyper-parameters), scored on three sets.

`run_trial` is plain Python (no Ray, no Optuna): the engine's executors call it in process or in a Ray worker.
Every trial is scored the same way (docs/design.md section 2) on the bank's three disjoint sets:

* `fit_error`: E on the fit trajectories, the ones the optimizer saw;
* `select_error`: E on the select trajectories, the metric the search picks its winner by;
* `test_error`: E on the test trajectories, the number that is reported (never used for a decision);
* `bw`, `b0`: the bounds of the schedule on the test trajectories (first-order solver only), beside them.

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from fewstep_search.bank import Bank
from fewstep_search.denoiser import Denoiser
from fewstep_search.objectives import bound, true_error
from fewstep_search.phase1.parameterizations import PARAMETERIZATIONS, make_parameterization
from fewstep_search.phase1.problem import Problem, StopTrial, get_objective
from fewstep_search.phase1.registry import OptimizerFactory, make_optimizer
from fewstep_search.schedules import BEST_START, SCHEDULE_FAMILIES, Schedule, make_schedule
from fewstep_search.solvers import FIRST_ORDER_SOLVERS, SOLVERS, nfe_of

__all__ = [
    "TrialSpec",
    "TrialRecord",
    "TrialState",
    "Progress",
    "run_trial",
    "score_schedule",
    "errors_by_condition",
    "FIRST_ORDER_SOLVERS",
    "METRIC_KEYS",
    "BEST_START",
    "best_start_key",
]

def best_start_key(solver: str) -> str:
    return f"{BEST_START}:{solver}"


TrialState = Literal["COMPLETE", "FAIL"]
METRIC_KEYS = (
    "select_error",
    "test_error",
    "fit_error",
    "bw",
    "b0",
    "fit_objective",
    "start_objective",
    "evaluations",
    "seconds",
    "stopped_early",
)

ONE_SHOT_OPTIMIZERS = frozenset({"none", "gits", "dm_nonuniform", "b0_dp"})
"""Optimizers that compute their schedule by their own means and score it once: cheap, run first, never stopped."""

Progress = Callable[[int, dict[str, Any]], bool]
"""`progress(report_index, record_report) -> keep_going`: how a trial reports its best schedule so far."""


@dataclass(frozen=True)
class TrialSpec:
    """What a trial runs. Plain data (JSON-able): it is the Tune config and the Optuna trial's parameters.

    Args:
        optimizer: a name in `fewstep_search.phase1.registry.OPTIMIZERS` (or the engine's extras).
        objective: "bw", "b0" or "direct" (the true error on the fit trajectories).
        parameterization: a name in `PARAMETERIZATIONS`.
        solver: the sampler the schedule is for (its NFE per step must divide the budget).
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
    solver: str = "ddim"

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
        if self.solver != "ddim":
            extra["solver"] = self.solver
        if extra:
            parts.append(",".join(f"{k}={_fmt(v)}" for k, v in sorted(extra.items())))
        return "/".join(parts)

    @property
    def label(self) -> str:
        """A short name for tables and schedule files."""
        solver = "" if self.solver == "ddim" else f"[{self.solver}]"
        if self.is_baseline:
            return f"{self.start}{solver}"
        return f"{self.optimizer}:{self.objective}:{self.parameterization}<-{self.start}{solver}"

    @property
    def is_baseline(self) -> bool:
        return self.optimizer == "none"

    @property
    def is_costly(self) -> bool:
        """Trials that solve the ODE with the model per evaluation (the ones worth stopping early)."""
        return self.objective == "direct" and self.optimizer not in ONE_SHOT_OPTIMIZERS

    def to_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer,
            "objective": self.objective,
            "parameterization": self.parameterization,
            "start": self.start,
            "hyper": dict(self.hyper),
            "options": dict(self.options),
            "seed": self.seed,
            "solver": self.solver,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrialSpec:
        keys = ("optimizer", "objective", "parameterization", "start", "hyper", "options", "seed", "solver")
        return cls(**{k: data[k] for k in keys if k in data})

    def steps_for(self, budget: int) -> int:
        """Solver steps that spend `budget` network evaluations; ValueError when they cannot be spent exactly."""
        per_step = nfe_of(self.solver, 1)
        if budget % per_step:
            raise ValueError(f"solver {self.solver!r} spends {per_step} NFE per step: budget {budget} does not divide")
        return budget // per_step

    def validate(self, *, budget: int | None = None, extra_optimizers: Mapping[str, OptimizerFactory] | None = None
                 ) -> None:
        """ValueError (one line) if a name is unknown or the optimizer cannot handle this pair. Cheap."""
        objective = get_objective(self.objective)
        if self.parameterization not in PARAMETERIZATIONS:
            raise ValueError(
                f"unknown parameterization {self.parameterization!r}; known: {', '.join(PARAMETERIZATIONS)}"
            )
        if self.start not in SCHEDULE_FAMILIES and self.start != BEST_START:
            raise ValueError(f"unknown start {self.start!r}; known: {', '.join(SCHEDULE_FAMILIES)}, {BEST_START}")
        if self.start == BEST_START and not self.is_costly:
            raise ValueError(f"trial {self.label}: start {BEST_START!r} refines the best cheap trial, so it must be "
                             "a costly (direct-objective) trial")
        if self.solver not in SOLVERS or self.solver == "reference":
            known = ", ".join(s for s in SOLVERS if s != "reference")
            raise ValueError(f"unknown solver {self.solver!r}; known: {known}")
        if objective.additive is not None and self.solver not in FIRST_ORDER_SOLVERS:
            raise ValueError(
                f"trial {self.label}: the bound {self.objective!r} is defined for the first-order solver only; "
                "use objective 'direct' for other solvers"
            )
        if budget is not None:
            self.steps_for(budget)
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

    metrics: see `METRIC_KEYS` and the module docstring; `stopped_early` is 1.0 for a trial the engine stopped
    because it could not win (its best schedule is scored like every other).
    """

    spec: TrialSpec
    state: TrialState
    metrics: Mapping[str, float] = field(default_factory=dict)
    schedule: Schedule | None = None
    error: str | None = None
    attempts: int = 1

    @property
    def select_error(self) -> float:
        return float(self.metrics.get("select_error", math.inf))

    @property
    def test_error(self) -> float:
        return float(self.metrics.get("test_error", math.inf))

    @property
    def seconds(self) -> float:
        return float(self.metrics.get("seconds", math.inf))

    @property
    def stopped_early(self) -> bool:
        return bool(self.metrics.get("stopped_early", 0.0))

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
    denoiser: Denoiser, bank: Bank, schedule: Schedule, *, solver: str = "ddim", batch_size: int | None = None,
    parts: tuple[str, ...] = ("fit", "select", "test"), fit: Bank | None = None,
) -> dict[str, float]:
    """E of a schedule on each of `parts` (`<part>_error`), and B_w, B_0 on test for first-order solvers.

    `fit`: the trajectories scored as "fit" (default all of `bank.fit()`; a trial passes the subset its true-error
    objective solves, which is what the fit E is for: the gap to select E shows over-fitting, at a fraction of
    the cost of solving every fit trajectory once more per trial).
    """
    s = schedule.tensor(device=bank.device)
    out: dict[str, float] = {}
    with torch.no_grad():
        for part in parts:
            data = fit if (part == "fit" and fit is not None) else bank.part(part)
            out[f"{part}_error"] = float(true_error(denoiser, data, s, solver=solver, batch_size=batch_size))
        if "test" in parts:
            test = bank.test()
            first_order = solver in FIRST_ORDER_SOLVERS
            out["bw"] = float(bound(test, s, "bw")) if first_order else math.nan
            out["b0"] = float(bound(test, s, "b0")) if first_order else math.nan
    return out


def errors_by_condition(denoiser: Denoiser, bank: Bank, schedule: Schedule, *, solver: str = "ddim",
                        batch_size: int | None = None) -> dict[str, float] | None:
    """E of a schedule per condition on `bank`'s trajectories (None for an unconditional model).

    Keys are the conditions as the model advertises them (`str(conditions[c])`): one schedule serves the whole
    set, and this shows how evenly.
    """
    if bank.cond is None:
        return None
    labels = [str(c) for c in getattr(denoiser, "conditions", ())] or None
    s = schedule.tensor(device=bank.device)
    out = {}
    with torch.no_grad():
        for c in torch.unique(bank.cond).tolist():
            part = bank.subset(torch.nonzero(bank.cond == c).flatten())
            key = labels[c] if labels is not None and c < len(labels) else str(c)
            out[key] = float(true_error(denoiser, part, s, solver=solver, batch_size=batch_size))
    return out


def run_trial(
    spec: TrialSpec,
    *,
    bank: Bank,
    denoiser: Denoiser,
    nfe: int,
    batch_size: int | None = None,
    fit_trajectories: int | None = None,
    trial_seconds: float | None = None,
    deadline: float | None = None,
    starts: Mapping[str, Sequence[float]] | None = None,
    extra_optimizers: Mapping[str, OptimizerFactory] | None = None,
    progress: Progress | None = None,
    report_every: int = 10,
) -> TrialRecord:
    """Optimize on `bank.fit()` as `spec` says, then score on all three sets; returns a COMPLETE record.

    `nfe` is the budget; the schedule has `spec.steps_for(nfe)` steps. `progress`, when given, is called every
    `report_every` objective evaluations with the report of the best schedule so far (scored on select and
    test); when it returns False the trial stops early and returns that schedule. Exceptions propagate (the
    engine records them as FAIL after its retries). `fit_trajectories`: the true-error objective solves only the
    first that many fit trajectories per evaluation (a fixed random subset: the split is random), the cost of a
    costly trial divided by K_fit / fit_trajectories; the select set still decides, and the fit E reported is on
    that subset (every trial's, so that fit E compares across trials).
    `trial_seconds`: a costly trial ends at its first evaluation after this much wall time, with its best schedule
    (the optimizers' own budgets are caps: a cheap model reaches them, an expensive one the time first).
    `deadline`: a `time.time()` (the search's budget) at which a costly trial ends the same way, whichever is first.
    `starts`: schedules by `best_start_key(solver)` for trials whose start is "best" (see `best_starts`).
    """
    spec.validate(budget=nfe, extra_optimizers=extra_optimizers)
    steps = spec.steps_for(nfe)
    lo, hi = bank.sigma_min, bank.sigma_max
    param = make_parameterization(spec.parameterization, nfe=steps, sigma_min=lo, sigma_max=hi, grid=bank.grid,
                                  **spec.options)
    t0 = time.perf_counter()
    reports = 0

    def monitor(problem: Problem) -> None:
        nonlocal reports
        if progress is None or problem.best_schedule is None:
            return
        reports += 1
        # Costly trials optimize E on fit itself, so the best value is the fit error: only select and test
        # are scored here (this report is the record Ray keeps if its scheduler stops the trial).
        record = _record(spec, denoiser, bank, problem.best_schedule, batch_size,
                         {"fit_error": problem.best_value, "fit_objective": problem.best_value,
                          "start_objective": math.nan, "evaluations": float(problem.evaluations),
                          "seconds": time.perf_counter() - t0, "stopped_early": 1.0},
                         parts=("select", "test"))
        if not progress(reports, record.to_report()):
            raise StopTrial

    fit = bank.fit()
    direct_fit = fit if fit_trajectories is None or fit_trajectories >= fit.n_trajectories else fit.subset(
        torch.arange(fit_trajectories))
    problem = Problem(objective=spec.objective, parameterization=param, fit=fit, direct_fit=direct_fit,
                      denoiser=denoiser, solver=spec.solver, batch_size=batch_size, seed=spec.seed,
                      monitor=monitor if (progress is not None and spec.is_costly) else None,
                      monitor_every=report_every,
                      deadline=_deadline(t0, trial_seconds, deadline) if spec.is_costly else None)
    optimizer = make_optimizer(spec.optimizer, extra=dict(extra_optimizers or {}), **spec.hyper)
    if spec.start == BEST_START:
        sigmas = (starts or {}).get(best_start_key(spec.solver))
        if sigmas is None:
            raise ValueError(f"trial {spec.label} refines the best cheap {spec.solver} trial, but none finished")
        start = Schedule(np.asarray(sigmas, dtype=np.float64), name=BEST_START)
        if start.nfe != steps:
            raise ValueError(f"trial {spec.label}: the best cheap schedule has {start.nfe} steps, not {steps}")
    else:
        start = make_schedule(spec.start, steps, lo, hi)
    stopped = 0.0
    try:
        result = optimizer.minimize(problem, start)
        best, value, start_value = result.schedule, result.value, result.start_value
    except StopTrial:
        if problem.best_schedule is None:  # cannot happen: a report needs a best schedule
            raise RuntimeError(f"trial {spec.label} stopped before evaluating a schedule") from None
        best, value, start_value, stopped = problem.best_schedule, problem.best_value, math.nan, 1.0
    extra = {"fit_objective": value, "start_objective": start_value, "evaluations": float(problem.evaluations),
             "seconds": time.perf_counter() - t0, "stopped_early": stopped}
    if spec.objective == "direct" and math.isfinite(value):
        # The objective already is E of this schedule on the fit subset: no second solve (the heuristics and the
        # one-shot peers are most of a search's trials, and their scoring most of their time).
        return _record(spec, denoiser, bank, best, batch_size, {**extra, "fit_error": value},
                       parts=("select", "test"))
    return _record(spec, denoiser, bank, best, batch_size, extra, fit=direct_fit)


def _deadline(t0: float, trial_seconds: float | None, deadline: float | None) -> float | None:
    """The earlier of the trial's and the search's budgets, on the `time.perf_counter()` clock of `Problem`."""
    limits = [t0 + trial_seconds] if trial_seconds is not None else []
    if deadline is not None:
        limits.append(t0 + (deadline - time.time()))
    return min(limits) if limits else None


def _record(spec: TrialSpec, denoiser: Denoiser, bank: Bank, schedule: Schedule, batch_size: int | None,
            extra: dict[str, float], *, parts: tuple[str, ...] = ("fit", "select", "test"),
            fit: Bank | None = None) -> TrialRecord:
    named = Schedule(schedule.sigmas, name=spec.label)
    scores = score_schedule(denoiser, bank, named, solver=spec.solver, batch_size=batch_size, parts=parts, fit=fit)
    metrics = {**scores, **extra}
    return TrialRecord(spec=spec, state="COMPLETE", metrics=metrics, schedule=named)

