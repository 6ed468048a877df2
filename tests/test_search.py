"""The Ray Tune search end to end on a tiny mixture: 2 workers, the Optuna record, retries, resume.

One local Ray (2 CPUs) serves the whole module; the engine reuses a running Ray instead of starting its own.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fewstep_search.bank import Bank, build_bank
from fewstep_search.models.mixture import builtin_mixture
from fewstep_search.rundir import RunDir
from fewstep_search.schedules import Schedule
from fewstep_search.search.config import SearchSpec
from fewstep_search.search.engine import ModelSource, run_search
from fewstep_search.search.optimizers import ScheduleOptimizer
from fewstep_search.search.record import OptunaRecord, sqlite_url
from fewstep_search.search.select import select_winner
from fewstep_search.search.trials import TrialRecord, TrialSpec, run_trial
from fewstep_search.study import StudyConfig

NFE = 3
SMALL_TRIALS = [
    {"optimizer": "dp", "objective": "bw", "parameterization": "grid"},
    {
        "optimizer": "adam",
        "objective": "direct",
        "parameterization": "logits",
        "starts": ["vp_time_quadratic"],
        "hyper": {"steps": 8},
    },
    {"optimizer": "tpe", "objective": "direct", "parameterization": "edm_rho", "hyper": {"n_trials": 6}},
]


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def _study(**search: Any) -> StudyConfig:
    return StudyConfig.model_validate(
        {
            "nfe": NFE,
            "model": {"kind": "mixture", "options": {"dim": 8}},
            "bank": {"n_trajectories": 24, "grid_size": 24, "substeps": 1, "probes": 1},
            "search": {
                "workers": 2,
                "heuristics": ["edm", "vp_time_quadratic"],
                "trials": SMALL_TRIALS,
                **search,
            },
        }
    )


@pytest.fixture(scope="module")
def tiny_bank() -> Bank:
    return build_bank(
        builtin_mixture(dim=8),
        shape=(8,),
        sigma_min=0.002,
        sigma_max=80.0,
        n_trajectories=16,
        grid_size=16,
        substeps=1,
        probes=1,
        seed=0,
    )


def test_search_records_every_trial_in_optuna_and_resumes(
    ray_cluster: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import optuna
    from rich.console import Console

    from fewstep_search.search import phase1
    from fewstep_search.search.phase1 import phase1_search, resolve_model_source

    config = _study()
    rundir = RunDir(tmp_path / "run")
    rundir.prepare(config)
    den = builtin_mixture(dim=8)
    console = Console(quiet=True)
    out = phase1_search(
        den,
        config,
        rundir,
        model=resolve_model_source(config, study_path=None),
        console=console,
        progress=False,
    )
    specs = config.search.specs()
    assert len(out.records) == len(specs) == 5
    assert all(r.state == "COMPLETE" for r in out.records)

    # Read the record back through Optuna's own API.
    info = json.loads((rundir.path / "optuna.json").read_text())
    study = optuna.load_study(study_name=info["studies"][0], storage=info["storage"])
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == len(specs)
    assert {t.user_attrs["key"] for t in trials} == {s.key for s in specs}
    for t in trials:
        assert t.state == optuna.trial.TrialState.COMPLETE
        assert t.value == pytest.approx(t.user_attrs["heldout_error"])
        assert {"bw", "b0", "fit_error", "seconds", "evaluations"} <= set(t.user_attrs)
        assert len(t.user_attrs["sigmas"]) == NFE + 1
        assert t.params["optimizer"] == t.user_attrs["spec"]["optimizer"]
    assert study.best_value == pytest.approx(out.metrics["best"]["heldout_error"])

    # The round: the winner's schedule, every candidate, and the winner is never worse than a heuristic.
    best = json.loads((rundir.round_dir(1) / "schedule.json").read_text())
    assert Schedule.from_dict(best).nfe == NFE
    heur = min(c["heldout_error"] for c in out.metrics["candidates"] if c["kind"] == "heuristic")
    assert best["heldout_error"] <= heur

    # Resume: with the round gone, every trial comes back from the Optuna record and Ray is not used.
    (rundir.round_dir(1) / "metrics.json").unlink()
    monkeypatch.setattr(phase1, "run_search", lambda *a, **k: pytest.fail("finished trials were rerun"))
    again = phase1_search(
        den,
        config,
        rundir,
        model=resolve_model_source(config, study_path=None),
        console=console,
        progress=False,
    )
    assert again.metrics["best"]["key"] == out.metrics["best"]["key"]
    assert len(again.records) == len(specs)


def _fault_optimizers(marker: Path) -> dict[str, Any]:
    """Optimizers defined in a function, so Ray ships them to the workers by value (cloudpickle)."""

    class FailsOnce(ScheduleOptimizer):
        name = "fails_once"

        def run(self, problem: Any, start: Schedule) -> None:
            if not marker.exists():
                marker.write_text("first attempt failed")
                raise RuntimeError("fails_once: first attempt")

    class AlwaysFails(ScheduleOptimizer):
        name = "always_fails"

        def run(self, problem: Any, start: Schedule) -> None:
            raise RuntimeError("always_fails: broken optimizer")

    return {"fails_once": FailsOnce, "always_fails": AlwaysFails}


def test_a_flaky_trial_is_retried_and_a_broken_one_is_recorded_failed(
    ray_cluster: None, tmp_path: Path, tiny_bank: Bank
) -> None:
    import optuna

    extra = _fault_optimizers(tmp_path / "marker")
    specs = [
        TrialSpec(optimizer="fails_once", objective="direct", start="edm"),
        TrialSpec(optimizer="always_fails", objective="direct", start="edm"),
        TrialSpec(optimizer="none", objective="direct", start="vp_time_quadratic"),
    ]
    record = OptunaRecord(sqlite_url(tmp_path / "optuna.db"), "faults", optimizers=extra)
    records = run_search(
        specs,
        bank=tiny_bank,
        model=ModelSource.of(builtin_mixture(dim=8)),
        nfe=NFE,
        workers=2,
        max_failures=1,
        extra_optimizers=extra,
        on_record=record.add,
        name="faults",
        storage_path=tmp_path / "tune",
    )
    by_name = {r.spec.optimizer: r for r in records}
    assert by_name["fails_once"].state == "COMPLETE" and by_name["fails_once"].attempts == 2
    assert by_name["always_fails"].state == "FAIL" and by_name["always_fails"].attempts == 2
    assert "always_fails: broken optimizer" in (by_name["always_fails"].error or "")
    assert by_name["none"].state == "COMPLETE"

    study = optuna.load_study(study_name="faults", storage=sqlite_url(tmp_path / "optuna.db"))
    states = {t.user_attrs["spec"]["optimizer"]: t.state for t in study.trials}
    assert states == {
        "fails_once": optuna.trial.TrialState.COMPLETE,
        "always_fails": optuna.trial.TrialState.FAIL,
        "none": optuna.trial.TrialState.COMPLETE,
    }
    failed = next(t for t in study.trials if t.state == optuna.trial.TrialState.FAIL)
    assert "broken optimizer" in failed.user_attrs["error"]
    assert select_winner(records).spec.optimizer in {"fails_once", "none"}
    assert {r.spec.key for r in record.records()} == {s.key for s in specs}


@pytest.mark.parametrize("command", ["search", "run"])
def test_search_and_run_commands_write_the_best_schedule(
    ray_cluster: None, tmp_path: Path, command: str
) -> None:
    from fewstep_search.cli import main

    study = tmp_path / "study.toml"
    study.write_text(
        'nfe = 5\n[model]\nkind = "mixture"\noptions = { dim = 8 }\n'
        "[bank]\nn_trajectories = 16\ngrid_size = 16\nsubsteps = 1\nprobes = 1\n"
        '[search]\nheuristics = ["edm", "log_uniform"]\n'
        '[[search.trials]]\noptimizer = "dp"\nparameterization = "grid"\n'
    )
    out = tmp_path / "run"
    argv = [command, "--budget", "3", "--study", str(study), "--out", str(out), "--workers", "2", "--quiet"]
    assert main(argv) == 0
    best = json.loads((out / "best" / "schedule.json").read_text())
    assert best["nfe"] == 3 and len(best["sigmas"]) == 4
    assert (out / "optuna.db").is_file() and (out / "round_1" / "metrics.json").is_file()
    metrics = json.loads((out / "round_1" / "metrics.json").read_text())
    assert metrics["engine"] == "ray" and len(metrics["candidates"]) == 3


# ---------------------------------------------------------------- no Ray needed


def test_trial_specs_validate_in_the_driver() -> None:
    with pytest.raises(ValueError, match="additive"):
        TrialSpec(optimizer="dp", objective="direct", parameterization="grid").validate()
    with pytest.raises(ValueError, match="unknown start"):
        TrialSpec(optimizer="adam", start="zigzag").validate()
    with pytest.raises(ValueError, match="search.trials"):
        StudyConfig.model_validate({"search": {"trials": [{"optimizer": "nope"}]}})


def test_run_trial_in_process_reports_every_metric(tiny_bank: Bank) -> None:
    rec = run_trial(
        TrialSpec(optimizer="adam", objective="bw", hyper={"steps": 3}),
        bank=tiny_bank,
        denoiser=builtin_mixture(dim=8),
        nfe=NFE,
    )
    assert rec.state == "COMPLETE" and rec.schedule is not None and rec.schedule.nfe == NFE
    assert {
        "heldout_error",
        "fit_error",
        "bw",
        "b0",
        "fit_objective",
        "start_objective",
        "evaluations",
        "seconds",
    } <= set(rec.metrics)
    assert TrialRecord.from_report(json.loads(json.dumps(rec.to_report()))).spec == rec.spec


def test_ties_go_to_the_cheaper_trial() -> None:
    def rec(opt: str, e: float, s: float) -> TrialRecord:
        return TrialRecord(
            spec=TrialSpec(optimizer=opt), state="COMPLETE", metrics={"heldout_error": e, "seconds": s}
        )

    records = [
        rec("adam", 0.5000, 3.0),
        rec("lbfgsb", 0.50001, 0.5),
        rec("tpe", 0.52, 0.1),
        TrialRecord(spec=TrialSpec(optimizer="cmaes"), state="FAIL", error="x"),
    ]
    assert select_winner(records).spec.optimizer == "lbfgsb"
    assert select_winner(records, tie_tolerance=0).spec.optimizer == "adam"
    with pytest.raises(ValueError, match="no trial finished"):
        select_winner(records[-1:])


def test_default_search_spec_covers_every_optimizer_family() -> None:
    from fewstep_search.search.optimizers import OPTIMIZERS

    specs = SearchSpec().specs()
    assert {s.optimizer for s in specs} == set(OPTIMIZERS)
    assert len({s.key for s in specs}) == len(specs)
