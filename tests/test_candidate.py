"""`Candidate`, the value between the phases: Phase-2's entry, the best-pair rule and the folder export take it,
and the run folder's rows become candidates in one place."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

from fewstep_search.best_pair import BestPair
from fewstep_search.candidate import Candidate, Scores
from fewstep_search.phase2.trainer import train_pair
from fewstep_search.rundir import RunDir
from fewstep_search.schedules import Schedule, karras


def test_the_phase_boundaries_take_a_candidate() -> None:
    pytest.importorskip("diffusers")
    from fewstep_search.integrations.pipeline_folder import export_diffusers_folder

    hints = typing.get_type_hints(train_pair)
    assert hints["pair"] is Candidate and typing.get_args(hints["return"])[0] is Candidate  # takes one, returns one
    assert typing.get_type_hints(BestPair.__init__)["first"] is Candidate
    assert typing.get_type_hints(BestPair.offer)["pair"] is Candidate
    assert typing.get_type_hints(export_diffusers_folder)["pair"] is Candidate


def test_a_row_round_trips_and_a_row_without_a_solver_is_ddim() -> None:
    pair = Candidate(Schedule(karras(4, 0.002, 80.0).sigmas, name="k", solver="ipndm", family="vp"), origin="trial",
                     round=2, weights=Path("w.safetensors"), scores=Scores(select=0.2, test=0.3, keep=0.25, fd=9.0))
    back = Candidate.from_row(pair.to_row(), round=2, weights=Path("w.safetensors"))
    assert back == pair and back.solver == "ipndm" and back.schedule.family == "vp"
    old = Candidate.from_row({"name": "x", "sigmas": [80.0, 1.0, 0.002], "select_error": 0.5})
    assert old.solver == "ddim" and old.schedule.family == "edm" and old.scores.select == 0.5
    assert old.scores.test is None and Candidate.from_row(old.to_row(), family="flow").schedule.family == "flow"
    with pytest.raises(ValueError, match="no keep error"):
        old.scores.on("keep")


def test_the_run_folder_writes_and_reads_back_the_kept_pair(tmp_path: Path) -> None:
    weights = tmp_path / "r1.safetensors"
    weights.write_bytes(b"weights")
    pair = Candidate(Schedule([80.0, 1.0, 0.002], name="p", solver="dpmpp_2m", family="vp"), origin="round 1",
                     round=1, weights=weights, scores=Scores(select=0.2, test=0.3, keep=0.25))
    run = RunDir(tmp_path / "run")
    run.write_best(pair)
    back = run.kept_pair()
    assert back.schedule == pair.schedule and back.solver == "dpmpp_2m" and back.scores == pair.scores
    assert back.weights == run.path / "best" / "model.safetensors" and back.weights.read_bytes() == b"weights"
    assert run.kept_family() == "vp" and RunDir.pair_summary(back)["keep_error"] == 0.25
    untouched = Candidate(pair.schedule, origin="trial", scores=pair.scores)
    run.write_best(untouched)  # the untouched model wins later: its weights file goes
    assert run.kept_pair().weights is None and not (run.path / "best" / "model.safetensors").exists()
