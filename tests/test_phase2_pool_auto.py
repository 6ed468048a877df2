"""`pool_size = "auto"`: the end-to-end term alone sizes its noise pool by the teacher's measured speed.

Why it matters: with that loss the teacher solves each pool sample once, so a pool small for the budget is
revisited until the student learns its samples (docs/phase2.md). These tests check the sizing rule, that the
per-step loss keeps its old pool (and its old resume keys), and that a timed round records the size it chose
and keeps it when resumed.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_phase2_models import SIGMA_MAX, SIGMA_MIN, make_tiny

from fewstep_search.bank import build_bank
from fewstep_search.models.source import ModelSource
from fewstep_search.phase2 import fine_tune
from fewstep_search.phase2.checkpoints import latest_checkpoint, read_epochs
from fewstep_search.phase2.pool import MAX_POOL_BYTES, PER_STEP_POOL, auto_pool_size
from fewstep_search.phase2.pool_fill import TIMED_CALLS
from fewstep_search.phase2.trainer import _config_key
from fewstep_search.schedules import make_schedule
from fewstep_search.study.phase2 import Phase2Spec

E2E = {"per_step_weight": 0.0, "end_to_end_weight": 1.0}  # the default loss, spelled out
PER_STEP = {"per_step_weight": 1.0, "end_to_end_weight": 0.0}


def test_the_pool_holds_what_the_teacher_solves_in_its_share_of_the_budget() -> None:
    kw = {"batch": 64, "sample_bytes": 4096}
    assert auto_pool_size(budget_seconds=1200, seconds_per_sample=0.06, share=0.4, **kw) == 8000
    assert auto_pool_size(budget_seconds=240, seconds_per_sample=0.06, share=0.4, **kw) == 1600
    # a slow teacher still gets one batch; a huge sample is capped by memory, not by the budget
    assert auto_pool_size(budget_seconds=10, seconds_per_sample=5.0, share=0.4, **kw) == 64
    assert auto_pool_size(budget_seconds=1e6, seconds_per_sample=1e-4, share=0.5, batch=8,
                          sample_bytes=MAX_POOL_BYTES // 100) == 100


def test_auto_is_the_old_pool_for_the_per_step_loss_and_a_new_key_for_the_end_to_end_term() -> None:
    src = ModelSource.of(make_tiny(seed=3))
    sig = (80.0, 5.0, 0.5, 0.002)

    def key(**kw: object) -> str:
        return _config_key(src, src, sig, Phase2Spec(**kw), "ddim")

    # per-step rounds made when 1024 was the default pool resume under "auto"
    assert key(**PER_STEP) == key(**PER_STEP, pool_size=PER_STEP_POOL)
    assert key(**PER_STEP) == key(**PER_STEP, teacher_share=0.9)  # no effect there, so not part of the key
    assert key() == key(**E2E)
    assert key(**E2E) != key(**E2E, pool_size=PER_STEP_POOL)
    assert key(**E2E) != key(**E2E, teacher_share=0.9)
    assert key(**E2E, max_steps=5) == key(**E2E, max_steps=5, pool_size=PER_STEP_POOL)  # no budget to size by
    for bad in ({"pool_size": "big"}, {"pool_size": 0}, {"teacher_share": 1.0}, {"teacher_share": 0.0}):
        with pytest.raises(ValueError):
            Phase2Spec(**bad)


def test_a_timed_round_records_its_pool_and_keeps_it_when_resumed(tmp_path) -> None:
    teacher = make_tiny(seed=3)
    bank = build_bank(teacher, shape=(8,), sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, n_trajectories=32,
                      grid_size=16, dtype=torch.float32, probes=1, model_id="tiny")
    sched = make_schedule("vp_time_quadratic", 3, SIGMA_MIN, SIGMA_MAX)
    src = ModelSource.of(teacher)
    out = tmp_path / "round"

    def run(minutes: float):
        # the CPU clock: this process's own work, so another process loading the machine changes nothing here
        spec = Phase2Spec(max_minutes=minutes, batch_size=16, steps_per_epoch=5, lr=2e-3, lr_final=2e-4,
                          warmup_steps=2, max_log_step=1.0, teacher_share=0.3, clock="cpu", **E2E)
        return fine_tune(teacher=src, student=src, schedule=sched, bank=bank, spec=spec, out_dir=out,
                         engine="local")

    first = run(0.04)
    sizes = {e["pool_size"] for e in read_epochs(out)}
    assert len(sizes) == 1 and (size := sizes.pop()) >= 16
    assert json.loads((latest_checkpoint(out) / "state.json").read_text())["pool_size"] == size
    from fewstep_search.phase2.targets import IntervalTeacher

    steps = first.initial["teacher_steps"]  # "auto" (the default): chosen at the round's start
    per_sample = IntervalTeacher(teacher, sched.sigmas, 1.0, "auto", end_steps=steps).end_calls_per_sample()
    assert per_sample == steps + 1  # the fine solve and the step into 0
    probe = (1 + TIMED_CALLS) * 16  # the timing probe: a warm-up call and the timed ones
    assert first.teacher_calls <= size * per_sample + probe  # each pool sample solved once
    # a killed round: the result is gone, the epochs stay; the rerun continues with the recorded pool
    (out / "result.json").unlink()
    (out / "model.safetensors").unlink()
    n_before = len(read_epochs(out))
    run(0.08)
    epochs = read_epochs(out)
    assert len(epochs) > n_before and {e["pool_size"] for e in epochs} == {size}
