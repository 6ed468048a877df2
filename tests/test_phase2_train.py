"""Phase-2 rounds in process (`engine="local"`) on a tiny trainable denoiser: what a round must guarantee.

The error cut, the result's format (the module's own state dict), frozen teachers, models that arrive frozen,
refusal of models without weights, NaN stops, resuming an interrupted round to the same weights, the
teacher-forced warm start, and the device plumbing.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_phase2_models import SIGMA_MAX, SIGMA_MIN, NaNAfter, make_tiny, write_factory
from torch import Tensor, nn

from fewstep_search.bank import Bank, build_bank
from fewstep_search.models.mixture import GaussianMixture
from fewstep_search.models.source import ModelSource, trainable_module
from fewstep_search.objectives import true_error
from fewstep_search.phase2 import FineTuneResult, fine_tune
from fewstep_search.phase2.checkpoints import latest_checkpoint
from fewstep_search.schedules import Schedule, make_schedule
from fewstep_search.study.phase2 import Phase2Spec


@pytest.fixture(scope="module")
def teacher() -> nn.Module:
    return make_tiny(seed=3)


@pytest.fixture(scope="module")
def tiny_bank(teacher: nn.Module) -> Bank:
    return build_bank(teacher, shape=(8,), sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, n_trajectories=48,
                      grid_size=24, dtype=torch.float32, probes=1, model_id="tiny")


@pytest.fixture(scope="module")
def sched() -> Schedule:
    return make_schedule("vp_time_quadratic", 3, SIGMA_MIN, SIGMA_MAX)


def _spec(**kw: object) -> Phase2Spec:
    """The per-step loss, whose machinery (targets, reuse, warm start) this file tests; the default end-to-end
    loss is tested in test_phase2_steps.py, test_phase2_pool_auto.py and through the loop's tests."""
    base = {"max_steps": 12, "batch_size": 16, "steps_per_epoch": 3, "lr": 2e-3, "lr_final": 2e-4,
            "warmup_steps": 2, "pool_size": 32, "max_log_step": 1.0, "per_step_weight": 1.0, "end_to_end_weight": 0.0}
    return Phase2Spec(**{**base, **kw})


def _run(teacher: nn.Module, bank: Bank, sched: Schedule, out: Path, student: object = None,
         **kw: object) -> FineTuneResult:
    src = ModelSource.of(teacher)
    stu = src if student is None else (student if isinstance(student, ModelSource) else ModelSource.of(student))
    return fine_tune(teacher=src, student=stu, schedule=sched, bank=bank, spec=_spec(**kw), out_dir=out,
                     engine="local")


def _weights(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_a_round_cuts_test_error_and_saves_the_module_state_dict(teacher, tiny_bank, sched, tmp_path) -> None:
    before = _weights(teacher)
    seen: list[dict] = []
    res = fine_tune(teacher=ModelSource.of(teacher), student=ModelSource.of(teacher), schedule=sched,
                    bank=tiny_bank, spec=_spec(max_steps=24, steps_per_epoch=6), out_dir=tmp_path, engine="local",
                    on_epoch=seen.append)
    assert [h["epoch"] for h in res.history] == [1, 2, 3, 4] and [h["epoch"] for h in seen] == [1, 2, 3, 4]
    assert res.steps == 24 and res.stopped_reason is None and res.teacher_calls > 0
    for row in res.history:
        assert {"step", "loss", "select_error", "test_error", "seconds", "teacher_calls"} <= set(row)
    assert res.history[-1]["test_error"] < 0.8 * res.initial["test_error"]
    # the result is the state dict of exactly the module, keys unchanged, and it loads
    state = load_file(str(res.checkpoint))
    assert set(state) == set(teacher.state_dict())
    tuned = copy.deepcopy(teacher)
    tuned.load_state_dict(state)
    assert any(not torch.equal(state[k], before[k]) for k in state)
    sig = sched.tensor()
    with torch.no_grad():
        e = float(true_error(tuned, tiny_bank.test(), sig))
    assert e == pytest.approx(res.history[-1]["test_error"], rel=1e-5)
    # the frozen teacher was not touched
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    # calling again returns the finished round without training
    again = _run(teacher, tiny_bank, sched, tmp_path, max_steps=24, steps_per_epoch=6)
    assert again.history == res.history and again.steps == res.steps


def test_a_model_that_arrives_frozen_is_trained_and_the_loaded_one_is_left_alone(tiny_bank, sched, tmp_path) -> None:
    src = ModelSource(kind="factory", factory=write_factory(tmp_path), options={"seed": 3, "frozen": True})
    loaded = trainable_module(src.load())
    assert not any(p.requires_grad for p in loaded.parameters())
    before = _weights(loaded)
    res = fine_tune(teacher=src, student=src, schedule=sched, bank=tiny_bank, spec=_spec(max_steps=3),
                    out_dir=tmp_path / "round", engine="local")
    state = load_file(str(res.checkpoint))
    assert set(state) == set(before) and any(not torch.equal(state[k], before[k]) for k in state)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert all(torch.equal(v, before[k]) for k, v in loaded.state_dict().items())


def test_a_model_without_weights_is_refused_in_one_line(mixture8: GaussianMixture, bank8: Bank, tmp_path) -> None:
    src = ModelSource.of(mixture8)
    with pytest.raises(ValueError, match="no trainable weights") as err:
        fine_tune(teacher=src, student=src, schedule=make_schedule("edm", 3, SIGMA_MIN, SIGMA_MAX), bank=bank8,
                  spec=_spec(), out_dir=tmp_path, engine="local")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "checkpoints").exists()


def test_nan_loss_stops_the_round_and_keeps_the_last_good_checkpoint(teacher, tiny_bank, sched, tmp_path) -> None:
    # one student call with gradients per step: NaN from the 4th step on, after epoch 1 (steps 1-3) finished
    student = NaNAfter(copy.deepcopy(teacher), after=3)
    res = _run(teacher, tiny_bank, sched, tmp_path, student=student)
    assert res.stopped_reason is not None and "non-finite loss at step 4" in res.stopped_reason
    assert "epoch 1" in res.stopped_reason
    assert len(res.history) == 1 and res.steps == 3
    kept = load_file(str(latest_checkpoint(tmp_path) / "model.safetensors"))
    final = load_file(str(res.checkpoint))
    assert set(final) == set(student.state_dict())
    assert all(torch.equal(final[k], kept[k]) for k in final)
    assert all(torch.isfinite(v).all() for v in final.values())
    assert json.loads((tmp_path / "result.json").read_text())["stopped_reason"] == res.stopped_reason


def test_nan_before_any_epoch_keeps_the_starting_weights(teacher, tiny_bank, sched, tmp_path) -> None:
    student = NaNAfter(copy.deepcopy(teacher), after=0)
    start = _weights(student)
    res = _run(teacher, tiny_bank, sched, tmp_path, student=student)
    assert "step 1" in res.stopped_reason and "starting weights" in res.stopped_reason
    final = load_file(str(res.checkpoint))
    assert res.history == [] and all(torch.equal(final[k], start[k]) for k in final)


@pytest.mark.parametrize("extra", [{}, {"target_reuse": 3, "teacher_forced_fraction": 0.2}])
def test_an_interrupted_round_resumes_to_the_same_weights(teacher, tiny_bank, sched, tmp_path, extra) -> None:
    whole = _run(teacher, tiny_bank, sched, tmp_path / "whole", keep_checkpoints=4, **extra)
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "whole", cut)
    # what a kill after epoch 2 leaves behind: no result, no later checkpoints
    for p in ("result.json", "model.safetensors"):
        (cut / p).unlink()
    for e in (3, 4):
        shutil.rmtree(cut / "checkpoints" / f"epoch_{e:06d}")
    resumed = _run(teacher, tiny_bank, sched, cut, keep_checkpoints=4, **extra)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4] and resumed.steps == whole.steps
    assert resumed.history[:2] == whole.history[:2]
    a, b = load_file(str(whole.checkpoint)), load_file(str(resumed.checkpoint))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert resumed.history[-1]["test_error"] == pytest.approx(whole.history[-1]["test_error"], rel=1e-5)


def test_an_out_dir_of_another_round_is_refused(teacher, tiny_bank, sched, tmp_path) -> None:
    _run(teacher, tiny_bank, sched, tmp_path, max_steps=6)
    other = make_schedule("edm", 3, SIGMA_MIN, SIGMA_MAX)
    with pytest.raises(ValueError, match="another"):
        _run(teacher, tiny_bank, other, tmp_path, max_steps=6)


@pytest.mark.parametrize("extra", [
    {"teacher_forced_fraction": 0.5},
    {"end_to_end_weight": 0.5, "teacher_solver": "rk4_exp"},
    {"pool_size": None, "cache_first_target": False, "target_reuse": 1, "teacher_solver": "rk4"},
    {"dropout": True},
    {"target_reuse": 1},
])
def test_loss_variants_train(teacher, tiny_bank, sched, tmp_path, extra) -> None:
    res = _run(teacher, tiny_bank, sched, tmp_path, **extra)
    assert res.stopped_reason is None and len(res.history) == 4
    assert res.history[-1]["test_error"] < res.initial["test_error"]
    modes = [h["mode"] for h in res.history]
    if extra.get("teacher_forced_fraction"):
        assert modes[0] == "forced" and modes[-1] == "student"
    else:
        assert set(modes) == {"student"}


def test_cached_first_targets_save_teacher_calls(teacher, tiny_bank, sched, tmp_path) -> None:
    # the pool (32) is drawn 3 times over 6 steps of 16: the first interval is solved once per sample
    cached = _run(teacher, tiny_bank, sched, tmp_path / "a", max_steps=6, target_reuse=1)
    plain = _run(teacher, tiny_bank, sched, tmp_path / "b", max_steps=6, cache_first_target=False, target_reuse=1)
    from fewstep_search.phase2.targets import calls_for

    s = sched.sigmas
    first = calls_for(s[0], s[1], max_log_step=0.25, solver="auto")  # first_max_log_step
    assert plain.teacher_calls - cached.teacher_calls == first * (6 * 16 - 32)


class DeviceProbe(nn.Module):
    """Asserts that every input sits on its weights' device with a float dtype (the plumbing a GPU run needs)."""

    sigma_min, sigma_max = SIGMA_MIN, SIGMA_MAX

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.checked = 0

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        dev = next(self.inner.parameters()).device
        assert x.device == dev and sigma.device == dev, (x.device, sigma.device, dev)
        assert sigma.shape == (x.shape[0],) and x.is_floating_point()
        self.checked += 1
        return self.inner(x, sigma)


def _devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _devices())
def test_device_plumbing(teacher, tiny_bank, sched, tmp_path, device) -> None:
    probe = DeviceProbe(copy.deepcopy(teacher))
    res = fine_tune(teacher=ModelSource.of(probe), student=ModelSource.of(probe), schedule=sched, bank=tiny_bank,
                    spec=_spec(max_steps=3, teacher_forced_fraction=0.5, end_to_end_weight=0.1), out_dir=tmp_path,
                    device=device, engine="local")
    assert res.stopped_reason is None and len(res.history) == 1
    assert set(load_file(str(res.checkpoint))) == set(probe.state_dict())
    assert next(probe.parameters()).device.type == "cpu"  # the caller's model was not moved


def test_ray_scaling_asks_for_whole_gpus_on_cuda() -> None:
    from fewstep_search.phase2.trainer import scaling_kwargs

    assert scaling_kwargs("cuda", workers=2, cpus=4) == {"num_workers": 2, "use_gpu": True}
    assert scaling_kwargs("cpu", workers=2, cpus=1) == {"num_workers": 2, "use_gpu": False,
                                                        "resources_per_worker": {"CPU": 1}}


class TinyConditional(nn.Module):
    """A conditional denoiser (two conditions): the condition shifts the input by a learned offset."""

    sigma_min, sigma_max = SIGMA_MIN, SIGMA_MAX
    conditions = ("a", "b")

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.offset = nn.Parameter(torch.tensor([[0.5] * 8, [-0.5] * 8]))

    def forward(self, x: Tensor, sigma: Tensor, cond: Tensor) -> Tensor:
        return self.inner(x + self.offset[cond].to(x), sigma) - self.offset[cond].to(x)


def test_conditional_models_train_with_their_conditions(teacher, sched, tmp_path) -> None:
    model = TinyConditional(copy.deepcopy(teacher))
    bank = build_bank(model, shape=(8,), sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, n_trajectories=16,
                      grid_size=12, dtype=torch.float32, probes=1, model_id="tiny-cond")
    res = fine_tune(teacher=ModelSource.of(model), student=ModelSource.of(model), schedule=sched, bank=bank,
                    spec=_spec(max_steps=6, teacher_forced_fraction=0.3), out_dir=tmp_path, engine="local")
    assert res.stopped_reason is None and res.history[-1]["test_error"] < res.initial["test_error"]
    assert set(load_file(str(res.checkpoint))) == set(model.state_dict())
