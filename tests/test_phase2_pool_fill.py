"""The end-to-end term solves its pool's end points before training, and its learning rate spans the training.

Why it matters: solved lazily, the first pass over the pool was mostly teacher work (40% of a digits round at
N = 10) while the time-driven learning rate decayed, so training began far below its peak (docs/phase2.md,
"The teacher's work comes first"). These tests check the clock's training progress, that every end point is
solved before the first optimizer step and never again, and that a fill cut short by a kill resumes with what
it had solved and the time it had spent.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_phase2_models import SIGMA_MAX, SIGMA_MIN, make_tiny

from fewstep_search.bank import build_bank
from fewstep_search.models.source import ModelSource
from fewstep_search.phase2 import fine_tune, pool_fill
from fewstep_search.phase2.checkpoints import read_epochs
from fewstep_search.phase2.optim import Clock, lr_factor
from fewstep_search.phase2.pool import NoisePool
from fewstep_search.schedules import make_schedule
from fewstep_search.study.phase2 import Phase2Spec

POOL, BATCH, END_STEPS = 160, 16, 40


@pytest.fixture(scope="module")
def setup():
    teacher = make_tiny(seed=3)
    bank = build_bank(teacher, shape=(8,), sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, n_trajectories=32,
                      grid_size=16, dtype=torch.float32, probes=1, model_id="tiny")
    return teacher, bank, make_schedule("vp_time_quadratic", 3, SIGMA_MIN, SIGMA_MAX)


def _run(setup, out, **kw):
    teacher, bank, sched = setup
    spec = Phase2Spec(**{"max_steps": 6, "batch_size": BATCH, "steps_per_epoch": 3, "lr": 2e-3, "lr_final": 2e-4,
                         "warmup_steps": 2, "pool_size": POOL, "end_to_end_teacher_steps": END_STEPS, **kw})
    src = ModelSource.of(teacher)
    return fine_tune(teacher=src, student=src, schedule=sched, bank=bank, spec=spec, out_dir=out, engine="local")


def test_the_learning_rate_follows_the_training_not_the_teachers_work() -> None:
    clock = Clock(budget_seconds=100.0, max_steps=None, seconds_before=70.0)
    assert clock.progress == pytest.approx(0.7, abs=0.01)
    assert clock.train_progress == pytest.approx(clock.progress, abs=0.01)
    clock.train_from = 40.0  # the teacher worked for 40 s before the first step
    assert clock.train_progress == pytest.approx(0.5, abs=0.01)
    # just after the fill, the rate is at its peak (after warm-up), not 0.1 ** 0.4 of it
    clock.before = 40.0
    assert lr_factor(10, clock.train_progress, warmup_steps=2, lr=1e-4, lr_final=1e-5) == pytest.approx(1.0, abs=0.01)
    stepped = Clock(budget_seconds=100.0, max_steps=10, seconds_before=70.0)
    stepped.step, stepped.train_from = 4, 40.0
    assert stepped.train_progress == stepped.progress == pytest.approx(0.4)


def test_every_end_point_is_solved_before_the_first_step_and_only_once(setup, tmp_path) -> None:
    res = _run(setup, tmp_path)
    epochs = read_epochs(tmp_path)
    # the first epoch's 3 steps draw 48 samples; the whole pool was solved before them
    per_sample = END_STEPS + 1  # the fine solve and the step into 0
    assert epochs[0]["teacher_calls"] == POOL * per_sample == epochs[-1]["teacher_calls"] == res.teacher_calls
    assert 0 < res.train_from <= res.seconds
    assert not (tmp_path / pool_fill.FILL_FILE).exists() and not (tmp_path / pool_fill.FILL_PROGRESS).exists()


def test_a_fill_cut_short_resumes_with_what_it_solved(setup, tmp_path, monkeypatch) -> None:
    whole = _run(setup, tmp_path / "whole")
    monkeypatch.setattr(pool_fill, "SAVE_EVERY", 0.0)  # save after every chunk
    real, calls = NoisePool.end_points, []

    class Killed(Exception):
        pass

    def dying(self, teacher, idx):
        calls.append(int(idx.numel()))
        if len(calls) == 3:
            raise Killed
        return real(self, teacher, idx)

    monkeypatch.setattr(NoisePool, "end_points", dying)
    with pytest.raises(Killed):
        _run(setup, tmp_path / "cut")
    saved = pool_fill.read_fill(tmp_path / "cut", _key(tmp_path / "whole"))
    assert saved is not None and int(saved.cache["has_end"].sum()) == sum(calls[:2]) and saved.pool_size == POOL
    assert pool_fill.read_fill(tmp_path / "cut", "another round") is None
    monkeypatch.setattr(NoisePool, "end_points", real)
    resumed = _run(setup, tmp_path / "cut")
    assert resumed.teacher_calls == (POOL - sum(calls[:2])) * (END_STEPS + 1)  # only the unsolved ones
    assert resumed.train_from >= saved.seconds
    a, b = load_file(str(whole.checkpoint)), load_file(str(resumed.checkpoint))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def _key(out) -> str:
    import json

    return json.loads((out / "result.json").read_text())["config_key"]


def _slow_fill(monkeypatch, seconds: float) -> list[int]:
    """Each batched teacher solve takes at least `seconds` (a machine that got busy); returns their sizes."""
    import time

    real, calls = NoisePool.end_points, []

    def slow(self, teacher, idx):
        if not bool(self._has_end[idx].all()):  # the teacher solves (the training steps read the cache)
            calls.append(int(idx.numel()))
            time.sleep(seconds)
        return real(self, teacher, idx)

    monkeypatch.setattr(NoisePool, "end_points", slow)
    return calls


def test_a_fill_past_its_deadline_trains_on_the_samples_it_solved(setup, tmp_path, monkeypatch) -> None:
    from fewstep_search.phase2 import worker

    calls = _slow_fill(monkeypatch, 1.0)
    # chunks of 4 batches (64 samples): the deadline falls inside the second one's solve
    monkeypatch.setattr(worker, "fill_deadline", lambda spec, clock: clock.seconds + 1.5)
    res = _run(setup, tmp_path)
    assert calls == [64, 64] and res.steps == 6 and res.stopped_reason is None
    assert [e["pool_size"] for e in read_epochs(tmp_path)] == [128, 128]
    assert any("solved 128 of 160 pool samples" in n for n in res.notes)


def test_a_fill_that_solves_nothing_stops_the_round_with_a_reason(setup, tmp_path, monkeypatch) -> None:
    from fewstep_search.phase2 import worker

    monkeypatch.setattr(worker, "fill_deadline", lambda spec, clock: clock.seconds - 1.0)
    res = _run(setup, tmp_path)
    assert res.steps == 0 and "solved no pool sample" in (res.stopped_reason or "")


def test_the_fill_stops_at_its_share_of_a_time_budget() -> None:
    spec = Phase2Spec(max_minutes=10.0, teacher_share=0.4)
    timed = Clock(budget_seconds=600.0, max_steps=None)
    assert pool_fill.fill_deadline(spec, timed) == pytest.approx(600.0 * 0.4 * pool_fill.FILL_SLACK)
    assert pool_fill.fill_deadline(spec.model_copy(update={"teacher_share": 0.8}), timed) == pytest.approx(540.0)
    assert pool_fill.fill_deadline(spec, Clock(budget_seconds=600.0, max_steps=10)) is None


def test_a_truncated_pool_is_the_full_pools_prefix() -> None:
    full = NoisePool(40, (3,), 80.0, seed=5, device="cpu", conditions=range(4))
    cut = NoisePool(40, (3,), 80.0, seed=5, device="cpu", conditions=range(4))
    cut._end, cut._has_end[:25] = torch.zeros_like(cut.x), True
    cut.truncate(25)
    assert cut.size == 25 and torch.equal(cut.x, full.x[:25]) and torch.equal(cut.cond, full.cond[:25])
    assert cut.unsolved_end_points().numel() == 0 and cut.indices(3, 16).max() < 25
    with pytest.raises(ValueError, match="cannot keep"):
        cut.truncate(0)


def test_a_round_killed_after_a_cut_fill_resumes_on_the_same_samples(setup, tmp_path, monkeypatch) -> None:
    from fewstep_search.phase2 import worker

    _slow_fill(monkeypatch, 1.0)
    monkeypatch.setattr(worker, "fill_deadline", lambda spec, clock: clock.seconds + 1.5)
    whole = _run(setup, tmp_path / "whole")
    real_step = worker._step_loss

    class Killed(Exception):
        pass

    def dying(cfg, pool, *args, **kw):
        if args[5] == 4:  # the step number: after epoch 1's checkpoint
            raise Killed
        return real_step(cfg, pool, *args, **kw)

    monkeypatch.setattr(worker, "_step_loss", dying)
    with pytest.raises(Killed):
        _run(setup, tmp_path / "cut")
    monkeypatch.setattr(worker, "_step_loss", real_step)
    resumed = _run(setup, tmp_path / "cut")
    assert [e["pool_size"] for e in read_epochs(tmp_path / "cut")] == [128, 128]
    a, b = load_file(str(whole.checkpoint)), load_file(str(resumed.checkpoint))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert resumed.notes == whole.notes
