"""Phase-2 math: the teacher's interval targets (checked by step halving), the ideal output, the loss weights."""

from __future__ import annotations

import math

import pytest
import torch
from test_phase2_models import make_tiny

from fewstep_search.bank import Bank
from fewstep_search.models.mixture import GaussianMixture
from fewstep_search.phase2.loss import (
    fixed_state_loss,
    rms_gain,
    step_weights,
    student_state_loss,
    student_state_targets,
    teacher_forced_loss,
)
from fewstep_search.phase2.targets import IntervalTeacher, calls_for, ideal_output, solve_interval
from fewstep_search.schedules import make_schedule
from fewstep_search.solvers import ddim, reference, substeps_for


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return make_tiny(seed=3)


def _x(n: int = 16, dim: int = 8, sigma: float = 80.0) -> torch.Tensor:
    return sigma * torch.randn(n, dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


@pytest.mark.parametrize("solver", ["rk4", "rk4_exp", "auto"])
@pytest.mark.parametrize(("s0", "s1"), [(80.0, 4.0), (4.0, 0.5), (0.2, 0.002)])
def test_targets_converge_under_step_halving(mixture8: GaussianMixture, solver: str, s0: float, s1: float) -> None:
    """Halving the sub-step shrinks the target error (4th order away from the stiff low-noise end), and the
    default bound (0.25 in log sigma) leaves an error well under 1% of the step's own size ||y - r x||."""
    x = _x(sigma=s0)
    ref = solve_interval(mixture8, x, s0, s1, max_log_step=0.25 / 16, solver=solver)
    errs = [float((solve_interval(mixture8, x, s0, s1, max_log_step=h, solver=solver) - ref).norm()) for h in
            (0.5, 0.25, 0.125)]
    scale = float((ref - (s1 / s0) * x).norm())
    assert errs[1] < 5e-3 * scale
    assert errs[2] < errs[1] < errs[0]
    assert errs[1] / errs[2] > (8.0 if s1 >= 0.5 else 3.0)


def test_exponential_form_is_far_more_accurate_at_high_noise(mixture8: GaussianMixture) -> None:
    """Why `rk4_exp` exists: at high noise |x| ~ sigma sqrt(d) dominates plain RK4's error; the integrating
    factor removes it (same calls per sub-step)."""
    x = _x()
    ref = solve_interval(mixture8, x, 80.0, 4.0, max_log_step=0.25 / 16, solver="rk4_exp")
    plain = float((solve_interval(mixture8, x, 80.0, 4.0, solver="rk4") - ref).norm())
    expo = float((solve_interval(mixture8, x, 80.0, 4.0, solver="rk4_exp") - ref).norm())
    assert expo < plain / 10


def test_one_long_rk4_step_is_far_off_but_bounded_steps_are_not(mixture8: GaussianMixture) -> None:
    """DESIGN.md pitfall: one RK4 step across 80 -> 4 is unstable; the sub-step bound fixes it."""
    x = _x()
    ref = solve_interval(mixture8, x, 80.0, 4.0, max_log_step=0.01)
    one = solve_interval(mixture8, x, 80.0, 4.0, max_log_step=10.0)
    bounded = solve_interval(mixture8, x, 80.0, 4.0, max_log_step=0.25)
    assert substeps_for(80.0, 4.0, 10.0) == 1 and substeps_for(80.0, 4.0, 0.25) == 12
    assert float((one - ref).norm()) > 100 * float((bounded - ref).norm())
    assert float((one - ref).norm()) > 0.1 * float(ref.norm())


def test_the_teacher_solvers_agree_with_the_reference_solver(mixture8: GaussianMixture) -> None:
    x = _x()
    sig = torch.tensor([80.0, 0.3], dtype=torch.float64)
    ref = reference(mixture8, x, sig, substeps=64)
    for solver in ("rk4", "rk4_exp", "auto"):
        y = solve_interval(mixture8, x, 80.0, 0.3, solver=solver)
        assert torch.allclose(y, ref, rtol=0, atol=1e-4 * float(ref.norm()))


def test_auto_splits_at_sigma_one_and_counts_its_calls(tiny: torch.nn.Module) -> None:
    calls = []

    def counted(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        calls.append(float(s[0]))
        return tiny(x, s)

    x = _x(sigma=4.0).float()
    solve_interval(counted, x, 4.0, 0.25, solver="auto", max_log_step=0.5)
    # 4 -> 1 (log 1.39: 3 exp sub-steps) and 1 -> 0.25 (3 rk4 sub-steps), 4 calls each
    assert len(calls) == calls_for(4.0, 0.25, max_log_step=0.5, solver="auto") == 24
    assert min(calls[:12]) >= 1.0 - 1e-9 and max(calls[12:]) <= 1.0 + 1e-9


def test_ideal_output_makes_the_ddim_step_land_on_the_target(tiny: torch.nn.Module) -> None:
    x = _x(sigma=3.0).float()
    y = solve_interval(tiny, x, 3.0, 1.0)
    dbar = ideal_output(y, x, 3.0, 1.0)
    step = ddim(lambda xx, s: dbar, x, torch.tensor([3.0, 1.0], dtype=torch.float64))
    assert torch.allclose(step, y, atol=1e-5)
    # over a tiny interval D_bar tends to the teacher's own output at s0
    y_short = solve_interval(tiny, x, 3.0, 3.0 * math.exp(-1e-3))
    with torch.no_grad():
        d0 = tiny(x, torch.full((x.shape[0],), 3.0))
    assert float((ideal_output(y_short, x, 3.0, 3.0 * math.exp(-1e-3)) - d0).abs().max()) < 5e-3


def test_d0_saves_one_call_per_interval_and_changes_nothing(tiny: torch.nn.Module) -> None:
    calls = []

    def counted(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return tiny(x, s)

    x = _x(sigma=4.0).float()
    with torch.no_grad():
        d0 = tiny(x, torch.full((x.shape[0],), 4.0))
    a = solve_interval(counted, x, 4.0, 0.5)
    n_full = len(calls)
    calls.clear()
    b = solve_interval(counted, x, 4.0, 0.5, d0=d0)
    assert n_full == calls_for(4.0, 0.5, max_log_step=0.25) and len(calls) == n_full - 1
    assert torch.allclose(a, b, atol=1e-5)


def _bank_like(phi: torch.Tensor, grid: torch.Tensor) -> Bank:
    k, m = phi.shape
    z = torch.zeros(k, 2)
    return Bank(grid=grid, x_start=z, x_end=z, denoised=torch.zeros(k, m, 2), phi=phi, split=torch.zeros(k))


def test_rms_gain_interpolates_the_mean_square_in_log_sigma() -> None:
    grid = torch.tensor([80.0, 8.0, 0.8], dtype=torch.float64)
    phi = torch.tensor([[3.0, 2.0, 1.0], [5.0, 2.0, 1.0]])
    bank = _bank_like(phi, grid)
    got = rms_gain(bank, torch.tensor([80.0, 8.0, math.sqrt(80.0 * 8.0), 0.8, 0.1]))
    want_mid = math.sqrt(0.5 * (17.0 + 4.0))  # halfway in log sigma between mean squares 17 and 4
    assert torch.allclose(got, torch.tensor([math.sqrt(17.0), 2.0, want_mid, 1.0, 1.0], dtype=torch.float64))


def test_step_weights_are_the_propagated_interval_weights(bank8: Bank) -> None:
    sig = make_schedule("edm", 5, bank8.sigma_min, bank8.sigma_max).tensor()
    w = step_weights(bank8, sig)
    run = torch.cat([sig[:-1], sig.new_zeros(1)])  # the sampler's nodes: the last step goes into 0
    r = run[1:] / run[:-1]
    assert w.shape == (5,) and torch.all(w > 0) and float(r[-1]) == 0.0
    assert torch.allclose(w, (rms_gain(bank8, sig[1:]) * (1 - r)) ** 2)
    assert float(w[-1]) == pytest.approx(1.0, rel=1e-6)  # into 0 the output is the sample: gain 1, phi 1
    assert math.isclose(float(rms_gain(bank8, sig[-1:])), 1.0, rel_tol=1e-6)  # phi = 1 at sigma_min


def test_losses_vanish_for_the_teacher_on_its_own_trajectory_and_not_for_another_model(tiny: torch.nn.Module) -> None:
    sigmas = tuple(float(s) for s in make_schedule("edm", 3, 0.002, 80.0).sigmas)
    teacher = IntervalTeacher(tiny, sigmas)
    x = _x(8).float()
    states = teacher.trajectory(x)
    w = torch.ones(3)
    other = make_tiny(seed=4)
    with torch.no_grad():
        # the teacher-forced loss of a student equal to the teacher is its own one-step (DDIM) error: small but
        # positive; a different network is much worse
        own = teacher_forced_loss(tiny, states, sigmas, w).total
        diff = teacher_forced_loss(other, states, sigmas, w).total
        assert 0 < float(own) < float(diff)
        # the student-state loss with D_bar targets: a student that outputs D_bar exactly has zero loss
        first = teacher.target(x, 0)
        parts = student_state_loss(lambda xx, s: first if s[0] == sigmas[0] else teacher.target(xx, 1 if s[0] ==
                                   sigmas[1] else 2), teacher.target, x, sigmas, w, first_target=first)
        assert float(parts.total) < 1e-8


def test_the_batched_student_state_loss_equals_the_sequential_one(tiny: torch.nn.Module) -> None:
    """Training uses (no-grad states, then one batched forward); it must be the DESIGN.md loss, gradients included."""
    sigmas = tuple(float(s) for s in make_schedule("vp_time_quadratic", 4, 0.002, 80.0).sigmas)
    teacher = IntervalTeacher(make_tiny(seed=9), sigmas, max_log_step=1.0)
    x = _x(6).float()
    w = torch.tensor([0.5, 1.0, 2.0, 1.5])
    seq = student_state_loss(tiny, teacher.target, x, sigmas, w)
    g_seq = torch.autograd.grad(seq.total, list(tiny.parameters()))
    states, targets = student_state_targets(tiny, teacher.target, x, sigmas)
    bat = fixed_state_loss(tiny, states, targets, sigmas, w)
    g_bat = torch.autograd.grad(bat.total, list(tiny.parameters()))
    assert float(bat.total.detach()) == pytest.approx(float(seq.total.detach()), rel=1e-5)
    assert torch.allclose(bat.per_step, seq.per_step, rtol=1e-4)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(g_seq, g_bat, strict=True))


def test_the_end_point_solve_converges_to_the_accurate_interval_solve() -> None:
    """iPNDM on the fine grid (the end-to-end term's x0*) approaches the bounded-step RK4 solve, followed by the
    same step into 0 (x*(0) = D(x*(sigma_min), sigma_min)), as it refines."""
    from fewstep_search.phase2.targets import end_point, fine_grid

    den = make_tiny(seed=5)
    x = 80.0 * torch.randn(16, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    at_min = solve_interval(den, x, 80.0, 0.002, max_log_step=0.02, solver="rk4")
    with torch.no_grad():
        ref = den(at_min, torch.full((16,), 0.002, dtype=torch.float64))
    errs = [float((end_point(den, x, 80.0, 0.002, steps=n) - ref).norm(dim=1).mean()) for n in (25, 100, 400)]
    assert errs[2] < errs[1] < errs[0] and errs[2] < 1e-3 * float(ref.norm(dim=1).mean())
    grid = fine_grid(80.0, 0.002, 10)
    assert grid[0] == 80.0 and grid[-1] == 0.002 and bool((grid[1:] < grid[:-1]).all())
    with pytest.raises(ValueError, match="fine grid"):
        fine_grid(0.002, 80.0, 10)


def test_the_norm_end_to_end_loss_is_the_true_error_itself() -> None:
    from fewstep_search.phase2.loss import end_to_end_error

    a, b = torch.randn(6, 3, 4, dtype=torch.float64), torch.randn(6, 3, 4, dtype=torch.float64)
    dist = (a - b).flatten(1).norm(dim=1)
    assert float(end_to_end_error(a, b, "norm")) == pytest.approx(float(dist.mean()), rel=1e-9)
    assert float(end_to_end_error(a, b)) == pytest.approx(float(dist.square().mean()), rel=1e-9)
    with pytest.raises(ValueError, match="unknown end-to-end loss"):
        end_to_end_error(a, b, "l1")


def test_the_path_solve_visits_every_node_and_agrees_with_interval_solves() -> None:
    """`path_points` (one iPNDM pass with the schedule's nodes inserted) gives the teacher's state at each node:
    close to bounded-step RK4 node to node, with the start unchanged and the last the clean x*(0), at `steps` + N
    calls per sample."""
    from fewstep_search.phase2.targets import CountingDenoiser, path_points

    den = CountingDenoiser(make_tiny(seed=5))
    x = 80.0 * torch.randn(16, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    nodes = tuple(float(s) for s in make_schedule("vp_time_quadratic", 5, 0.002, 80.0).sigmas)
    path = path_points(den, x, nodes, steps=200)
    assert path.shape == (6, 16, 8) and torch.equal(path[0], x)
    assert den.sample_calls == 16 * (200 + 4 + 1)  # the fine grid's, one per interior node, the step into 0
    ref = [x]
    for s0, s1 in zip(nodes[:-1], nodes[1:], strict=True):
        ref.append(solve_interval(den, ref[-1], s0, s1, max_log_step=0.02, solver="rk4"))
    ref[-1] = den(ref[-1], torch.full((16,), nodes[-1], dtype=torch.float64))  # the step into 0
    for k in range(1, 6):
        err = float((path[k] - ref[k]).norm(dim=1).mean())
        assert err < 1e-3 * float(ref[k].norm(dim=1).mean())


def test_the_path_term_is_zero_on_the_teachers_path_and_weighted_by_the_gain() -> None:
    from fewstep_search.phase2.loss import path_error

    target = torch.randn(5, 6, 3, dtype=torch.float64)
    w = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    assert float(path_error(target.clone(), target, w)) == pytest.approx(0.0, abs=1e-5)  # the sqrt's 1e-12 guard
    states = target.clone()
    states[2] += 1.0  # interior node 2 (weight 1.0) off by a vector of norm sqrt(3) in every sample
    states[0] += 5.0  # the start and the end are not the path term's business
    states[-1] -= 5.0
    assert float(path_error(states, target, w)) == pytest.approx(math.sqrt(3) / 3, abs=1e-5)
    assert float(path_error(states, target, w, "squared")) == pytest.approx(3.0 / 3, rel=1e-6)
    assert float(path_error(target[[0, -1]], target[[0, -1]], w[:0])) == 0.0  # N = 1: no interior node
