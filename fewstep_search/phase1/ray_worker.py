"""What one Phase-1 trial does in a Ray worker, whichever executor sent it (a Tune trainable or a plain task).

Kept apart from the executors so both produce the same records from the same code: torch's thread count, the
model loaded once per process (cached by spec and checkpoint hash), the bank as zero-copy views of Ray's object
store, frozen weights, `run_trial`; and the checks both executors make in the driver. No Ray import: plain
Python that runs inside a worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fewstep_search.bank.shared import SharedBank
from fewstep_search.models.source import ModelSource, frozen_weights
from fewstep_search.phase1.engine import TrialContext
from fewstep_search.phase1.trials import TrialRecord, TrialSpec, run_trial
from fewstep_search.study.search import PruningSpec

__all__ = ["trial_resources", "execute_trial", "worker_context", "check_executor_args", "validate_in_driver"]


def check_executor_args(*, workers: int | None, max_failures: int, cpus_per_trial: float,
                        gpus_per_trial: float) -> None:
    """The arguments both Ray executors take, checked once (a one-line ValueError)."""
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if max_failures < 0:
        raise ValueError(f"max_failures must be >= 0, got {max_failures}")
    if cpus_per_trial <= 0 or not 0 < gpus_per_trial <= 1:
        raise ValueError(f"need cpus_per_trial > 0 and 0 < gpus_per_trial <= 1, got {cpus_per_trial}, "
                         f"{gpus_per_trial}")


def validate_in_driver(specs: Sequence[TrialSpec], context: TrialContext) -> None:
    """Every trial's names, checked before any worker starts (a bad trial fails in one line, not in a worker)."""
    for spec in specs:
        spec.validate(budget=context.nfe, extra_optimizers=context.extra_optimizers)


def trial_resources(device: str, *, cpus: float, gpus: float) -> dict[str, float]:
    """What one trial reserves: CPUs, and a GPU share when the search runs on a GPU."""
    res = {"cpu": cpus}
    if device.startswith("cuda"):
        res["gpu"] = gpus
    return res


def execute_trial(spec: TrialSpec, *, bank: SharedBank, model: ModelSource, context: dict[str, Any],
                  progress: Any = None) -> TrialRecord:
    """One trial in a Ray worker (a Tune trainable or a task): threads, the cached model, the bank's views."""
    import torch

    torch.set_num_threads(context["threads"])
    den = model.load()
    dev_bank = bank.bank().to(context["device"])  # zero-copy views of the object store on CPU
    with frozen_weights(den):
        return run_trial(
            spec, bank=dev_bank, denoiser=den, nfe=context["nfe"],
            batch_size=context["batch_size"], fit_trajectories=context["fit_trajectories"],
            trial_seconds=context["trial_seconds"], deadline=context["deadline"], starts=context["starts"],
            extra_optimizers=context["extra_optimizers"],
            progress=progress, report_every=context["report_every"],
        )


def worker_context(context: TrialContext, *, cpus_per_trial: float, pruning: PruningSpec | None) -> dict[str, Any]:
    """What a worker needs of the search's context (plain data: it travels with every trial)."""
    return {"nfe": context.nfe, "batch_size": context.batch_size, "device": context.device,
            "fit_trajectories": context.fit_trajectories, "trial_seconds": context.trial_seconds,
            "deadline": context.deadline, "starts": dict(context.starts),
            "threads": max(1, int(cpus_per_trial)), "extra_optimizers": dict(context.extra_optimizers),
            "pruning": pruning is not None and pruning.enabled,
            "report_every": pruning.report_every if pruning else 10}
