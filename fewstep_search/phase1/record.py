"""The Optuna record of a search: every trial, whatever optimizer ran it, as one trial of an Optuna study.

Layout of a recorded trial (what `optuna-dashboard` shows):
* params: `objective`, `parameterization`, `optimizer`, `start`, `solver` (categorical over the registries' names);
* value: select E, the selection metric (direction: minimize); FAIL trials have no value;
* user attributes: `select_error`, `test_error` (the reported number), `fit_error`, `bw`, `b0`, `fit_objective`,
  `start_objective`, `evaluations`, `seconds`, `stopped_early`, `sigmas` (the schedule), `key`, `label`, `spec`
  (the full trial spec, hyper-parameters included), `attempts`, and `error` for failed trials.

The driver adds trials as Tune results arrive (`study.add_trial(optuna.trial.create_trial(...))`), so the
storage is written by one process only; sqlite in the run directory by default, any Optuna storage URL by
option. `records()` reads them back, which is how an interrupted search resumes without rerunning finished
trials.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from fewstep_search.phase1._optuna import quiet_optuna
from fewstep_search.phase1.trials import METRIC_KEYS, TrialRecord, TrialSpec
from fewstep_search.schedules import SCHEDULE_FAMILIES, Schedule
from fewstep_search.solvers import SOLVERS

__all__ = ["OptunaRecord", "sqlite_url", "without_password"]


def without_password(url: str) -> str:
    """A storage URL safe to write down and print (a database password is never written to the run folder)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def sqlite_url(path: str | Path) -> str:
    """The Optuna storage URL of a sqlite file (absolute, so the dashboard can run from anywhere)."""
    return f"sqlite:///{Path(path).expanduser().resolve()}"


class OptunaRecord:
    """An Optuna study that records search trials (see the module docstring).

    Args:
        storage: an Optuna storage URL (e.g. `sqlite_url(DIR / "optuna.db")`, `postgresql://...`).
        study_name: created if missing, reused if present (resume).
        optimizers: every optimizer name that may be recorded (the categorical choices must not change).
        attrs: study-level user attributes (nfe, model, bank settings), for the dashboard.
    """

    def __init__(
        self, storage: str, study_name: str, *, optimizers: Iterable[str], attrs: dict[str, Any] | None = None
    ) -> None:
        from fewstep_search.phase1.parameterizations import PARAMETERIZATIONS
        from fewstep_search.phase1.problem import OBJECTIVES
        from fewstep_search.phase1.registry import OPTIMIZERS

        with quiet_optuna() as optuna:
            self.study = optuna.create_study(
                storage=storage, study_name=study_name, direction="minimize", load_if_exists=True
            )
            self.study.set_metric_names(["select_E"])
            for k, v in (attrs or {}).items():
                self.study.set_user_attr(k, v)
        self.storage, self.study_name = storage, study_name
        self.public_storage = without_password(storage)
        self._choices = {
            "objective": tuple(OBJECTIVES),
            "parameterization": tuple(PARAMETERIZATIONS),
            "optimizer": tuple(sorted(set(OPTIMIZERS) | set(optimizers))),
            "start": tuple(SCHEDULE_FAMILIES),
            "solver": tuple(s for s in SOLVERS if s != "reference"),
        }

    def add(self, record: TrialRecord) -> int:
        """Record one finished trial (COMPLETE or FAIL); returns its Optuna trial number."""
        with quiet_optuna() as optuna:
            spec = record.spec
            attrs: dict[str, Any] = {
                "key": spec.key,
                "label": spec.label,
                "spec": spec.to_dict(),
                "attempts": record.attempts,
            }
            attrs.update({k: float(v) for k, v in record.metrics.items() if k in METRIC_KEYS})
            if record.schedule is not None:
                attrs["sigmas"] = [float(s) for s in record.schedule.sigmas]
            if record.error is not None:
                attrs["error"] = record.error
            params = {k: getattr(spec, k) for k in self._choices}
            dists = {k: optuna.distributions.CategoricalDistribution(v) for k, v in self._choices.items()}
            if any(params[k] not in dists[k].choices for k in params):
                params, dists = {}, {}  # a name outside the registries: keep it in the user attributes only
            complete = record.state == "COMPLETE"
            trial = optuna.trial.create_trial(
                state=optuna.trial.TrialState.COMPLETE if complete else optuna.trial.TrialState.FAIL,
                value=record.select_error if complete else None,
                params=params,
                distributions=dists,
                user_attrs=attrs,
            )
            try:
                self.study.add_trial(trial)
            except ValueError:  # a study created with other categorical choices: record without params
                trial = optuna.trial.create_trial(state=trial.state, value=trial.value, user_attrs=attrs)
                self.study.add_trial(trial)
        return len(self.study.trials) - 1

    def records(self) -> list[TrialRecord]:
        """Every recorded trial, rebuilt from the study (COMPLETE and FAIL; running ones are skipped)."""
        with quiet_optuna() as optuna:
            states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
            trials = self.study.get_trials(deepcopy=False, states=states)
        out = []
        for t in trials:
            a = t.user_attrs
            if "spec" not in a:
                continue  # not written by this record
            spec = TrialSpec.from_dict(a["spec"])
            metrics = {
                k: float(a[k]) for k in METRIC_KEYS if k in a and a[k] is not None and math.isfinite(a[k])
            }
            sched = Schedule(a["sigmas"], name=spec.label) if a.get("sigmas") else None
            out.append(
                TrialRecord(
                    spec=spec,
                    state="COMPLETE" if t.state.name == "COMPLETE" else "FAIL",
                    metrics=metrics,
                    schedule=sched,
                    error=a.get("error"),
                    attempts=int(a.get("attempts", 1)),
                )
            )
        return out
