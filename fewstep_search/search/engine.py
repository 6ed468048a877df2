"""The Ray Tune engine of the Phase-1 search: one Tune trial per `TrialSpec`, run in parallel.

Thin by design (DESIGN.md section 3): the math is `fewstep_search.search.trials.run_trial`; this module only
* starts Ray locally (`ray.init(num_cpus=workers, include_dashboard=False)`, quiet logs) or attaches to a
  cluster (`address`), and shuts down only a Ray it started;
* ships the bank to the workers once through the object store (`tune.with_parameters`) and the model as a
  `ModelSource` (a registry spec loaded in the worker, or the picklable model itself);
* runs a Tune experiment (`reuse_actors=True`, concurrency = `workers` or the cluster's CPUs, failed trials
  retried by `FailureConfig(max_failures)`);
* hands every finished trial, complete or failed after its retries, to `on_record` in the driver, as it
  arrives.

Custom optimizers (not in the registry) travel with the trainable: `extra_optimizers={"name": factory}`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fewstep_search.bank import Bank
from fewstep_search.models.base import Denoiser
from fewstep_search.search.trials import OptimizerFactory, TrialRecord, TrialSpec, run_trial

__all__ = ["ModelSource", "run_search"]

_QUIET_ENV = {
    "RAY_AIR_NEW_OUTPUT": "0",  # the legacy reporter is silent at verbose=0; the new one prints a config box
    "TUNE_PRINT_ALL_TRIAL_ERRORS": "0",  # failures are reported once, in our table and the Optuna record
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",  # no CSV/JSON/TensorBoard per trial: Optuna is the record
    "RAY_DEDUP_LOGS": "1",
}
_MODEL_CACHE: dict[str, Denoiser] = {}


@dataclass(frozen=True)
class ModelSource:
    """How a worker obtains the denoiser.

    Either a registry spec (`kind`, `path`, `factory`, `options`, `device`, `base_dir` for relative paths; see
    `fewstep_search.models.loading`),
    loaded once per worker process and cached (what built-in models use: nothing big crosses the wire), or a
    picklable `denoiser` object sent once through the object store with the bank.
    """

    kind: str | None = None
    path: str | None = None
    factory: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    base_dir: str | None = None
    denoiser: Denoiser | None = None

    def __post_init__(self) -> None:
        if (self.kind is None) == (self.denoiser is None):
            raise ValueError("a ModelSource needs exactly one of a model kind (spec) or a denoiser object")

    @classmethod
    def of(cls, denoiser: Denoiser) -> ModelSource:
        return cls(denoiser=denoiser)

    def load(self) -> Denoiser:
        """The denoiser (loaded on first use in this process, then cached)."""
        if self.denoiser is not None:
            return self.denoiser
        key = json.dumps(
            [self.kind, self.path, self.factory, dict(self.options), self.device, self.base_dir],
            sort_keys=True,
        )
        if key not in _MODEL_CACHE:
            from fewstep_search.models.loading import load_model

            _MODEL_CACHE[key] = load_model(
                self.kind or "",
                path=self.path,
                factory=self.factory,
                options=dict(self.options),
                device=self.device,
                base_dir=self.base_dir,
            )
        return _MODEL_CACHE[key]


def _trainable(config: dict[str, Any], *, bank: Bank, model: ModelSource, context: dict[str, Any]) -> None:
    """The Tune function trainable: one trial, reported once."""
    import torch
    from ray import tune

    torch.set_num_threads(context["threads"])
    record = run_trial(
        TrialSpec.from_dict(config["trial"]),
        bank=bank,
        denoiser=model.load(),
        nfe=context["nfe"],
        solver=context["solver"],
        batch_size=context["batch_size"],
        extra_optimizers=context["extra_optimizers"],
    )
    # The scores as Tune metrics (its result table), and the whole record (schedule included) as JSON.
    tune.report({**dict(record.metrics), "record": json.dumps(record.to_report())})


def _trial_name(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def _last_error_line(trial: Any) -> str:
    """The exception line of the trial's error file (Tune writes the worker's traceback there)."""
    try:
        lines = [ln for ln in Path(trial.error_file).read_text().splitlines() if ln.strip()]
    except (OSError, TypeError):
        return "trial failed (no error file)"
    return lines[-1].strip() if lines else "trial failed"


def _collector(on_record: Callable[[TrialRecord], None]) -> Any:
    """A Tune callback turning finished trials into `TrialRecord`s for `on_record` (runs in the driver)."""
    from ray import tune

    class Collector(tune.Callback):
        def __init__(self, handler: Callable[[TrialRecord], None]) -> None:
            self.on_record: Callable[[TrialRecord], None] | None = handler

        def __getstate__(self) -> dict[str, Any]:
            # Tune pickles its run config (for its own restore); the handler (tables, a study) stays here.
            return {"on_record": None}

        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            if self.on_record is None:
                return
            data = json.loads(trial.last_result["record"])
            data["attempts"] = int(trial.num_failures) + 1
            self.on_record(TrialRecord.from_report(data))

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            if self.on_record is None:
                return
            spec = TrialSpec.from_dict(trial.config["trial"])
            self.on_record(
                TrialRecord(
                    spec=spec, state="FAIL", error=_last_error_line(trial), attempts=int(trial.num_failures)
                )
            )

    return Collector(on_record)  # no closure: Tune pickles its callbacks (see __getstate__)


@contextlib.contextmanager
def _ray_session(*, workers: int | None, address: str | None) -> Iterator[None]:
    """Use a running Ray, attach to `address`, or start a local one with `workers` CPUs; stop only our own."""
    import ray

    started = False
    if not ray.is_initialized():
        if address is not None:
            ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
        else:
            ray.init(
                num_cpus=workers,
                include_dashboard=False,
                logging_level=logging.ERROR,
                log_to_driver=False,
                configure_logging=True,
            )
        started = True
    try:
        yield
    finally:
        if started:
            ray.shutdown()


@contextlib.contextmanager
def _quiet_env() -> Iterator[None]:
    """Set the `_QUIET_ENV` variables the user has not set, for the search only (restored after)."""
    added = {k: v for k, v in _QUIET_ENV.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


@contextlib.contextmanager
def _quiet_tune_loggers() -> Iterator[None]:
    """Tune logs each trial failure and a final 'Trials did not complete' at ERROR; our table reports them."""
    loggers = [logging.getLogger(n) for n in ("ray.tune", "ray.train", "ray.air")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, levels, strict=True):
            lg.setLevel(lvl)


def run_search(
    trials: Sequence[TrialSpec],
    *,
    bank: Bank,
    model: ModelSource,
    nfe: int,
    workers: int | None = None,
    address: str | None = None,
    max_failures: int = 1,
    cpus_per_trial: float = 1.0,
    solver: str = "ddim",
    batch_size: int | None = None,
    extra_optimizers: Mapping[str, OptimizerFactory] | None = None,
    on_record: Callable[[TrialRecord], None] | None = None,
    storage_path: str | Path | None = None,
    name: str = "phase1",
) -> list[TrialRecord]:
    """Run `trials` as a Ray Tune experiment; returns every finished trial's record (completion order).

    Args:
        workers: concurrent trials; a local Ray gets this many CPUs (default: all). None with `address`:
            as many as the cluster's CPUs allow.
        address: a Ray cluster to attach to (e.g. "auto" or "ray://host:10001"); its workers need this
            package installed.
        max_failures: retries of a failing trial before it is recorded FAIL (the search goes on either way).
        cpus_per_trial: CPUs reserved per trial (also torch's thread count in the worker).
        on_record: called in the driver with each finished record, as it arrives (tables, the Optuna record).
        storage_path: where Tune keeps its experiment files (default: Ray's ~/ray_results).
    """
    if not trials:
        raise ValueError("no trials to run")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if max_failures < 0:
        raise ValueError(f"max_failures must be >= 0, got {max_failures}")
    if cpus_per_trial <= 0:
        raise ValueError(f"cpus_per_trial must be > 0, got {cpus_per_trial}")
    for spec in trials:  # fail in the driver, before any worker starts
        spec.validate(extra_optimizers=extra_optimizers)

    from ray import tune

    records: list[TrialRecord] = []

    def collect(record: TrialRecord) -> None:
        records.append(record)
        if on_record is not None:
            on_record(record)

    context = {
        "nfe": nfe,
        "solver": solver,
        "batch_size": batch_size,
        "threads": max(1, int(cpus_per_trial)),
        "extra_optimizers": dict(extra_optimizers or {}),
    }
    lean = dataclasses.replace(bank, states=None)  # trials never read the trajectory states: half the bytes
    with _quiet_env(), _ray_session(workers=workers, address=address):
        trainable = tune.with_resources(
            tune.with_parameters(_trainable, bank=lean, model=model, context=context), {"cpu": cpus_per_trial}
        )
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search([s.to_dict() for s in trials])},
            tune_config=tune.TuneConfig(
                num_samples=1,
                max_concurrent_trials=workers,
                reuse_actors=True,
                trial_name_creator=_trial_name,
                trial_dirname_creator=_trial_name,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=None if storage_path is None else str(Path(storage_path).resolve()),
                failure_config=tune.FailureConfig(max_failures=max_failures),
                callbacks=[_collector(collect)],
                verbose=0,
            ),
        )
        with _quiet_tune_loggers():
            tuner.fit()
    return records
