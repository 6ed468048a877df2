"""`phase2.schedule_lr`: the schedule's interior sigmas trained with the weights through the end-to-end term;
`phase2.schedule_first_steps`: the sigmas alone first; `phase2.schedule_start`: where they start."""

from __future__ import annotations

import pytest
import torch
from test_phase2_steps import _tiny_ipndm_round

from fewstep_search.phase2 import checkpoints as ck
from fewstep_search.phase2.learned_schedule import LearnedSchedule, merged_first_step, round_start, start_sigmas
from fewstep_search.phase2.loss import solver_chain
from fewstep_search.phase2.optim import Clock, clip_gradients, make_optimizer, make_scheduler
from fewstep_search.schedules import sigmas_from_logits
from fewstep_search.study.phase2 import Phase2Spec

SIGMAS = (80.0, 9.0, 2.5, 0.7, 0.2, 0.05, 0.002)


def test_a_learned_schedule_starts_at_phase1s_sigmas_keeps_its_ends_and_order_and_has_gradients() -> None:
    learned = LearnedSchedule(SIGMAS)
    assert learned.values() == pytest.approx(SIGMAS, rel=1e-5)
    assert learned.values()[0] == 80.0 and learned.values()[-1] == 0.002  # exactly: E is measured at sigma_min
    with torch.no_grad():
        learned.logits.copy_(torch.tensor([9.0, -9.0, 0.0, 4.0, -20.0, 1.0]))  # any logits: still a schedule
    vals = learned.values()
    assert vals[0] == 80.0 and vals[-1] == 0.002
    assert all(b < a for a, b in zip(vals, vals[1:], strict=False))
    learned().sum().backward()
    assert learned.logits.grad is not None and learned.logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="strictly decreasing"):
        LearnedSchedule((80.0, 1.0, 0.0))


@pytest.mark.parametrize("solver", ["ddim", "ipndm"])
def test_the_chain_on_tensor_sigmas_is_the_chain_on_floats_and_differentiable_in_them(solver: str) -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 8) * 0.1

    def student(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return x @ w / (1 + sigma[:, None])  # depends on sigma, so its gradient flows through the model's input

    x = torch.randn(5, 8) * 80.0
    learned = LearnedSchedule(SIGMAS)
    sig = learned()
    out = solver_chain(student, x, sig.unbind(0), solver)
    assert torch.allclose(out, solver_chain(student, x, tuple(float(s) for s in sig.detach()), solver), atol=1e-4)
    out.square().sum().backward()
    assert learned.logits.grad is not None and learned.logits.grad.abs().sum() > 0


def test_a_round_with_schedule_lr_moves_the_sigmas_scores_on_them_and_resumes_them(tmp_path) -> None:
    """The round logs the sigmas it evaluated with at every epoch, its result carries the last ones (the loop
    writes them as the round's schedule), a resumed round starts from the checkpoint's sigmas, and a folder of a
    round with the schedule fixed is not resumed as this one."""
    spec = Phase2Spec(max_steps=24, batch_size=16, steps_per_epoch=6, lr=2e-3, lr_final=2e-4, warmup_steps=2,
                      pool_size=32, schedule_lr=5e-2, schedule_first_steps=0)
    res = _tiny_ipndm_round(spec, tmp_path / "co")
    assert res.stopped_reason is None
    start = res.history[0]["sigmas"]
    assert res.sigmas is not None and len(res.sigmas) == 5
    assert res.sigmas[0] == start[0] and res.sigmas[-1] == start[-1]
    assert max(abs(a / b - 1) for a, b in zip(res.sigmas[1:-1], start[1:-1], strict=False)) > 1e-3  # it moved
    assert res.history[-1]["test_error"] < 0.9 * res.initial["test_error"]
    for name in ("result.json", "model.safetensors"):  # as if killed after the last epoch's checkpoint
        (tmp_path / "co" / name).unlink()
    again = _tiny_ipndm_round(spec.model_copy(update={"max_steps": 30}), tmp_path / "co")  # resumes from step 24
    assert again.steps == 30 and again.history[3]["sigmas"] == res.history[3]["sigmas"]
    def off(a: list[float], b: list[float]) -> float:
        return max(abs(u / v - 1) for u, v in zip(a[1:-1], b[1:-1], strict=False))

    # the resumed sigmas went on from the checkpoint's, not from Phase-1's again
    assert off(again.history[4]["sigmas"], res.history[3]["sigmas"]) < 0.5 * off(res.history[3]["sigmas"], start)
    with pytest.raises(ValueError, match="another"):
        _tiny_ipndm_round(spec.model_copy(update={"schedule_lr": 0.0}), tmp_path / "co")
    fixed = _tiny_ipndm_round(spec.model_copy(update={"schedule_lr": 0.0}), tmp_path / "fixed")
    assert fixed.sigmas is None and "sigmas" not in fixed.history[-1]


def test_schedule_lr_needs_the_end_to_end_term_alone() -> None:
    """On by default; beside the per-step loss or the path term the schedule stays fixed, and asking for both
    explicitly is refused."""
    assert Phase2Spec().trains_schedule
    for other in ({"per_step_weight": 1.0, "end_to_end_weight": 0.0}, {"path_weight": 1.0}):
        assert not Phase2Spec(**other).trains_schedule
        with pytest.raises(ValueError, match="end-to-end term alone"):
            Phase2Spec(schedule_lr=1e-2, **other)
    with pytest.raises(ValueError):
        Phase2Spec(schedule_lr=-1.0)


def test_the_weights_wait_for_the_schedule_then_warm_up_from_where_they_start() -> None:
    """The schedule's group trains from step 0; the weights' rate is 0 until the start step is known and their
    warm-up counts from it."""
    module, learned = torch.nn.Linear(2, 2), LearnedSchedule(SIGMAS)
    opt = make_optimizer(module, lr=1e-3, weight_decay=0.0, schedule=learned, schedule_lr=1e-2)
    clock = Clock(budget_seconds=1.0, max_steps=100)
    start: list[int | None] = [None]
    sched = make_scheduler(opt, clock, warmup_steps=3, lr=1e-3, lr_final=1e-3, weights_from=lambda: start[0])
    rates = []
    for step in range(8):
        rates.append((opt.param_groups[0]["lr"], opt.param_groups[1]["lr"]))
        opt.step()
        clock.step = step + 1
        if step + 1 == 5:
            start[0] = 5
        sched.step()
    assert [w for w, _ in rates[:5]] == [0.0] * 5
    assert [w for w, _ in rates[5:]] == pytest.approx([1e-3 / 4, 2e-3 / 4, 3e-3 / 4])  # a warm-up from step 5
    assert [s for _, s in rates] == pytest.approx([1e-2 / 4, 2e-2 / 4, 3e-2 / 4] + [1e-2] * 5)


def test_a_schedule_only_start_moves_the_sigmas_first_and_is_capped_in_a_short_round(tmp_path) -> None:
    """With `schedule_first_steps` the weights start at that step (recorded in the checkpoint, so a resumed
    round keeps it) and the EMA averages only the steps that moved them; in a round too short for it the start
    ends at a quarter of the round, so the weights still get most of the steps."""
    spec = Phase2Spec(max_steps=24, batch_size=16, steps_per_epoch=6, lr=2e-3, lr_final=2e-4, warmup_steps=2,
                      pool_size=32, schedule_lr=5e-2, schedule_first_steps=4)
    res = _tiny_ipndm_round(spec, tmp_path / "first")
    assert res.stopped_reason is None and res.history[-1]["test_error"] < 0.9 * res.initial["test_error"]
    last = ck.read_checkpoint(sorted((tmp_path / "first" / "checkpoints").iterdir())[-1])
    assert last.state.weights_from == 4 and int(last.optimizer["ema_updates"]) == 24 - 4
    assert res.sigmas is not None and res.sigmas != res.history[0]["sigmas"]
    # the round's sigmas are the EMA of the trained ones (paired with the EMA weights), not the last raw step's
    raw, averaged = last.optimizer["schedule_logits"], last.optimizer["schedule_ema_logits"]
    assert not torch.allclose(raw, averaged) and int(last.optimizer["schedule_ema_updates"]) == 24
    ends = (res.sigmas[-1], res.sigmas[0])
    assert res.sigmas == pytest.approx(sigmas_from_logits(averaged.double(), *ends).tolist(), rel=1e-5)
    long = _tiny_ipndm_round(spec.model_copy(update={"schedule_first_steps": 1000}), tmp_path / "capped")
    capped = ck.read_checkpoint(sorted((tmp_path / "capped" / "checkpoints").iterdir())[-1])
    assert capped.state.weights_from == 6  # a quarter of 24 steps
    assert long.history[-1]["test_error"] < 0.9 * long.initial["test_error"]
    with pytest.raises(ValueError, match="schedule_first_steps"):
        Phase2Spec(schedule_first_steps=10, schedule_lr=0.0)
    assert Phase2Spec(schedule_lr=0.0).weights_wait == 0


def test_the_weights_and_the_sigmas_are_capped_apart() -> None:
    """A large weight gradient does not shrink the sigmas' small one (as one joint cap would), and a spike in the
    sigmas' gradient is capped like the weights' is."""
    module, learned = torch.nn.Linear(4, 4), LearnedSchedule(SIGMAS)
    for p in module.parameters():
        p.grad = torch.full_like(p, 10.0)
    learned.logits.grad = torch.full_like(learned.logits, 0.01)
    weights, sigmas = clip_gradients(module, learned, 1.0)
    assert weights > 10 and sigmas == pytest.approx(0.01 * len(SIGMAS[1:]) ** 0.5, rel=1e-5)
    assert torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in module.parameters()])) == pytest.approx(1.0)
    assert torch.allclose(learned.logits.grad, torch.full_like(learned.logits, 0.01))  # under the cap: untouched
    learned.logits.grad = torch.full_like(learned.logits, 100.0)
    _, spike = clip_gradients(module, learned, 1.0)
    assert spike > 100 and float(learned.logits.grad.norm()) == pytest.approx(1.0, rel=1e-5)
    assert clip_gradients(module, None, 1.0)[1] is None


def test_merging_the_first_step_frees_its_node_for_the_widest_other_step() -> None:
    """The first step spans Phase-1's first two; the freed node splits the widest of the other steps (in log
    sigma) at its geometric middle; the ends and the step count stay, and the result is strictly decreasing."""
    merged = merged_first_step(SIGMAS)
    assert merged == pytest.approx((80.0, 2.5, 0.7, 0.2, 0.05, (0.05 * 0.002) ** 0.5, 0.002))
    assert merged[0] == SIGMAS[0] and merged[-1] == SIGMAS[-1] and len(merged) == len(SIGMAS)
    top_heavy = (80.0, 20.0, 10.0, 0.01, 0.002)  # the widest other step is at the top: 10 -> 0.01
    assert merged_first_step(top_heavy) == pytest.approx((80.0, 10.0, 10.0 ** 0.5 * 0.1, 0.01, 0.002))
    assert merged_first_step((80.0, 1.0, 0.002)) == (80.0, 1.0, 0.002)  # two steps: no other step to put it in
    assert start_sigmas(SIGMAS, "phase1") == SIGMAS and start_sigmas(SIGMAS, "merge_first") == merged
    with pytest.raises(ValueError, match="schedule_start"):
        start_sigmas(SIGMAS, "middle")
    # a student of an earlier round starts from its own Phase-1 pick: merging again would take another step off the top
    assert round_start(SIGMAS, "merge_first", fine_tuned=False) == merged
    assert round_start(SIGMAS, "merge_first", fine_tuned=True) == SIGMAS


def test_a_round_with_a_merged_first_step_starts_there_and_is_its_own_round(tmp_path) -> None:
    """The round's learned sigmas start merged (the untouched model's start E stays Phase-1's: the baseline the
    round is scored against), its key differs from a Phase-1 start's, and a fixed schedule refuses the option."""
    spec = Phase2Spec(max_steps=6, batch_size=16, steps_per_epoch=6, lr=2e-3, lr_final=2e-4, warmup_steps=2,
                      pool_size=32, schedule_lr=1e-6, schedule_first_steps=0, schedule_start="merge_first")
    res = _tiny_ipndm_round(spec, tmp_path / "merged")
    plain = _tiny_ipndm_round(spec.model_copy(update={"schedule_start": "phase1"}), tmp_path / "plain")
    assert res.initial["test_error"] == pytest.approx(plain.initial["test_error"])
    phase1 = plain.history[0]["sigmas"]
    assert res.history[0]["sigmas"] == pytest.approx(list(merged_first_step(tuple(phase1))), rel=1e-3)
    with pytest.raises(ValueError, match="another"):
        _tiny_ipndm_round(spec.model_copy(update={"schedule_start": "phase1"}), tmp_path / "merged")
    with pytest.raises(ValueError, match="schedule_start"):
        Phase2Spec(schedule_lr=0.0, schedule_start="merge_first")
