from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from fewstep_search.bank import build_bank
from fewstep_search.dp import dp_optimal
from fewstep_search.objectives import bound, grid_bound, grid_cost_matrix, true_error
from fewstep_search.schedules import Schedule, make_schedule
from fewstep_search.solvers import get_solver


def _x_blind(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A denoiser that ignores x (its flow Jacobian is sigma_0/sigma exactly)."""
    return torch.stack([torch.sin(torch.log(sigma)), torch.cos(torch.log(sigma))], 1).to(x)


def test_bw_equals_b0_when_the_denoiser_ignores_x() -> None:
    b = build_bank(_x_blind, shape=(2,), sigma_min=0.01, sigma_max=20.0, n_trajectories=8, grid_size=32,
                   gain_substeps=4)  # RK4 Jacobian error ~ cells * h^5/120: 4 sub-steps make it ~1e-7
    cw, c0 = grid_cost_matrix(b, "bw"), grid_cost_matrix(b, "b0")
    finite = torch.isfinite(c0)
    torch.testing.assert_close(cw[finite], c0[finite], rtol=1e-5, atol=1e-12)
    s = make_schedule("edm", 5, 0.01, 20.0).tensor()
    torch.testing.assert_close(bound(b, s, "bw"), bound(b, s, "b0"), rtol=1e-5, atol=0)


def test_dp_equals_brute_force() -> None:
    gen = torch.Generator().manual_seed(3)
    m, nfe = 9, 3
    cost = torch.rand(m, m, generator=gen, dtype=torch.float64)
    cost = torch.where(torch.triu(torch.ones(m, m, dtype=torch.bool), 1), cost, torch.full_like(cost, np.inf))
    idx, value = dp_optimal(cost, nfe)
    best = min(
        (grid_bound(cost, [0, *mid, m - 1]), [0, *mid, m - 1])
        for mid in itertools.combinations(range(1, m - 1), nfe - 1)
    )
    assert value == pytest.approx(best[0], rel=1e-12)
    assert list(idx) == best[1]


def test_dp_on_a_real_bank_beats_every_grid_heuristic_on_its_bound(bank8) -> None:
    cost = grid_cost_matrix(bank8.fit(), "bw")
    idx, value = dp_optimal(cost, 4)
    assert idx[0] == 0 and idx[-1] == bank8.grid.numel() - 1 and np.all(np.diff(idx) > 0)
    rng = np.random.default_rng(0)
    for _ in range(50):
        mid = np.sort(rng.choice(np.arange(1, bank8.grid.numel() - 1), 3, replace=False))
        assert value <= grid_bound(cost, [0, *mid, bank8.grid.numel() - 1]) + 1e-12


def test_continuous_bound_agrees_with_the_grid_cost_on_grid_schedules(bank8) -> None:
    fit = bank8.fit()
    cost = grid_cost_matrix(fit, "bw")
    idx = [0, 7, 20, 33, 47]
    sig = bank8.grid[idx]
    assert float(bound(fit, sig, "bw", quad_points=32)) == pytest.approx(grid_bound(cost, idx), rel=0.03)


def test_bounds_and_true_error_are_differentiable(bank8, mixture8) -> None:
    logits = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    from fewstep_search.schedules import sigmas_from_logits

    sig = sigmas_from_logits(logits, 0.002, 80.0)
    for value in (bound(bank8, sig, "bw"), bound(bank8, sig, "b0"), true_error(mixture8, bank8, sig)):
        (g,) = torch.autograd.grad(value, logits, retain_graph=True)
        assert torch.isfinite(g).all() and float(g.abs().sum()) > 0


def test_true_error_matches_a_direct_computation(bank8, mixture8) -> None:
    s = make_schedule("edm", 6, 0.002, 80.0)
    # E is the error of the sampler users run: the last node replaced by 0 (N calls, the last lands on D)
    out = get_solver("ddim")(mixture8, bank8.x_start, torch.cat([s.tensor()[:-1], torch.zeros(1, dtype=torch.float64)]))
    expect = (out - bank8.x_end).norm(dim=1).mean()
    assert float(true_error(mixture8, bank8, s.tensor(), batch_size=10)) == pytest.approx(float(expect), rel=1e-12)
    with pytest.raises(ValueError, match="starts at"):
        true_error(mixture8, bank8, Schedule(np.array([10.0, 1.0, 0.002])).tensor())


def test_a_batched_true_error_has_the_same_gradient_with_one_batch_in_memory(bank8, mixture8) -> None:
    """The chunked backward (one batch's graph at a time) equals the one-graph gradient, through a
    parameterization, for every solver; a model with trainable weights still gets its weights' gradient."""
    from fewstep_search.schedules import sigmas_from_logits

    for solver in ("ddim", "ipndm"):
        grads, values = [], []
        for batch_size in (None, 7):
            logits = torch.linspace(-0.3, 0.4, 6, dtype=torch.float64).requires_grad_(True)
            value = true_error(mixture8, bank8, sigmas_from_logits(logits, 0.002, 80.0), solver=solver,
                               batch_size=batch_size)
            value.backward()
            values.append(float(value.detach()))
            grads.append(logits.grad)
        assert values[1] == pytest.approx(values[0], rel=1e-12)
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-9, atol=1e-14)
        assert float(grads[0].abs().sum()) > 0

    net = torch.nn.Linear(bank8.shape[0], bank8.shape[0]).double()
    model = lambda x, sigma: mixture8(x, sigma) + 1e-3 * net(x)  # noqa: E731 (a plain function around a module)

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            return model(x, sigma)

    sig = make_schedule("edm", 4, 0.002, 80.0).tensor().requires_grad_(True)
    true_error(Wrapped(), bank8, sig, batch_size=7).backward()
    assert net.weight.grad is not None and float(net.weight.grad.abs().sum()) > 0


def test_true_error_checks_both_endpoints(bank8, mixture8) -> None:
    with pytest.raises(ValueError, match="ends at"):
        true_error(mixture8, bank8, Schedule(np.array([80.0, 1.0, 0.01])).tensor())
    s = make_schedule("edm", 4, 0.002, 80.0).sigmas.copy()
    s[-1] = 0.0  # an export's last step into 0 is allowed
    assert float(true_error(mixture8, bank8, torch.tensor(s))) > 0


def test_how_the_bounds_relate_to_the_true_error_on_random_schedules(bank8, mixture8) -> None:
    """The claims docs/search.md makes, measured on 60 random schedules per budget (test trajectories).

    B_0 ignores propagation: it lies below E on (nearly) every schedule and ranks schedules poorly. B_w weights
    each step's error by the RMS flow gain: not a guaranteed bound (an RMS gain is an average, not an operator
    norm) but an estimate of E's size that ranks schedules the way E does.
    """
    from scipy.stats import spearmanr

    from fewstep_search.schedules import sigmas_from_logits

    test = bank8.test()
    gen = torch.Generator().manual_seed(0)
    for nfe in (4, 8):
        e, bw, b0 = [], [], []
        for _ in range(60):
            s = sigmas_from_logits(torch.randn(nfe, generator=gen, dtype=torch.float64), 0.002, 80.0)
            e.append(float(true_error(mixture8, test, s)))
            bw.append(float(bound(test, s, "bw")))
            b0.append(float(bound(test, s, "b0")))
        e_, bw_, b0_ = np.array(e), np.array(bw), np.array(b0)
        assert np.mean(b0_ < e_) >= 0.9
        assert 0.5 < float(np.median(bw_ / e_)) < 1.5
        rho_w, rho_0 = spearmanr(e_, bw_)[0], spearmanr(e_, b0_)[0]
        assert rho_w >= 0.8 and rho_w > rho_0 + 0.3
