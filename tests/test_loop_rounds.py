"""The alternating loop end to end on a user factory model: Phase-1, Phase-2, then Phase-1 again on the student."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fewstep_search import best_pair, loop
from fewstep_search.loop import LoopOptions, run_loop
from fewstep_search.models.source import ModelSource, trainable_module
from fewstep_search.rundir import RunDir
from fewstep_search.study import StudyConfig
from tests.test_phase2_models import write_factory

NFE = 3


def test_two_rounds_train_the_model_and_the_second_search_scores_the_student(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(best_pair, "IMPROVEMENT", -1.0)  # never stop early: round 2 must run
    factory = write_factory(tmp_path)
    config = StudyConfig.model_validate({
        "nfe": NFE, "rounds": 2,
        "model": {"kind": "factory", "factory": factory, "options": {"seed": 2}},
        "bank": {"n_trajectories": 32, "grid_size": 16, "substeps": 1, "probes": 1, "keep_states": True,
                 "keep_trajectories": 16},
        "search": {"heuristics": ["edm", "vp_time_quadratic"], "solvers": ["ddim"],
                   "trials": [{"optimizer": "dp", "objective": "bw", "parameterization": "grid"}]},
        "phase2": {"max_steps": 6, "batch_size": 16, "steps_per_epoch": 3, "pool_size": 32, "lr": 1e-3,
                   "lr_final": 1e-4},
    })
    rundir = RunDir(tmp_path / "run")
    results = run_loop(config, rundir, options=LoopOptions(engine="local"))

    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert sum("the teacher's end points are off by" in n for n in results["notes"]) == 2  # one per round
    assert 0 <= results["rounds"][0]["phase2"]["initial"]["teacher_error"] < results["rounds"][0]["select_error"]
    first, second = (json.loads((rundir.round_dir(r) / "phase1.json").read_text()) for r in (1, 2))
    heur = {r: {c["name"]: c["select_error"] for c in p["candidates"] if c["kind"] == "heuristic"}
            for r, p in ((1, first), (2, second))}
    assert heur[1].keys() == heur[2].keys()
    assert all(heur[1][k] != pytest.approx(heur[2][k], rel=1e-6) for k in heur[1])  # round 2 scored the student

    teacher = ModelSource(kind="factory", factory=factory, options={"seed": 2}).load()
    own = trainable_module(teacher).state_dict()
    for r in (1, 2):
        weights = load_file(str(rundir.model_path(r)))
        assert weights.keys() == own.keys()  # the module the factory returns, keys unchanged
        assert any(not torch.equal(weights[k], own[k]) for k in own)
    best = json.loads((rundir.path / "best" / "schedule.json").read_text())
    assert best["round"] == results["best"]["round"] and len(best["sigmas"]) == NFE + 1
    if results["best"]["round"] > 0:
        assert (rundir.path / "best" / "model.safetensors").is_file()
    # the best pair is the lowest on the keep set (fresh trajectories), not on select or test
    keep = [results["baselines"]["phase1"]["keep_error"], *(r["keep_error"] for r in results["rounds"])]
    assert results["decided_on"] == "keep" and results["bank_sizes"]["keep"] == 16
    assert results["best"]["round"] == min(range(3), key=keep.__getitem__)
    assert best["keep_error"] == keep[best["round"]]

    # a round finished by a version without the keep set is scored on it when the run resumes
    metrics = json.loads((rundir.round_dir(1) / "metrics.json").read_text())
    (rundir.round_dir(1) / "metrics.json").write_text(json.dumps({k: v for k, v in metrics.items()
                                                                   if k != "keep_error"}))
    again = run_loop(config, rundir, options=LoopOptions(engine="local"))
    assert again["rounds"][0]["keep_error"] == pytest.approx(metrics["keep_error"], rel=1e-9)
    assert again["timings"]["keep_set"] == 0.0 and again["best"]["round"] == results["best"]["round"]


def test_phase2_trains_the_winner_only_for_a_solver_it_is_asked_to_train_for() -> None:
    cands = [{"name": n, "solver": s, "select_error": e}
             for n, s, e in (("a", "ipndm", 0.1), ("b", "ddim", 0.3), ("c", "dpmpp_2m", 0.05), ("d", "ddim", 0.2))]
    by = {c["name"]: c for c in cands}
    assert loop._phase2_pick({"best": by["a"], "candidates": cands})["name"] == "d"
    assert loop._phase2_pick({"best": by["a"], "candidates": cands}, "winner")["name"] == "a"
    assert loop._phase2_pick({"best": by["c"], "candidates": cands}, "winner")["name"] == "a"
    with pytest.raises(ValueError, match="add one of them"):
        loop._phase2_pick({"best": by["c"], "candidates": [by["c"]]})


def test_targets_far_from_the_reference_get_a_warning() -> None:
    class Notes:
        def __init__(self) -> None:
            self.lines: list[str] = []

        def note(self, line: str) -> None:
            self.lines.append(line)

    run = Notes()
    loop._note_targets(run, 1, {"select_error": 0.2, "teacher_error": 0.01})  # type: ignore[arg-type]
    loop._note_targets(run, 2, {"select_error": 0.2, "teacher_error": 0.15})  # type: ignore[arg-type]
    loop._note_targets(run, 3, {"select_error": 0.2})  # type: ignore[arg-type]  # the per-step loss: no check
    assert len(run.lines) == 2 and "raise" not in run.lines[0]
    assert "raise phase2.end_to_end_teacher_steps" in run.lines[1]


def test_a_round_that_trains_its_schedule_keeps_the_trained_sigmas_as_the_pairs(tmp_path: Path) -> None:
    """With `phase2.schedule_lr` the round's pair is the student with the sigmas it was trained with: the round
    is scored on them, they are the round's schedule (Phase-1's kept beside them) and, when it wins, the best."""
    factory = write_factory(tmp_path)
    config = StudyConfig.model_validate({
        "nfe": NFE, "rounds": 1,
        "model": {"kind": "factory", "factory": factory, "options": {"seed": 2}},
        "bank": {"n_trajectories": 32, "grid_size": 16, "substeps": 1, "probes": 1},
        "search": {"heuristics": ["edm", "vp_time_quadratic"], "solvers": ["ddim"], "trials": []},
        "phase2": {"max_steps": 12, "batch_size": 16, "steps_per_epoch": 6, "pool_size": 32, "lr": 1e-3,
                   "lr_final": 1e-4, "schedule_lr": 5e-2},
    })
    rundir = RunDir(tmp_path / "run")
    results = run_loop(config, rundir, options=LoopOptions(engine="local"))
    row = results["rounds"][0]
    trained = row["phase2"]["history"][-1]["sigmas"]
    assert row["schedule"]["trained_sigmas"] and row["schedule"]["sigmas"] == trained
    phase1 = json.loads((rundir.round_dir(1) / "schedule.json").read_text())
    assert row["schedule"]["phase1_sigmas"] == phase1["sigmas"] != trained
    assert row["select_error"] == pytest.approx(row["phase2"]["history"][-1]["select_error"], rel=1e-4)
    best = json.loads((rundir.path / "best" / "schedule.json").read_text())
    assert best["sigmas"] == (trained if results["best"]["round"] == 1 else phase1["sigmas"])
