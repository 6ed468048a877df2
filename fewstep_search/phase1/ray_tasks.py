"""The Ray task executor of the Phase-1 engine: the cheap trials as plain Ray tasks, in parallel.

Why not Tune for these: a heuristic, a DP or a one-shot peer optimizes in well under a second and is scored in
about a second, while Tune spends about a second of its own per trial even with reused actors, and a fresh
actor imports torch again. A Ray task costs milliseconds to schedule, and a task worker keeps its imports and its
cached model (`ModelSource.load`) from one trial to the next. What a trial does in the worker is the Tune
trainable's (`ray_worker.execute_trial`), so both tiers produce the same records. No pruning: cheap trials are
never stopped early. A failing trial is resubmitted `max_failures` times, then recorded FAIL with its error line.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fewstep_search.bank import Bank
from fewstep_search.bank.shared import SharedBank
from fewstep_search.models.source import ModelSource
from fewstep_search.phase1.engine import OnRecord, TrialContext, one_line_error
from fewstep_search.phase1.ray_worker import (
    check_executor_args,
    execute_trial,
    trial_resources,
    validate_in_driver,
    worker_context,
)
from fewstep_search.phase1.trials import TrialRecord, TrialSpec
from fewstep_search.ray_runtime import ray_session

__all__ = ["RayTaskExecutor"]


def _run_one(trial: dict[str, Any], bank: SharedBank, model: ModelSource, context: dict[str, Any]) -> dict[str, Any]:
    """The task body: one trial, returned as its report (plain data)."""
    return execute_trial(TrialSpec.from_dict(trial), bank=bank, model=model, context=context).to_report()


def _cause(exc: BaseException) -> BaseException:
    """The trial's own exception inside Ray's wrapper (`RayTaskError.cause`), for a one-line message."""
    return getattr(exc, "cause", None) or exc


class RayTaskExecutor:
    """Trials as Ray tasks, `workers` at a time (see the module docstring); same arguments as `RayTuneExecutor`."""

    def __init__(self, *, workers: int | None = None, address: str | None = None, max_failures: int = 1,
                 cpus_per_trial: float = 1.0, gpus_per_trial: float = 0.25) -> None:
        check_executor_args(workers=workers, max_failures=max_failures, cpus_per_trial=cpus_per_trial,
                            gpus_per_trial=gpus_per_trial)
        self.workers, self.address, self.max_failures = workers, address, max_failures
        self.cpus_per_trial, self.gpus_per_trial = cpus_per_trial, gpus_per_trial

    def run(self, specs: Sequence[TrialSpec], *, bank: Bank, model: ModelSource, context: TrialContext,
            on_record: OnRecord) -> None:
        import ray

        validate_in_driver(specs, context)
        ctx = worker_context(context, cpus_per_trial=self.cpus_per_trial, pruning=None)
        res = trial_resources(context.device, cpus=self.cpus_per_trial, gpus=self.gpus_per_trial)
        with ray_session(workers=self.workers, address=self.address):
            task = ray.remote(_run_one).options(num_cpus=res["cpu"], num_gpus=res.get("gpu", 0), max_retries=0)
            shared = ray.put(SharedBank.of(bank.for_trials()))
            source = model.on(context.device)
            pending: dict[Any, tuple[TrialSpec, int]] = {}

            def submit(spec: TrialSpec, attempt: int) -> None:
                pending[task.remote(spec.to_dict(), shared, source, ctx)] = (spec, attempt)

            for spec in specs:
                submit(spec, 1)
            while pending:
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                spec, attempt = pending.pop(ref)
                try:
                    data = ray.get(ref)
                except Exception as exc:  # a trial's failure is retried, then recorded; the search goes on
                    if attempt <= self.max_failures:
                        submit(spec, attempt + 1)
                    else:
                        on_record(TrialRecord(spec=spec, state="FAIL", error=one_line_error(_cause(exc)),
                                              attempts=attempt))
                    continue
                data["attempts"] = attempt
                on_record(TrialRecord.from_report(data))
