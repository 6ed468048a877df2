"""Phase-2 for a multistep sampler: the affine step view of DDIM and iPNDM, its targets, and an iPNDM round."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_phase2_models import SIGMA_MAX, SIGMA_MIN, make_tiny

from fewstep_search.bank import build_bank
from fewstep_search.models.source import ModelSource
from fewstep_search.phase2 import fine_tune, step_weights
from fewstep_search.phase2.steps import SamplerChain, step_gains
from fewstep_search.schedules import make_schedule
from fewstep_search.solvers import get_solver
from fewstep_search.study.phase2 import Phase2Spec

SCHEDULES = [(80.0, 9.0, 2.5, 0.7, 0.2, 0.05, 0.002), (80.0, 5.0, 1.0, 0.3, 0.0)]


@pytest.mark.parametrize("solver", ["ddim", "euler", "ipndm"])
@pytest.mark.parametrize("sigmas", SCHEDULES)
def test_the_chain_takes_the_solvers_own_steps(mixture8, solver: str, sigmas: tuple[float, ...]) -> None:
    x0 = 80.0 * torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    chain, x = SamplerChain(solver, sigmas), x0
    for j in range(len(sigmas) - 1):
        x = chain.advance(j, x, mixture8(x, torch.full((5,), sigmas[j], dtype=torch.float64)))
        ref = get_solver(solver)(mixture8, x0, torch.tensor(sigmas[: j + 2], dtype=torch.float64))
        torch.testing.assert_close(x, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("solver", ["ddim", "ipndm"])
def test_a_target_lands_the_step_on_the_teachers_solve(solver: str) -> None:
    sigmas = SCHEDULES[0]
    g = torch.Generator().manual_seed(1)
    chain, x = SamplerChain(solver, sigmas), 80.0 * torch.randn(4, 8, dtype=torch.float64, generator=g)
    gains = step_gains(solver, sigmas)
    for j in range(len(sigmas) - 1):
        d_bar = torch.randn(4, 8, dtype=torch.float64, generator=g)
        r = sigmas[j + 1] / sigmas[j]
        y = r * x + (1 - r) * d_bar  # the teacher's accurate solve, in DDIM form
        base, gain = chain.affine(j, x)
        assert gain == pytest.approx(gains[j])
        torch.testing.assert_close(base + gain * chain.target(j, x, d_bar), y, rtol=1e-10, atol=1e-9)
        x = chain.advance(j, x, torch.randn(4, 8, dtype=torch.float64, generator=g))  # the student's own output
    if solver == "ipndm":
        assert gains[1] == pytest.approx(1.5 * (1 - sigmas[2] / sigmas[1]))  # a_0 of second-order AB


def test_an_ipndm_round_trains_for_ipndm_and_its_weights_carry_the_ab_factor(tmp_path) -> None:
    """The round lowers its loss (the weighted per-step landing error of the student's own iPNDM chain) and
    scores with iPNDM. It need not lower E: on this tiny model E rises (0.053 -> 0.088), which is why the loop
    trains for first-order solvers unless `phase2.train_for = "winner"` (docs/phase2.md)."""
    teacher = make_tiny(seed=3)
    bank = build_bank(teacher, shape=(8,), sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, n_trajectories=48,
                      grid_size=24, dtype=torch.float32, probes=1, model_id="tiny")
    sched = make_schedule("vp_time_quadratic", 4, SIGMA_MIN, SIGMA_MAX)
    w_ddim, w_ipndm = step_weights(bank, sched.tensor()), step_weights(bank, sched.tensor(), "ipndm")
    a0 = torch.tensor([1.0, 1.5, 23 / 12, 1.0], dtype=torch.float64)  # the last step lands on D: gain 1 for both
    torch.testing.assert_close(w_ipndm, w_ddim * a0.square())
    src = ModelSource.of(teacher)
    spec = Phase2Spec(max_steps=24, batch_size=16, steps_per_epoch=6, lr=2e-3, lr_final=2e-4, warmup_steps=2,
                      pool_size=32, max_log_step=1.0, per_step_weight=1.0, end_to_end_weight=0.0)
    ip = dataclasses.replace(sched, solver="ipndm")  # the schedule carries the solver the round trains for
    res = fine_tune(teacher=src, student=src, schedule=ip, bank=bank, spec=spec, out_dir=tmp_path / "ipndm",
                    engine="local")
    assert res.history[-1]["loss"] < 0.9 * res.history[0]["loss"]
    with torch.no_grad():
        from fewstep_search.objectives import true_error

        assert res.initial["test_error"] == pytest.approx(
            float(true_error(teacher, bank.test(), sched.tensor(), solver="ipndm")), rel=1e-5)  # scored with iPNDM
    with pytest.raises(ValueError, match="follows DDIM steps"):
        fine_tune(teacher=src, student=src, schedule=ip, bank=bank, spec=spec.model_copy(
            update={"teacher_forced_fraction": 0.5}), out_dir=tmp_path / "x", engine="local")
    with pytest.raises(ValueError, match="not 'dpmpp_2m'"):
        fine_tune(teacher=src, student=src, schedule=dataclasses.replace(sched, solver="dpmpp_2m"), bank=bank,
                  spec=spec, out_dir=tmp_path / "y", engine="local")


def _tiny_ipndm_round(spec: Phase2Spec, out_dir):
    """One iPNDM round of `spec` on the tiny model at N = 4 (its own bank), in this process."""
    teacher = make_tiny(seed=3)
    bank = build_bank(teacher, shape=(8,), sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, n_trajectories=48,
                      grid_size=24, dtype=torch.float32, probes=1, model_id="tiny")
    sched = dataclasses.replace(make_schedule("vp_time_quadratic", 4, SIGMA_MIN, SIGMA_MAX), solver="ipndm")
    src = ModelSource.of(teacher)
    return fine_tune(teacher=src, student=src, schedule=sched, bank=bank, spec=spec, out_dir=out_dir,
                     engine="local")


@pytest.mark.parametrize("loss", ["squared", "norm"])
def test_the_end_to_end_term_alone_trains_ipndm_with_one_teacher_solve_per_pool_sample(tmp_path, loss) -> None:
    """Where the per-step iPNDM loss raises E on this tiny model (above), the end-to-end term alone lowers it:
    it differentiates through the whole multistep chain. Its target is the teacher's end point from the noise,
    so the teacher runs once per pool sample however many passes the round makes."""
    spec = Phase2Spec(max_steps=24, batch_size=16, steps_per_epoch=6, lr=2e-3, lr_final=2e-4, warmup_steps=2,
                      pool_size=32, max_log_step=1.0, per_step_weight=0.0, end_to_end_weight=1.0,
                      end_to_end_loss=loss)
    res = _tiny_ipndm_round(spec, tmp_path / "e2e")
    assert res.stopped_reason is None
    assert res.history[-1]["test_error"] < 0.9 * res.initial["test_error"]
    assert res.initial["teacher_error"] <= 0.1 * res.initial["select_error"]  # "auto": the targets are far closer
    solve = res.initial["teacher_steps"] + 1  # calls per sample of the teacher's end point: "auto"'s, and into 0
    assert res.teacher_calls == 32 * solve  # 24 steps x 16 samples = 12 passes over the pool: solved once each
    with pytest.raises(ValueError, match="train on nothing"):
        Phase2Spec(end_to_end_weight=0.0)  # the default per_step_weight is 0
    with pytest.raises(ValueError, match="warms up the per-step loss"):
        Phase2Spec(per_step_weight=0.0, end_to_end_weight=1.0, teacher_forced_fraction=0.5)


def test_the_path_term_trains_beside_the_end_to_end_term_from_one_teacher_solve_per_sample(tmp_path) -> None:
    """`path_weight > 0`: the pool solves the teacher's whole node path with its end point (the fine grid plus one
    call per interior node), once per sample, and the round still lowers the iPNDM E."""
    spec = Phase2Spec(max_steps=24, batch_size=16, steps_per_epoch=6, lr=2e-3, lr_final=2e-4, warmup_steps=2,
                      pool_size=32, path_weight=1.0)
    res = _tiny_ipndm_round(spec, tmp_path / "path")
    assert res.stopped_reason is None
    assert res.history[-1]["test_error"] < 0.9 * res.initial["test_error"]
    assert res.teacher_calls == 32 * (res.initial["teacher_steps"] + 3 + 1)  # 3 interior nodes at N = 4, into 0
    with pytest.raises(ValueError, match="needs end_to_end_weight"):
        Phase2Spec(path_weight=1.0, end_to_end_weight=0.0, per_step_weight=1.0)


def test_cpu_autocast_trains_the_students_calls_in_bfloat16_as_a_round_of_its_own(tmp_path) -> None:
    """`cpu_autocast = true` puts the student's training calls under bf16 autocast on CPU (more steps per minute
    where the CPU has native bf16, docs/phase2.md); the chain's states stay float32, the round still lowers E, and
    a folder of a float32 round is not resumed as this one."""
    from torch import nn

    from fewstep_search.phase2.loss import bind_student

    seen: list[bool] = []

    class Probe(nn.Module):
        def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            seen.append(torch.is_autocast_enabled("cpu"))
            return nn.functional.linear(x, torch.eye(x.shape[1]))

    x = torch.randn(4, 8)
    out = bind_student(Probe(), None, autocast=True)(x, torch.ones(4))
    assert seen == [True] and out.dtype == torch.float32
    assert out.to(torch.bfloat16).float().equal(out) and not out.equal(x)  # the call ran in bf16
    bind_student(Probe(), None, autocast=False)(x, torch.ones(4))
    assert seen == [True, False]
    spec = Phase2Spec(max_steps=24, batch_size=16, steps_per_epoch=6, lr=2e-3, lr_final=2e-4, warmup_steps=2,
                      pool_size=32, cpu_autocast=True)
    res = _tiny_ipndm_round(spec, tmp_path / "bf16")
    assert res.stopped_reason is None
    assert res.history[-1]["test_error"] < 0.9 * res.initial["test_error"]
    with pytest.raises(ValueError, match="another"):
        _tiny_ipndm_round(spec.model_copy(update={"cpu_autocast": False}), tmp_path / "bf16")
