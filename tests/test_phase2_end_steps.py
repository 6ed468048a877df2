"""`end_to_end_teacher_steps = "auto"`: the cheapest end-point solve accurate enough for the round's student."""

from __future__ import annotations

import pytest
import torch
from test_phase2_models import SIGMA_MAX, SIGMA_MIN, make_tiny

from fewstep_search.bank import build_bank
from fewstep_search.phase2.evaluate import END_STEP_LADDER, TARGET_TOLERANCE, end_point_teacher, teacher_error
from fewstep_search.phase2.targets import IntervalTeacher
from fewstep_search.schedules import make_schedule
from fewstep_search.study.phase2 import Phase2Spec

CPU = torch.device("cpu")


def _setup() -> tuple[IntervalTeacher, object, dict[int, float]]:
    teacher = make_tiny(seed=3)
    bank = build_bank(teacher, shape=(8,), sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, n_trajectories=48,
                      grid_size=24, dtype=torch.float32, probes=1, model_id="tiny")
    sched = make_schedule("vp_time_quadratic", 4, SIGMA_MIN, SIGMA_MAX)
    it = IntervalTeacher(teacher, sched.sigmas, 1.0, "auto")
    select = bank.select()
    errs = {s: teacher_error(IntervalTeacher(teacher, sched.sigmas, 1.0, "auto", end_steps=s), select,
                             CPU)["teacher_error"] for s in END_STEP_LADDER}
    return it, select, errs


def _no_agree(t: torch.Tensor) -> torch.Tensor:
    return t  # one worker


def test_auto_takes_the_cheapest_rung_within_a_tenth_of_the_start_error_and_records_it() -> None:
    it, select, errs = _setup()
    assert errs[END_STEP_LADDER[0]] > errs[END_STEP_LADDER[-1]]  # coarser solves are further off here
    # a start error that only the third rung (or a finer one) meets
    start = max(errs[END_STEP_LADDER[2]], 1e-9) / TARGET_TOLERANCE * 1.0001
    expected = next(s for s in END_STEP_LADDER if errs[s] <= TARGET_TOLERANCE * start)
    initial = {"select_error": start}
    chosen = end_point_teacher(it, "auto", initial, select, CPU, _no_agree)
    assert chosen.end_steps == expected == initial["teacher_steps"]
    assert initial["teacher_error"] == pytest.approx(errs[expected])
    # nothing meets the tolerance: the top rung, and its error is recorded for the round's warning
    initial = {"select_error": 0.0}
    assert end_point_teacher(it, "auto", initial, select, CPU, _no_agree).end_steps == END_STEP_LADDER[-1]
    assert initial["teacher_error"] == pytest.approx(errs[END_STEP_LADDER[-1]])


def test_a_resumed_or_other_rank_worker_takes_the_recorded_or_agreed_steps_without_probing() -> None:
    it, select, _ = _setup()
    recorded = {"select_error": 1e9, "teacher_steps": 100, "teacher_error": 0.5}
    assert end_point_teacher(it, "auto", recorded, select, CPU, _no_agree).end_steps == 100  # not the cheapest
    assert recorded["teacher_error"] == 0.5
    # rank > 0 has no record: it takes what the all-reduce max (rank 0's choice) says
    assert end_point_teacher(it, "auto", None, select, CPU, lambda t: t.fill_(40.0)).end_steps == 40
    # no record anywhere (a checkpoint without its start record): the finest rung, not a 0-step solve
    assert end_point_teacher(it, "auto", None, select, CPU, _no_agree).end_steps == END_STEP_LADDER[-1]
    # a fixed count is used as it is, and its error measured once
    initial = {"select_error": 1.0}
    assert end_point_teacher(it, 200, initial, select, CPU, _no_agree).end_steps == 200
    assert "teacher_steps" not in initial and initial["teacher_error"] >= 0


def test_the_study_field_takes_auto_a_count_or_none_and_refuses_the_rest() -> None:
    assert Phase2Spec().end_to_end_teacher_steps == "auto"
    assert Phase2Spec(end_to_end_teacher_steps=60).end_to_end_teacher_steps == 60
    assert Phase2Spec(end_to_end_teacher_steps=None).end_to_end_teacher_steps is None
    for bad in (1, "fast"):
        with pytest.raises(ValueError):
            Phase2Spec(end_to_end_teacher_steps=bad)
