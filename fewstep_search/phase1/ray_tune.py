"""The Ray Tune executor of the Phase-1 engine: one Tune trial per `TrialSpec`, run in parallel.

Thin by design (docs/design.md section 3): the math is `fewstep_search.phase1.trials.run_trial`; this module only
* runs inside `fewstep_search.ray_runtime.ray_session` (a no-op when the loop already started Ray for the run);
* ships the bank to the workers once through the object store (`tune.with_parameters`, as numpy arrays that
  every worker maps without a copy: `fewstep_search.bank.shared`; large states dropped) and
  the model as a `ModelSource` (loaded and cached in the worker by spec and checkpoint hash);
* reserves `{"cpu": cpus_per_trial}`, plus `{"gpu": gpus_per_trial}` when the device is a GPU;
* runs a Tune experiment (`reuse_actors=True`, concurrency = `workers`, failed trials retried by
  `FailureConfig(max_failures)`), with ASHA stopping costly trials early on their reported select E;
* hands every finished trial (complete, stopped early, or failed after its retries) to `on_record` in the
  driver as it arrives.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fewstep_search.bank import Bank
from fewstep_search.bank.shared import SharedBank
from fewstep_search.models.source import ModelSource
from fewstep_search.phase1.engine import OnRecord, TrialContext, past_deadline
from fewstep_search.phase1.ray_worker import (
    check_executor_args,
    execute_trial,
    trial_resources,
    validate_in_driver,
    worker_context,
)
from fewstep_search.phase1.trials import TrialRecord, TrialSpec
from fewstep_search.ray_runtime import ray_session
from fewstep_search.study.search import PruningSpec

__all__ = ["RayTuneExecutor"]

_FINAL = "final"
"""Key of the last report of a trial that ran to its end (absent when the scheduler stopped it)."""
_NOT_RUN = "not_run"
"""Key of the one report of a trial that found the search's wall-time budget spent (it leaves no record)."""


def _trainable(config: dict[str, Any], *, bank: SharedBank, model: ModelSource, context: dict[str, Any]) -> None:
    """The Tune function trainable: one trial; intermediate reports for costly trials, then the final one."""
    from ray import tune

    spec = TrialSpec.from_dict(config["trial"])
    if spec.is_costly and past_deadline(context["deadline"]):
        tune.report({"select_error": float("inf"), _NOT_RUN: 1, _FINAL: 1})  # the search's budget is spent
        return

    def progress(step: int, report: dict[str, Any]) -> bool:
        tune.report({**report["metrics"], "record": json.dumps(report)})
        return True  # ASHA stops the trial from outside

    record = execute_trial(spec, bank=bank, model=model, context=context,
                           progress=progress if context["pruning"] else None)
    tune.report({**dict(record.metrics), "record": json.dumps(record.to_report()), _FINAL: 1})


def _trial_name(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def _last_error_line(trial: Any) -> str:
    """The exception line of the trial's error file (Tune writes the worker's traceback there)."""
    try:
        lines = [ln for ln in Path(trial.error_file).read_text().splitlines() if ln.strip()]
    except (OSError, TypeError):
        return "trial failed (no error file)"
    return lines[-1].strip() if lines else "trial failed"


def _collector(on_record: OnRecord) -> Any:
    """A Tune callback turning finished trials into `TrialRecord`s for `on_record` (runs in the driver)."""
    from ray import tune

    class Collector(tune.Callback):
        def __init__(self, handler: OnRecord) -> None:
            self.on_record: OnRecord | None = handler

        def __getstate__(self) -> dict[str, Any]:
            # Tune pickles its run config (for its own restore); the handler (tables, a study) stays here.
            return {"on_record": None}

        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            if self.on_record is None or trial.last_result.get(_NOT_RUN):
                return
            data = json.loads(trial.last_result["record"])
            data["attempts"] = int(trial.num_failures) + 1
            self.on_record(TrialRecord.from_report(data))

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            if self.on_record is None:
                return
            spec = TrialSpec.from_dict(trial.config["trial"])
            self.on_record(TrialRecord(spec=spec, state="FAIL", error=_last_error_line(trial),
                                       attempts=int(trial.num_failures)))

    return Collector(on_record)  # no closure: Tune pickles its callbacks (see __getstate__)


class RayTuneExecutor:
    """Trials as a Ray Tune experiment (see the module docstring).

    Args:
        workers: concurrent trials; a local Ray gets this many CPUs (default: all). With `address`: as many as
            the cluster's resources allow.
        address: a Ray cluster to attach to (e.g. "auto"); its workers need this package installed.
        max_failures: retries of a failing trial before it is recorded FAIL (the search goes on either way).
        cpus_per_trial / gpus_per_trial: reserved per trial (CPUs are also torch's thread count in the worker).
        pruning: ASHA on the select error for costly trials (None or disabled: every trial runs to its end).
        storage_path / name: where Tune keeps its experiment files (default: Ray's ~/ray_results).
    """

    def __init__(self, *, workers: int | None = None, address: str | None = None, max_failures: int = 1,
                 cpus_per_trial: float = 1.0, gpus_per_trial: float = 0.25, pruning: PruningSpec | None = None,
                 storage_path: str | Path | None = None, name: str = "phase1") -> None:
        check_executor_args(workers=workers, max_failures=max_failures, cpus_per_trial=cpus_per_trial,
                            gpus_per_trial=gpus_per_trial)
        self.workers, self.address, self.max_failures = workers, address, max_failures
        self.cpus_per_trial, self.gpus_per_trial = cpus_per_trial, gpus_per_trial
        self.pruning, self.storage_path, self.name = pruning, storage_path, name

    def _scheduler(self) -> Any:
        if self.pruning is None or not self.pruning.enabled:
            return None
        from ray.tune.schedulers import ASHAScheduler

        return ASHAScheduler(time_attr="training_iteration", metric="select_error", mode="min",
                             grace_period=self.pruning.grace, reduction_factor=self.pruning.factor, max_t=10_000)

    def run(self, specs: Sequence[TrialSpec], *, bank: Bank, model: ModelSource, context: TrialContext,
            on_record: OnRecord) -> None:
        from ray import tune

        validate_in_driver(specs, context)
        ctx = worker_context(context, cpus_per_trial=self.cpus_per_trial, pruning=self.pruning)
        resources = trial_resources(context.device, cpus=self.cpus_per_trial, gpus=self.gpus_per_trial)
        with ray_session(workers=self.workers, address=self.address):
            trainable = tune.with_resources(
                tune.with_parameters(
                    _trainable, bank=SharedBank.of(bank.for_trials()), model=model.on(context.device), context=ctx
                ),
                resources,
            )
            tuner = tune.Tuner(
                trainable,
                param_space={"trial": tune.grid_search([s.to_dict() for s in specs])},
                tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=self.workers, reuse_actors=True,
                                            scheduler=self._scheduler(), trial_name_creator=_trial_name,
                                            trial_dirname_creator=_trial_name),
                run_config=tune.RunConfig(
                    name=self.name,
                    storage_path=None if self.storage_path is None else str(Path(self.storage_path).resolve()),
                    failure_config=tune.FailureConfig(max_failures=self.max_failures),
                    callbacks=[_collector(on_record)], verbose=0,
                ),
            )
            tuner.fit()
