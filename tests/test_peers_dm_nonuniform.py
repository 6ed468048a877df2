"""DM-NonUniform (Xue et al., CVPR 2024): the objective is built from exact Lagrange integrals, depends on the
schedule only (no model, no data), and its trust-constr solution is monotone with fixed endpoints."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from fewstep_search.models.mixture import GaussianMixture
from fewstep_search.objectives import convex_weights
from fewstep_search.phase1.peers.dm_nonuniform import (
    DMN_SOLVERS,
    dm_nonuniform_schedule,
    dmn_objective,
    node_coefficients,
    step_weights,
)
from fewstep_search.schedules import karras, log_uniform, vp_time_quadratic
from fewstep_search.solvers import dpmpp_2m

LO, HI = 0.002, 80.0


def _lambdas(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    inner = np.sort(rng.uniform(-math.log(HI), -math.log(LO), n - 1))
    return np.concatenate([[-math.log(HI)], inner, [-math.log(LO)]])


@pytest.mark.parametrize("solver", ["lagrange2", "lagrange3"])
def test_step_weights_integrate_polynomials_exactly(solver: str) -> None:
    """The paper's J_{n,m} = int e^lambda l_m: the step reproduces int e^lambda p(lambda) for every polynomial p of
    degree below the step's order (the property the error bound rests on: constants cancel exactly)."""
    lam = _lambdas(7, seed=1)
    steps = step_weights(lam, solver=solver, lower_order_final=False)
    for n, step in enumerate(steps):
        k = len(step)
        for degree in range(k):
            def p(x: float, degree: int = degree) -> float:
                return (x - 0.3) ** degree
            exact = quad(lambda x, p=p: math.exp(x) * p(x), lam[n], lam[n + 1], epsabs=0, epsrel=1e-12)[0]
            approx = sum(j * p(lam[m]) for m, j in step.items())
            assert approx == pytest.approx(exact, rel=1e-8), (n, degree)


def test_orders_warm_start_and_lower_order_final() -> None:
    lam = _lambdas(7, seed=2)
    assert [len(s) for s in step_weights(lam, solver="lagrange3", lower_order_final=True)] == [1, 2, 3, 3, 3, 2, 1]
    assert [len(s) for s in step_weights(lam, solver="lagrange2", lower_order_final=False)] == [1, 2, 2, 2, 2, 2, 2]


def test_ddim_coefficients_are_the_convex_weights() -> None:
    """Order 1: c_m = sigma_min (1/sigma_{m+1} - 1/sigma_m), the DESIGN's convex-combination weights."""
    s = vp_time_quadratic(7, LO, HI)
    w, _ = convex_weights(s.tensor())
    assert np.allclose(node_coefficients(s.lambdas(), solver="ddim"), w.numpy(), rtol=1e-12)


def test_dpmpp_2m_coefficients_reproduce_the_solver() -> None:
    """The "dpmpp_2m" weights are exactly what `solvers.dpmpp_2m` computes: its output is
    (sigma_min/sigma_max) x_N + sum_m c_m D(x_m, sigma_m) for any model."""
    model = GaussianMixture.random(4, n_components=3, seed=2)
    s = karras(6, LO, HI)
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * HI
    outs: list[torch.Tensor] = []
    y = dpmpp_2m(model, x, s.tensor(), callback=lambda d: outs.append(d["denoised"]))
    c = node_coefficients(s.lambdas(), solver="dpmpp_2m", lower_order_final=False)
    combo = (LO / HI) * x + sum(float(cm) * d for cm, d in zip(c, outs, strict=True))
    assert torch.allclose(combo, y, rtol=1e-10, atol=1e-12)


def test_unit_error_ddim_objective_is_schedule_independent() -> None:
    """With w = 1 the first-order objective telescopes to 1 - sigma_min/sigma_max: the error model is what makes
    DDIM schedules differ."""
    for s in (log_uniform(5, LO, HI), karras(5, LO, HI), vp_time_quadratic(9, LO, HI)):
        assert dmn_objective(s.lambdas(), solver="ddim", error_model="unit") == pytest.approx(1 - LO / HI, rel=1e-12)


@pytest.mark.parametrize("solver", DMN_SOLVERS)
@pytest.mark.parametrize("nfe", [3, 5])
def test_solution_is_monotone_with_fixed_endpoints_and_improves_the_starts(solver: str, nfe: int) -> None:
    s = dm_nonuniform_schedule(nfe, LO, HI, solver=solver, maxiter=150)
    assert s.nfe == nfe and s.sigmas[0] == HI and s.sigmas[-1] == LO
    gaps = np.diff(s.lambdas())
    assert np.all(gaps >= 1e-4 * math.log(HI / LO) * (1 - 1e-6))

    def obj(x: object) -> float:
        return dmn_objective(x.lambdas(), solver=solver)  # type: ignore[attr-defined]

    assert obj(s) <= min(obj(log_uniform(nfe, LO, HI)), obj(karras(nfe, LO, HI))) + 1e-12


def test_model_free_same_schedule_for_every_model() -> None:
    """No model or data enters: the schedule is a function of (nfe, range, solver) alone, so two unrelated
    models with the same range get the same schedule through the search wrapper."""
    from fewstep_search.bank import build_bank
    from fewstep_search.phase1.parameterizations import make_parameterization
    from fewstep_search.phase1.peers import PEER_OPTIMIZERS
    from fewstep_search.phase1.problem import Problem

    schedules = []
    for seed, dim in ((1, 4), (7, 6)):
        model = GaussianMixture.random(dim, n_components=3, seed=seed)
        bank = build_bank(model, shape=(dim,), sigma_min=LO, sigma_max=HI, n_trajectories=8, grid_size=8, probes=1)
        param = make_parameterization("logits", nfe=4, sigma_min=LO, sigma_max=HI)
        problem = Problem(objective="bw", parameterization=param, fit=bank.fit(), denoiser=model)
        opt = PEER_OPTIMIZERS["dm_nonuniform"](maxiter=100)
        schedules.append(opt.minimize(problem, karras(4, LO, HI)).schedule)
    assert np.array_equal(schedules[0].sigmas, schedules[1].sigmas)
    assert np.array_equal(schedules[0].sigmas, dm_nonuniform_schedule(4, LO, HI, maxiter=100).sigmas)


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="solver"):
        dm_nonuniform_schedule(4, LO, HI, solver="unipc")
    with pytest.raises(ValueError, match="init"):
        dm_nonuniform_schedule(4, LO, HI, init=karras(5, LO, HI))
    with pytest.raises(ValueError, match="error model"):
        dmn_objective(_lambdas(3, 0), error_model="gaussian")  # type: ignore[arg-type]
