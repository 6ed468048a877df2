"""The Phase-1 search end to end on a tiny mixture: Ray Tune with 2 workers, the Optuna record, retries, resume,
pruning, and the honesty of the three-set split.

One local Ray (2 CPUs) serves the module; the loop and the executor reuse a running Ray instead of starting one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from fewstep_search.bank import Bank, build_bank
from fewstep_search.loop import LoopOptions, run_loop
from fewstep_search.models.mixture import builtin_mixture
from fewstep_search.models.source import ModelSource
from fewstep_search.phase1.engine import InProcessExecutor, TrialContext, run_phase1
from fewstep_search.phase1.optimizers import ScheduleOptimizer
from fewstep_search.phase1.portfolio import baseline_specs, trial_specs
from fewstep_search.phase1.record import OptunaRecord, sqlite_url
from fewstep_search.phase1.select import select_winner
from fewstep_search.phase1.trials import TrialRecord, TrialSpec, run_trial, score_schedule
from fewstep_search.rundir import RunDir
from fewstep_search.schedules import Schedule
from fewstep_search.study import PruningSpec, SearchSpec, StudyConfig

NFE = 3
SMALL_TRIALS = [
    {"optimizer": "dp", "objective": "bw", "parameterization": "grid"},
    {"optimizer": "adam", "objective": "direct", "parameterization": "logits", "starts": ["vp_time_quadratic"],
     "hyper": {"steps": 8}},
    {"optimizer": "tpe", "objective": "direct", "parameterization": "edm_rho", "hyper": {"n_trials": 6}},
]


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def _study(**search: Any) -> StudyConfig:
    return StudyConfig.model_validate({
        "nfe": NFE,
        "rounds": 0,
        "model": {"kind": "mixture", "options": {"dim": 8}},
        "bank": {"n_trajectories": 24, "grid_size": 24, "substeps": 1, "probes": 1},
        "search": {"workers": 2, "heuristics": ["edm", "vp_time_quadratic"], "solvers": ["ddim"],
                   "trials": SMALL_TRIALS, **search},
    })


@pytest.fixture(scope="module")
def tiny_bank() -> Bank:
    return build_bank(builtin_mixture(dim=8), shape=(8,), sigma_min=0.002, sigma_max=80.0, n_trajectories=24,
                      grid_size=16, substeps=1, probes=1, seed=0)


def test_search_records_every_trial_in_optuna_and_resumes(ray_cluster: None, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import optuna

    from fewstep_search.phase1 import ray_tune

    # no wall-time budgets: on a loaded machine the search's budget would leave costly trials unstarted (seen in
    # a CI run beside a benchmark), and this test is about the record, not the budget
    config = _study(seconds=0, trial_seconds=0)
    rundir = RunDir(tmp_path / "run")
    results = run_loop(config, rundir)
    specs = trial_specs(config.search, budget=NFE)
    assert len(specs) == 5

    info = json.loads((rundir.path / "optuna.json").read_text())
    study = optuna.load_study(study_name=info["studies"][0], storage=info["storage"])
    trials = study.get_trials(deepcopy=False)
    assert {t.user_attrs["key"] for t in trials} == {s.key for s in specs}
    for t in trials:
        assert t.state == optuna.trial.TrialState.COMPLETE
        assert t.value == pytest.approx(t.user_attrs["select_error"])  # Optuna's value is the selection metric
        assert {"test_error", "fit_error", "bw", "b0", "seconds", "evaluations"} <= set(t.user_attrs)
        assert len(t.user_attrs["sigmas"]) == NFE + 1
        assert t.params["optimizer"] == t.user_attrs["spec"]["optimizer"]
    assert study.best_value == pytest.approx(results["baselines"]["phase1"]["select_error"])

    best = json.loads((rundir.path / "best" / "schedule.json").read_text())
    assert Schedule.from_dict(best).nfe == NFE and best["round"] == 0
    phase1 = rundir.phase1_result(1)
    assert phase1 is not None
    heur = min(c["select_error"] for c in phase1["candidates"] if c["kind"] == "heuristic")
    assert best["select_error"] <= heur  # heuristics are candidates: the pick is never worse on select E

    # Resume: with the round's summary gone, every trial comes back from the Optuna record, none is rerun.
    (rundir.round_dir(1) / "phase1.json").unlink()
    monkeypatch.setattr(ray_tune.RayTuneExecutor, "run", lambda *a, **k: pytest.fail("finished trials were rerun"))
    again = run_loop(config, rundir)
    assert again["baselines"]["phase1"]["name"] == results["baselines"]["phase1"]["name"]
    assert any("read back from the Optuna record" in n for n in again["notes"])


def test_resume_reads_only_the_runs_own_studies_from_a_shared_storage(tmp_path: Path) -> None:
    storage = sqlite_url(tmp_path / "shared.db")
    config = _study(storage=storage, trials=[SMALL_TRIALS[0]])
    first = run_loop(config, RunDir(tmp_path / "a"), options=LoopOptions(engine="local"))
    second = run_loop(config, RunDir(tmp_path / "b"), options=LoopOptions(engine="local"))
    assert not any("read back" in n for n in second["notes"])  # b ran its own trials
    assert first["run_id"] != second["run_id"]


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


@pytest.mark.parametrize("engine", ["ray", "ray_tasks", "local"])
def test_a_flaky_trial_is_retried_and_a_broken_one_is_recorded_failed(
    ray_cluster: None, tmp_path: Path, tiny_bank: Bank, engine: str
) -> None:
    import optuna

    from fewstep_search.phase1.ray_tune import RayTuneExecutor

    extra = _fault_optimizers(tmp_path / "marker")
    specs = [TrialSpec(optimizer="fails_once", objective="direct", start="edm"),
             TrialSpec(optimizer="always_fails", objective="direct", start="edm"),
             TrialSpec(optimizer="none", objective="direct", start="vp_time_quadratic")]
    record = OptunaRecord(sqlite_url(tmp_path / "optuna.db"), "faults", optimizers=extra)
    from fewstep_search.phase1.ray_tasks import RayTaskExecutor

    executor = {"ray": lambda: RayTuneExecutor(workers=2, max_failures=1, storage_path=tmp_path / "tune",
                                               name="faults"),
                "ray_tasks": lambda: RayTaskExecutor(workers=2, max_failures=1),
                "local": lambda: InProcessExecutor(max_failures=1)}[engine]()
    result = run_phase1(specs, bank=tiny_bank, model=ModelSource.of(builtin_mixture(dim=8)),
                        context=TrialContext(nfe=NFE, extra_optimizers=extra), executor=executor,
                        on_record=record.add)
    by_name = {r.spec.optimizer: r for r in result.records}
    assert by_name["fails_once"].state == "COMPLETE" and by_name["fails_once"].attempts == 2
    assert by_name["always_fails"].state == "FAIL" and by_name["always_fails"].attempts == 2
    assert "always_fails: broken optimizer" in (by_name["always_fails"].error or "")
    study = optuna.load_study(study_name="faults", storage=sqlite_url(tmp_path / "optuna.db"))
    states = {t.user_attrs["spec"]["optimizer"]: t.state for t in study.trials}
    assert states["always_fails"] == optuna.trial.TrialState.FAIL
    assert states["fails_once"] == states["none"] == optuna.trial.TrialState.COMPLETE
    assert result.winner.spec.optimizer in {"fails_once", "none"}


@pytest.mark.parametrize("command", ["search", "run"])
def test_search_and_run_commands_write_the_best_schedule(ray_cluster: None, tmp_path: Path, command: str) -> None:
    from fewstep_search.cli import main

    study = tmp_path / "study.toml"
    study.write_text(
        'nfe = 5\nrounds = 0\n[model]\nkind = "mixture"\noptions = { dim = 8 }\n'
        "[bank]\nn_trajectories = 16\ngrid_size = 16\nsubsteps = 1\nprobes = 1\n"
        '[search]\nheuristics = ["edm", "log_uniform"]\nsolvers = ["ddim"]\n'
        '[[search.trials]]\noptimizer = "dp"\nparameterization = "grid"\n'
    )
    out = tmp_path / "run"
    argv = [command, "--budget", "3", "--study", str(study), "--out", str(out), "--workers", "2", "--quiet"]
    assert main(argv) == 0
    best = json.loads((out / "best" / "schedule.json").read_text())
    assert best["nfe"] == 3 and len(best["sigmas"]) == 4
    assert (out / "optuna.db").is_file() and (out / "results.json").is_file()
    phase1 = json.loads((out / "round_1" / "phase1.json").read_text())
    assert len(phase1["candidates"]) == 3


# ---------------------------------------------------------------- no Ray needed


def test_trial_specs_validate_before_any_work() -> None:
    with pytest.raises(ValueError, match="additive"):
        TrialSpec(optimizer="dp", objective="direct", parameterization="grid").validate()
    with pytest.raises(ValueError, match="unknown start"):
        TrialSpec(optimizer="adam", start="zigzag").validate()
    with pytest.raises(ValueError, match="unknown optimizer 'nope'"):
        trial_specs(SearchSpec.model_validate({"trials": [{"optimizer": "nope"}]}))
    with pytest.raises(ValueError, match="first-order solver only"):
        TrialSpec(optimizer="dp", objective="bw", parameterization="grid", solver="heun").validate()
    with pytest.raises(ValueError, match="does not divide"):
        TrialSpec(optimizer="adam", objective="direct", solver="heun").validate(budget=5)


def test_run_trial_scores_the_three_sets(tiny_bank: Bank) -> None:
    den = builtin_mixture(dim=8)
    rec = run_trial(TrialSpec(optimizer="adam", objective="bw", hyper={"steps": 3}), bank=tiny_bank, denoiser=den,
                    nfe=NFE)
    assert rec.state == "COMPLETE" and rec.schedule is not None and rec.schedule.nfe == NFE
    assert {"fit_error", "select_error", "test_error", "bw", "b0", "fit_objective", "start_objective",
            "evaluations", "seconds"} <= set(rec.metrics)
    again = score_schedule(den, tiny_bank, rec.schedule)
    for part in ("fit", "select", "test"):
        assert rec.metrics[f"{part}_error"] == pytest.approx(again[f"{part}_error"], rel=1e-12)
    assert rec.metrics["select_error"] != rec.metrics["test_error"]  # different trajectories
    assert TrialRecord.from_report(json.loads(json.dumps(rec.to_report()))).spec == rec.spec


def test_fit_trajectories_caps_what_the_true_error_objective_solves(tiny_bank: Bank) -> None:
    inner = builtin_mixture(dim=8)
    batches: list[int] = []

    def counting(x: Any, sigma: Any) -> Any:
        batches.append(x.shape[0])
        return inner(x, sigma)

    counting.shape, counting.sigma_min, counting.sigma_max = inner.shape, inner.sigma_min, inner.sigma_max  # type: ignore
    spec = TrialSpec(optimizer="adam", objective="direct", start="edm", hyper={"steps": 4})
    capped = run_trial(spec, bank=tiny_bank, denoiser=counting, nfe=NFE, fit_trajectories=5)
    n_fit = tiny_bank.fit().n_trajectories
    during = batches[: 4 * NFE]  # the optimizer's evaluations come first, then the three sets are scored
    assert set(during) == {5} and n_fit > 5
    full = run_trial(spec, bank=tiny_bank, denoiser=inner, nfe=NFE)
    assert capped.metrics["fit_error"] != full.metrics["fit_error"]  # the optimum moved: it saw other data
    subset = tiny_bank.fit().subset(torch.arange(5))
    again = score_schedule(inner, tiny_bank, capped.schedule, fit=subset)  # type: ignore[arg-type]
    assert capped.metrics["fit_error"] == pytest.approx(again["fit_error"], rel=1e-12)  # on the subset it solved
    assert again["select_error"] == pytest.approx(capped.metrics["select_error"], rel=1e-12)


def test_start_best_refines_the_best_cheap_trial_picked_on_select(tiny_bank: Bank) -> None:
    specs = [*baseline_specs(["edm", "log_uniform", "vp_time_quadratic"]),
             TrialSpec(optimizer="dp", objective="bw", parameterization="grid"),
             TrialSpec(optimizer="lbfgsb", objective="direct", start="best", hyper={"maxiter": 3})]
    result = run_phase1(specs, bank=tiny_bank, model=ModelSource.of(builtin_mixture(dim=8)),
                        context=TrialContext(nfe=NFE), executor=InProcessExecutor())
    cheap = [r for r in result.records if not r.spec.is_costly]
    best_cheap = min(cheap, key=lambda r: r.select_error)
    polish = next(r for r in result.records if r.spec.start == "best")
    assert polish.metrics["start_objective"] == pytest.approx(best_cheap.metrics["fit_error"], rel=1e-9)
    assert polish.metrics["fit_error"] <= best_cheap.metrics["fit_error"] + 1e-12
    with pytest.raises(ValueError, match="must be a costly"):
        TrialSpec(optimizer="dp", objective="bw", parameterization="grid", start="best").validate()


def test_a_costly_trial_ends_at_its_time_budget_with_its_best_schedule(tiny_bank: Bank) -> None:
    spec = TrialSpec(optimizer="adam", objective="direct", start="edm", hyper={"steps": 500})
    rec = run_trial(spec, bank=tiny_bank, denoiser=builtin_mixture(dim=8), nfe=NFE, trial_seconds=1e-9)
    assert rec.state == "COMPLETE" and rec.stopped_early and rec.metrics["evaluations"] <= 2
    full = run_trial(spec, bank=tiny_bank, denoiser=builtin_mixture(dim=8), nfe=NFE)
    assert full.metrics["evaluations"] >= 500 and not full.stopped_early


def test_small_states_reach_the_trials_large_ones_do_not(tiny_bank: Bank) -> None:
    assert tiny_bank.states is not None
    assert tiny_bank.for_trials().states is not None
    assert tiny_bank.for_trials(max_state_bytes=0).states is None


def test_a_heun_trial_spends_the_budget_in_half_the_steps(tiny_bank: Bank) -> None:
    rec = run_trial(TrialSpec(optimizer="none", objective="direct", start="edm", solver="heun"), bank=tiny_bank,
                    denoiser=builtin_mixture(dim=8), nfe=4)
    assert rec.schedule is not None and rec.schedule.nfe == 2 and rec.metrics["bw"] != rec.metrics["bw"]  # NaN


def test_the_winner_is_picked_on_select_and_reported_on_test() -> None:
    def rec(opt: str, select: float, test: float, s: float = 1.0) -> TrialRecord:
        return TrialRecord(spec=TrialSpec(optimizer=opt), state="COMPLETE",
                           metrics={"select_error": select, "test_error": test, "seconds": s})

    records = [rec("adam", 0.50, 0.70), rec("lbfgsb", 0.60, 0.40),
               TrialRecord(spec=TrialSpec(optimizer="cmaes"), state="FAIL", error="x")]
    winner = select_winner(records)
    assert winner.spec.optimizer == "adam" and winner.test_error == 0.70  # not the best test error
    ties = [rec("adam", 0.5000, 0.5, 3.0), rec("lbfgsb", 0.50001, 0.5, 0.5), rec("tpe", 0.52, 0.5, 0.1)]
    assert select_winner(ties).spec.optimizer == "lbfgsb"
    assert select_winner(ties, tie_tolerance=0).spec.optimizer == "adam"
    with pytest.raises(ValueError, match="no trial finished"):
        select_winner(records[-1:])


def test_adding_trials_cannot_lower_the_reported_test_error_of_a_schedule(tiny_bank: Bank) -> None:
    """A schedule's reported error is a function of the schedule and the test set only."""
    model = ModelSource.of(builtin_mixture(dim=8))
    ctx = TrialContext(nfe=NFE)
    few = baseline_specs(["edm", "log_uniform"])
    more = few + [TrialSpec(optimizer="dp", objective="bw", parameterization="grid", start="edm"),
                  TrialSpec(optimizer="adam", objective="direct", start="vp_time_quadratic", hyper={"steps": 10})]
    a = run_phase1(few, bank=tiny_bank, model=model, context=ctx, executor=InProcessExecutor())
    b = run_phase1(more, bank=tiny_bank, model=model, context=ctx, executor=InProcessExecutor())
    test_a = {r.spec.key: r.test_error for r in a.records}
    test_b = {r.spec.key: r.test_error for r in b.records}
    for key, value in test_a.items():
        assert test_b[key] == value
    for result in (a, b):
        assert result.winner.schedule is not None
        fresh = score_schedule(builtin_mixture(dim=8), tiny_bank, result.winner.schedule, parts=("test",))
        assert result.summary()["best"]["test_error"] == pytest.approx(fresh["test_error"], rel=1e-12)


def test_pruning_stops_costly_trials_that_cannot_win(tiny_bank: Bank) -> None:
    specs = baseline_specs(["vp_time_quadratic"]) + [
        TrialSpec(optimizer="adam", objective="direct", start=s, hyper={"steps": 60, "lr": 0.02})
        for s in ("vp_time_quadratic", "edm", "log_uniform", "vp_time_uniform")
    ]
    executor = InProcessExecutor(pruning=PruningSpec(report_every=5, grace=1, factor=2))
    result = run_phase1(specs, bank=tiny_bank, model=ModelSource.of(builtin_mixture(dim=8)),
                        context=TrialContext(nfe=NFE), executor=executor)
    stopped = [r for r in result.records if r.stopped_early]
    assert stopped, "no costly trial was stopped"
    for r in stopped:  # a stopped trial is still a scored candidate, with fewer evaluations than its budget
        assert r.state == "COMPLETE" and r.schedule is not None and r.metrics["evaluations"] < 61
        assert r.test_error == pytest.approx(score_schedule(builtin_mixture(dim=8), tiny_bank, r.schedule,
                                                            parts=("test",))["test_error"], rel=1e-12)
    assert not any(r.stopped_early for r in result.records if r.spec.is_baseline)


def test_default_portfolio_covers_every_optimizer_family_cheap_trials_first() -> None:
    from fewstep_search.phase1.registry import OPTIMIZERS

    specs = trial_specs(SearchSpec())
    # AYS and LD3 cost minutes on a real model and b0_dp repeats `dp` on `b0`: they run in benchmarks/peers.py.
    assert {s.optimizer for s in specs} == set(OPTIMIZERS) - {"ays", "ld3", "b0_dp"}
    assert {s.solver for s in specs} == {"ddim", "dpmpp_2m", "ipndm"}
    assert len({s.key for s in specs}) == len(specs)
    costly = [s.is_costly for s in specs]
    assert costly == sorted(costly)  # every cheap trial before the first costly one


def _budget_specs() -> list[TrialSpec]:
    return baseline_specs(["edm", "vp_time_quadratic"]) + [
        TrialSpec(optimizer="adam", objective="direct", start="edm", hyper={"steps": 10**6}),
        TrialSpec(optimizer="adam", objective="direct", start="vp_time_quadratic", hyper={"steps": 10**6}),
        TrialSpec(optimizer="adam", objective="direct", start="best", hyper={"steps": 10**6}),
    ]


def test_costly_trials_start_with_the_most_promising_start(tiny_bank: Bank) -> None:
    from fewstep_search.phase1.select import by_start_quality

    specs = _budget_specs()
    base = run_phase1(specs[:2], bank=tiny_bank, model=ModelSource.of(builtin_mixture(dim=8)),
                      context=TrialContext(nfe=NFE), executor=InProcessExecutor()).records
    ordered = by_start_quality(specs[2:], base)
    quality = {r.spec.start: r.select_error for r in base}
    quality["best"] = min(quality.values())  # start "best" is the best cheap trial
    assert quality["edm"] != quality["vp_time_quadratic"]
    assert [quality[s.start] for s in ordered] == sorted(quality[s.start] for s in specs[2:])
    unscored = TrialSpec(optimizer="adam", objective="direct", start="log_uniform")
    assert by_start_quality([unscored, *specs[2:]], base)[-1] is unscored
    # `lead_solvers` (the loop's Phase-2 solver) puts that solver's most promising trial first, whatever its rank.
    other = TrialSpec(optimizer="adam", objective="direct", start="best", solver="ipndm")  # its start: unscored
    assert by_start_quality([other, *specs[2:]], base)[-1] is other
    led = by_start_quality([other, *specs[2:]], base, lead_solvers=("ipndm",))
    assert led[0] is other and led[1:] == ordered


def test_the_search_budget_ends_running_trials_and_starts_no_more(tiny_bank: Bank) -> None:
    model = ModelSource.of(builtin_mixture(dim=8))
    spent = run_phase1(_budget_specs(), bank=tiny_bank, model=model,
                       context=TrialContext(nfe=NFE, search_seconds=1e-6), executor=InProcessExecutor())
    assert all(not r.spec.is_costly for r in spent.records) and len(spent.records) == 2  # every cheap trial ran
    assert len(spent.not_run) == 3 and spent.summary()["not_run"] == spent.not_run
    # A budget the cheap trials leave room in: the first costly trial (start "best") runs until the budget ends
    # (its iteration cap is out of reach), then none starts.
    some = run_phase1(_budget_specs(), bank=tiny_bank, model=model,
                      context=TrialContext(nfe=NFE, search_seconds=3.0), executor=InProcessExecutor())
    costly = [r for r in some.records if r.spec.is_costly]
    assert [r.spec.start for r in costly] == ["best"] and costly[0].stopped_early
    assert len(some.not_run) == 2 and not any("best" in label for label in some.not_run)


def test_ray_trials_that_find_the_budget_spent_leave_no_record(ray_cluster: None, tmp_path: Path,
                                                              tiny_bank: Bank) -> None:
    from fewstep_search.phase1.ray_tune import RayTuneExecutor

    seen: list[TrialRecord] = []
    result = run_phase1(_budget_specs(), bank=tiny_bank, model=ModelSource.of(builtin_mixture(dim=8)),
                        context=TrialContext(nfe=NFE, search_seconds=1e-6), on_record=seen.append,
                        executor=RayTuneExecutor(workers=2, storage_path=tmp_path / "tune", name="budget"))
    assert len(seen) == 2 and not any(r.spec.is_costly for r in seen)
    assert len(result.not_run) == 3
