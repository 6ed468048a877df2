"""The Phase-1 engine: one way to run a set of trials and pick a winner, with two executors.

`run_phase1(specs, bank=..., model=..., context=..., executor=...)` skips trials already finished (resume), hands
the rest to an executor, and selects the winner on select E (`select`). The executors run the same
`fewstep_search.phase1.trials.run_trial` and produce the same `TrialRecord`s (one metrics schema):

* `InProcessExecutor`: trials one after another in this process (the library call `optimize_schedule`, tests,
  tiny models). Costly trials are stopped early by Optuna's successive-halving pruner on the select error.
* `RayTuneExecutor` (`fewstep_search.phase1.ray_tune`): trials in parallel on a local Ray or a cluster, stopped
  early by Ray Tune's ASHA scheduler on the same metric.

Both freeze the model's weights during the search (gradients flow to sigma only) and move the bank to the
model's device once.
"""

from __future__ import annotations

import dataclasses
import math
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from fewstep_search.bank import Bank
from fewstep_search.models.source import ModelSource, frozen_weights
from fewstep_search.phase1.registry import OptimizerFactory
from fewstep_search.phase1.select import (
    DEFAULT_TIE_TOLERANCE,
    best_heuristic,
    best_starts,
    by_start_quality,
    candidate_row,
    select_winner,
)
from fewstep_search.phase1.trials import BEST_START, Progress, TrialRecord, TrialSpec, run_trial
from fewstep_search.study.search import PruningSpec

__all__ = ["TrialContext", "Executor", "InProcessExecutor", "TieredExecutor", "Phase1Result", "run_phase1",
           "past_deadline"]

OnRecord = Callable[[TrialRecord], None]


@dataclass(frozen=True)
class TrialContext:
    """What every trial of one search shares besides the bank and the model."""

    nfe: int
    batch_size: int | None = None
    fit_trajectories: int | None = None
    """The true-error objective solves this many fit trajectories per evaluation (None: all of them)."""
    trial_seconds: float | None = None
    """Wall-time budget of each costly trial (None: only the optimizers' own budgets)."""
    search_seconds: float | None = None
    """Wall-time budget of the whole `run_phase1` call (None: none); run_phase1 turns it into `deadline`."""
    deadline: float | None = None
    """`time.time()` after which no costly trial starts and running ones end (set by run_phase1)."""
    starts: Mapping[str, list[float]] = field(default_factory=dict)
    """Schedules for start "best" (`select.best_starts` of the cheap trials); run_phase1 fills it in."""
    device: str = "cpu"
    extra_optimizers: Mapping[str, OptimizerFactory] = field(default_factory=dict)


class Executor(Protocol):
    """Runs trials and hands each finished record (COMPLETE or FAIL) to `on_record` as it arrives."""

    def run(self, specs: Sequence[TrialSpec], *, bank: Bank, model: ModelSource, context: TrialContext,
            on_record: OnRecord) -> None: ...


def past_deadline(deadline: float | None) -> bool:
    """Whether the search's wall-time budget is spent (`deadline` is a `time.time()`, comparable across hosts)."""
    return deadline is not None and time.time() >= deadline


def one_line_error(exc: BaseException) -> str:
    """`Type: message` of an exception, first line only (what a FAIL record and a table show)."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


class InProcessExecutor:
    """Trials one after another in this process, retried `max_failures` times, costly ones pruned.

    Pruning: each costly trial is a trial of an in-memory Optuna study with a `SuccessiveHalvingPruner`
    (min resource `pruning.grace` reports, reduction factor `pruning.factor`); it reports the select E of its
    best schedule every `pruning.report_every` evaluations and stops when the pruner says so.
    """

    def __init__(self, *, pruning: PruningSpec | None = None, max_failures: int = 0) -> None:
        if max_failures < 0:
            raise ValueError(f"max_failures must be >= 0, got {max_failures}")
        self.pruning, self.max_failures = pruning, max_failures

    def _pruned_progress(self, study: Any) -> tuple[Any, Progress]:
        from fewstep_search.phase1._optuna import quiet_optuna

        with quiet_optuna():
            trial = study.ask()

        def progress(step: int, report: dict[str, Any]) -> bool:
            with quiet_optuna():
                trial.report(float(report["metrics"]["select_error"]), step)
                return not trial.should_prune()

        return trial, progress

    def run(self, specs: Sequence[TrialSpec], *, bank: Bank, model: ModelSource, context: TrialContext,
            on_record: OnRecord) -> None:
        den = model.load()
        dev_bank = bank.for_trials().to(context.device)
        study = self._study() if self.pruning is not None and self.pruning.enabled else None
        with frozen_weights(den):
            for spec in specs:
                if spec.is_costly and past_deadline(context.deadline):
                    continue  # not run: run_phase1 lists it
                trial, progress = self._pruned_progress(study) if (study is not None and spec.is_costly) else (
                    None, None)
                record = self._attempts(spec, dev_bank, den, context, progress)
                if trial is not None:
                    self._tell(study, trial, record)
                on_record(record)

    def _attempts(self, spec: TrialSpec, bank: Bank, den: Any, context: TrialContext,
                  progress: Progress | None) -> TrialRecord:
        error = ""
        for attempt in range(1, self.max_failures + 2):
            try:
                rec = run_trial(spec, bank=bank, denoiser=den, nfe=context.nfe, batch_size=context.batch_size,
                                fit_trajectories=context.fit_trajectories, trial_seconds=context.trial_seconds,
                                deadline=context.deadline, starts=context.starts,
                                extra_optimizers=context.extra_optimizers, progress=progress,
                                report_every=self.pruning.report_every if self.pruning else 10)
                return TrialRecord(spec=rec.spec, state=rec.state, metrics=rec.metrics, schedule=rec.schedule,
                                   attempts=attempt)
            except Exception as exc:  # a trial's failure is recorded, the search goes on
                error = one_line_error(exc)
                if _debug():
                    traceback.print_exc()
        return TrialRecord(spec=spec, state="FAIL", error=error, attempts=self.max_failures + 1)

    def _study(self) -> Any:
        from fewstep_search.phase1._optuna import quiet_optuna

        assert self.pruning is not None
        with quiet_optuna() as optuna:
            pruner = optuna.pruners.SuccessiveHalvingPruner(
                min_resource=self.pruning.grace, reduction_factor=self.pruning.factor
            )
            return optuna.create_study(direction="minimize", pruner=pruner,
                                       storage=optuna.storages.InMemoryStorage())

    @staticmethod
    def _tell(study: Any, trial: Any, record: TrialRecord) -> None:
        from fewstep_search.phase1._optuna import quiet_optuna

        with quiet_optuna() as optuna:
            if record.state != "COMPLETE":
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            elif record.stopped_early:
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            else:
                study.tell(trial, record.select_error)


class TieredExecutor:
    """Cheap trials in this process first, then the costly ones on another executor (Ray Tune).

    Why: a heuristic, a DP or a one-shot peer takes milliseconds to a second, less than Tune's own overhead
    per trial; running them in the driver first costs nothing and leaves the workers to the true-error trials.
    """

    def __init__(self, *, costly: Executor, cheap: Executor | None = None) -> None:
        self.costly, self.cheap = costly, cheap or InProcessExecutor()

    def run(self, specs: Sequence[TrialSpec], *, bank: Bank, model: ModelSource, context: TrialContext,
            on_record: OnRecord) -> None:
        cheap = [s for s in specs if not s.is_costly]
        costly = [s for s in specs if s.is_costly]
        if cheap:
            self.cheap.run(cheap, bank=bank, model=model, context=context, on_record=on_record)
        if costly:
            self.costly.run(costly, bank=bank, model=model, context=context, on_record=on_record)


def _debug() -> bool:
    import os

    return bool(os.environ.get("FEWSTEP_DEBUG"))


@dataclass
class Phase1Result:
    """Every trial's record, the winner (lowest select E) and the best heuristic (also picked on select E)."""

    records: list[TrialRecord]
    winner: TrialRecord
    best_heuristic: TrialRecord | None
    resumed: int = 0
    not_run: list[str] = field(default_factory=list)
    """Labels of the costly trials the search's wall-time budget left unstarted (no record: a resume of an
    unfinished round runs them; a finished round is reused as it is)."""

    def rows(self) -> list[dict[str, Any]]:
        """Each complete trial as a row (`select.candidate_row`), test ratios against the best heuristic."""
        return [candidate_row(r, reference=self.best_heuristic) for r in self.records if r.state == "COMPLETE"]

    def failed(self) -> list[dict[str, Any]]:
        return [{"name": r.spec.label, "key": r.spec.key, "trial": r.spec.to_dict(), "error": r.error,
                 "attempts": r.attempts} for r in self.records if r.state == "FAIL"]

    def summary(self) -> dict[str, Any]:
        """The JSON a round writes: the winner, the best heuristic, every candidate and failure."""
        best = candidate_row(self.winner, reference=self.best_heuristic)
        heur = None if self.best_heuristic is None else candidate_row(self.best_heuristic,
                                                                     reference=self.best_heuristic)
        return {"best": best, "best_heuristic": heur, "candidates": self.rows(), "failed": self.failed(),
                "stopped_early": sum(r.stopped_early for r in self.records), "resumed_trials": self.resumed,
                "not_run": list(self.not_run)}


def run_phase1(
    specs: Sequence[TrialSpec],
    *,
    bank: Bank,
    model: ModelSource,
    context: TrialContext,
    executor: Executor,
    previous: Sequence[TrialRecord] = (),
    on_record: OnRecord | None = None,
    tie_tolerance: float = DEFAULT_TIE_TOLERANCE,
    lead_solvers: Sequence[str] = (),
) -> Phase1Result:
    """Run `specs` (those not already COMPLETE in `previous`) and select the winner on select E.

    `previous` are records read back from the run's own Optuna record (resume); only those whose key is one of
    `specs` count. `on_record` sees every new record as it arrives (tables, the Optuna record). Costly trials
    start in `select.by_start_quality` order (`lead_solvers` first), which matters under `context.search_seconds`.
    """
    if not specs:
        raise ValueError("no trials to run")
    wanted = {s.key for s in specs}
    done = [r for r in previous if r.state == "COMPLETE" and r.spec.key in wanted]
    finished = {r.spec.key for r in done}
    todo = [s for s in specs if s.key not in finished]
    records = list(done)

    def collect(record: TrialRecord) -> None:
        records.append(record)
        if on_record is not None:
            on_record(record)

    if context.search_seconds:
        context = dataclasses.replace(context, deadline=time.time() + context.search_seconds)
    # The cheap trials first, so a costly trial that starts from "best" refines the best of them; then the costly
    # ones, most promising start first, so that a wall-time budget cuts the least promising.
    cheap = [s for s in todo if not s.is_costly]
    costly = [s for s in todo if s.is_costly]
    if cheap:
        executor.run(cheap, bank=bank, model=model, context=context, on_record=collect)
    if costly:
        if any(s.start == BEST_START for s in costly):
            context = dataclasses.replace(context, starts={**best_starts(records), **context.starts})
        costly = by_start_quality(costly, records, lead_solvers=lead_solvers)
        executor.run(costly, bank=bank, model=model, context=context, on_record=collect)
    finished_now = {r.spec.key for r in records}
    not_run = [s.label for s in costly if s.key not in finished_now]
    winner = select_winner(records, tie_tolerance=tie_tolerance)
    if not math.isfinite(winner.test_error):
        raise ValueError(f"the winning trial {winner.spec.label} has no finite test error")
    return Phase1Result(records=records, winner=winner, best_heuristic=best_heuristic(records), resumed=len(done),
                        not_run=not_run)
