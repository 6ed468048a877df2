"""GITS (Chen et al., ICML 2024): the DP returns the optimal path of its own coefficient-weighted cost, checked by
brute force; the cost matrix is the one-step Euler deviation from the bank's teacher trajectory."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from fewstep_search.bank import Bank, build_bank
from fewstep_search.dp import dp_optimal
from fewstep_search.models.mixture import GaussianMixture
from fewstep_search.phase1.peers.gits import (
    gits_bank_cost,
    gits_cost_matrix,
    gits_dp,
    gits_path_cost,
    gits_schedule,
    teacher_trajectory,
)


@pytest.fixture(scope="module")
def model() -> GaussianMixture:
    return GaussianMixture.random(8, n_components=6, seed=1)


@pytest.fixture(scope="module")
def bank(model: GaussianMixture) -> Bank:
    return build_bank(model, shape=(8,), sigma_min=0.002, sigma_max=80.0, n_trajectories=32, grid_size=32, seed=0,
                      probes=1, model_id="mix8")


@pytest.fixture(scope="module")
def cost(bank: Bank) -> torch.Tensor:
    states, outputs = teacher_trajectory(bank)
    return gits_cost_matrix(states, outputs, bank.grid)


def _brute_force(c: np.ndarray, nfe: int, coeff: float) -> tuple[tuple[int, ...], float]:
    m = c.shape[0]
    best, arg = np.inf, ()
    for inner in itertools.combinations(range(1, m - 1), nfe - 1):
        path = (0, *inner, m - 1)
        v = sum(coeff**n * c[path[n], path[n + 1]] for n in range(nfe))
        if v < best:
            best, arg = v, path
    return arg, best


@pytest.mark.parametrize("coeff", [1.0, 1.15, 0.8, 2.0])
@pytest.mark.parametrize("nfe", [1, 2, 3, 4])
def test_dp_is_optimal_by_brute_force(cost: torch.Tensor, coeff: float, nfe: int) -> None:
    """On a 14-point sub-grid of the real GITS cost: the DP's value is the brute-force minimum over every path and
    its path attains it."""
    sub = np.linspace(0, cost.shape[0] - 1, 14).round().astype(int)
    c = cost.numpy()[np.ix_(sub, sub)]
    idx, value = gits_dp(c, nfe, coeff=coeff)
    path, best = _brute_force(c, nfe, coeff)
    assert value == pytest.approx(best, rel=1e-12)
    assert gits_path_cost(c, idx, coeff=coeff) == pytest.approx(best, rel=1e-12)
    assert idx[0] == 0 and idx[-1] == c.shape[0] - 1 and np.all(np.diff(idx) > 0)


def test_dp_brute_force_on_random_costs() -> None:
    """Also for a generic (random, sign-mixed, like the 'dev' metric) upper-triangular cost."""
    rng = np.random.default_rng(3)
    c = np.triu(rng.normal(size=(12, 12)), 1)
    c[np.tril_indices(12)] = np.inf
    for nfe, coeff in itertools.product([2, 3, 5], [0.7, 1.15, 3.0]):
        _, value = gits_dp(c, nfe, coeff=coeff)
        assert value == pytest.approx(_brute_force(c, nfe, coeff)[1], rel=1e-12)


def test_coefficient_one_is_the_plain_dp_and_the_coefficient_matters(cost: torch.Tensor) -> None:
    """coeff = 1 is an unweighted interval-additive cost (`dp_optimal`); the paper's 1.15 moves the path (later,
    low-noise jumps weigh more), so the coefficient really enters through the step index."""
    for nfe in (3, 5, 8):
        idx1, v1 = gits_dp(cost, nfe, coeff=1.0)
        idx_ref, v_ref = dp_optimal(cost, nfe)
        assert v1 == pytest.approx(v_ref, rel=1e-12) and np.array_equal(idx1, idx_ref)
    moved = [not np.array_equal(gits_dp(cost, n, coeff=1.15)[0], gits_dp(cost, n, coeff=1.0)[0]) for n in range(3, 9)]
    assert any(moved)


def test_cost_is_the_euler_jump_deviation_from_the_teacher(bank: Bank, cost: torch.Tensor) -> None:
    """C[a, b] = mean_k ||r x*(a) + (1 - r) D*(a) - x*(b)||, r = sigma_b / sigma_a, from the bank's own states."""
    a, b = 3, 17
    r = float(bank.grid[b] / bank.grid[a])
    xa, xb = bank.states[:, a].double(), bank.states[:, b].double()
    jump = r * xa + (1 - r) * bank.denoised[:, a].double()
    assert float(cost[a, b]) == pytest.approx(float((jump - xb).norm(dim=1).mean()), rel=1e-12)
    assert torch.isinf(cost[b, a]) and torch.isinf(cost[a, a])
    # one fine-grid step follows the teacher far better than one jump across the whole range
    assert float(cost[0, 1]) < 1e-2 * float(cost[0, -1])


def test_lean_bank_re_solves_the_same_teacher(model: GaussianMixture, bank: Bank) -> None:
    """Without stored states (the search's workers get lean banks) the teacher is solved again exactly as built."""
    lean = bank.lean()
    with pytest.raises(ValueError, match="denoiser"):
        teacher_trajectory(lean)
    states, outputs = teacher_trajectory(lean, model, max_trajectories=10)
    ref_states, ref_outputs = teacher_trajectory(bank, max_trajectories=10)
    assert torch.allclose(states, ref_states, rtol=1e-10, atol=1e-12)
    assert torch.allclose(outputs, ref_outputs, rtol=1e-10, atol=1e-12)
    projected = dataclasses.replace(bank, projection=torch.eye(8)[:, :4], denoised=bank.denoised[..., :4])
    states_p, outputs_p = teacher_trajectory(projected, model, max_trajectories=10)  # D recomputed at the states
    assert torch.allclose(outputs_p, ref_outputs, rtol=1e-10, atol=1e-12) and torch.equal(states_p, ref_states)


def test_schedule_lies_on_the_grid_with_exact_endpoints(bank: Bank) -> None:
    for nfe in (3, 6, 10):
        s = gits_schedule(bank, nfe)
        assert s.nfe == nfe and s.sigma_max == 80.0 and s.sigma_min == 0.002
        grid = bank.grid.numpy()
        assert all(np.isclose(grid, v, rtol=1e-15).any() for v in s.sigmas)
    with pytest.raises(ValueError, match="nfe"):
        gits_schedule(bank, 40)



@pytest.mark.parametrize("metric", ["l2", "l1", "dev"])
def test_cost_accumulated_in_chunks_is_the_full_mean(bank: Bank, model: GaussianMixture, metric: str) -> None:
    """Chunks of 7 trajectories (bounded memory; the last chunk smaller), also re-solved on a lean bank, give the
    cost matrix of all trajectories at once."""
    states, outputs = teacher_trajectory(bank)
    full = gits_cost_matrix(states, outputs, bank.grid, metric=metric)  # type: ignore[arg-type]
    upper = torch.isfinite(full)
    for b, den in ((bank, None), (bank.lean(), model)):
        chunked = gits_bank_cost(b, denoiser=den, metric=metric, batch_size=7)  # type: ignore[arg-type]
        assert torch.equal(torch.isfinite(chunked), upper)
        assert torch.allclose(chunked[upper], full[upper], rtol=1e-9, atol=1e-12)


def test_the_trajectory_batch_keeps_gits_memory_bounded_at_latent_sizes() -> None:
    """Four [batch, M, d] float64 tensors at d = 16384, M = 256 are 128 MiB a trajectory: four a batch, not 64."""
    from types import SimpleNamespace

    from fewstep_search.phase1.peers.gits import GITS_BATCH_BYTES, gits_batch

    latent = SimpleNamespace(grid=torch.zeros(256), x_start=torch.zeros(2, 4, 64, 64))
    small = SimpleNamespace(grid=torch.zeros(64), x_start=torch.zeros(2, 16))
    assert gits_batch(latent) == 4 and gits_batch(small) == 64
    mid = SimpleNamespace(grid=torch.zeros(128), x_start=torch.zeros(2, 3, 32, 32))
    assert 4 * gits_batch(mid) * 128 * 3 * 32 * 32 * 8 <= GITS_BATCH_BYTES
