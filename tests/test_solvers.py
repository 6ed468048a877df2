"""Solver conformance suite (STYLE.md lesson 9): every registered solver runs the same checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fewstep_search.models.mixture import SingleGaussian
from fewstep_search.schedules import make_schedule
from fewstep_search.solvers import SOLVERS, get_solver

ORDERS = {"ddim": 1, "euler": 1, "heun": 2, "dpmpp_2m": 2, "reference": 4, "ipndm": 2}
"""Observed orders on log-uniform steps. iPNDM's is 2: its first (Euler) warm-start step and its fixed
equal-step Adams-Bashforth table on a geometric schedule both leave O(h^2) global error (its 4th-order core is
checked exactly by `test_ipndm_adams_bashforth_table_is_exact_on_polynomial_slopes`)."""


@pytest.fixture(scope="module")
def gaussian() -> SingleGaussian:
    return SingleGaussian(torch.full((4,), 0.3), torch.tensor([0.1, 0.2, 0.5, 1.0]))


class TestSolverConformance:
    @pytest.mark.parametrize("name", sorted(SOLVERS))
    def test_order_of_convergence(self, name: str, gaussian: SingleGaussian) -> None:
        x = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 20.0
        exact = gaussian.exact_flow(x, 20.0, 0.05)
        errs = []
        steps = [8, 16, 32] if name != "reference" else [2, 4, 8]
        for n in steps:
            sig = make_schedule("log_uniform", n, 0.05, 20.0).tensor()
            errs.append(float((get_solver(name)(gaussian, x, sig) - exact).norm()))
        observed = math.log2(errs[-2] / errs[-1])
        assert abs(observed - ORDERS[name]) < 0.35, f"{name}: errors {errs}, observed order {observed:.2f}"

    @pytest.mark.parametrize("name", sorted(SOLVERS))
    def test_shapes_determinism_and_callback(self, name: str, gaussian: SingleGaussian) -> None:
        x = torch.randn(3, 4, dtype=torch.float64)
        sig = make_schedule("edm", 4, 0.002, 80.0).tensor()
        seen: list[float] = []
        out = get_solver(name)(gaussian, x, sig, callback=lambda d: seen.append(float(d["sigma"])))
        assert out.shape == x.shape and torch.isfinite(out).all()
        assert torch.equal(out, get_solver(name)(gaussian, x, sig))
        assert seen and seen[0] == pytest.approx(80.0, rel=1e-12)

    @pytest.mark.parametrize("name", sorted(SOLVERS))
    def test_a_final_zero_lands_on_the_last_denoised_output(self, name: str, gaussian: SingleGaussian) -> None:
        """The export convention: the step into sigma = 0 returns D(x_1, sigma_1), at no extra model call."""
        from fewstep_search.export import export_sigmas

        x = torch.randn(3, 4, dtype=torch.float64) * 80
        sig = torch.tensor(export_sigmas(make_schedule("edm", 6, 0.002, 80.0)))
        seen: list[dict] = []
        out = get_solver(name)(gaussian, x, sig, callback=seen.append)
        assert torch.equal(out, seen[-1]["denoised"]) and float(seen[-1]["sigma"]) > 0

    @pytest.mark.parametrize("name", sorted(SOLVERS))
    def test_rejects_bad_sigmas(self, name: str, gaussian: SingleGaussian) -> None:
        x = torch.zeros(2, 4, dtype=torch.float64)
        with pytest.raises(ValueError, match="decreasing"):
            get_solver(name)(gaussian, x, torch.tensor([1.0, 2.0], dtype=torch.float64))


def test_ddim_is_a_convex_combination_of_denoiser_outputs(mixture2) -> None:
    """x0_hat = (sigma_0/sigma_N) x_N + sum_i w_i D(x_i, sigma_i), sum w = 1 - sigma_0/sigma_N (DESIGN.md)."""
    from fewstep_search.objectives import convex_weights

    sig = make_schedule("vp_time_quadratic", 7, 0.002, 80.0).tensor()
    x = torch.randn(16, 2, dtype=torch.float64) * 80
    outs: list[torch.Tensor] = []
    x0_hat = get_solver("ddim")(mixture2, x, sig, callback=lambda d: outs.append(d["denoised"]))
    w, c = convex_weights(sig)
    combo = c * x + sum(wi * d for wi, d in zip(w, outs, strict=True))
    assert float((combo - x0_hat).abs().max()) < 1e-10
    assert abs(float(w.sum()) - (1 - 0.002 / 80.0)) < 1e-10
    assert bool(torch.all(w >= 0))


def test_unknown_solver_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="known: .*ddim"):
        get_solver("rk45")


def test_reference_is_accurate_by_step_halving(mixture2) -> None:
    """Halving the step shrinks the discrepancy ~16x (4th order); 128 cells x 2 sub-steps (the bank default) is
    accurate to ~1e-7 relative on the stiff 2-D mixture (components of std 0.03)."""
    x = torch.randn(32, 2, dtype=torch.float64) * 80
    rel = []
    for cells in (32, 64, 128):
        sig = make_schedule("log_uniform", cells, 0.002, 80.0).tensor()
        a = get_solver("reference")(mixture2, x, sig, substeps=2)
        b = get_solver("reference")(mixture2, x, sig, substeps=4)
        rel.append(float((a - b).norm() / b.norm()))
    assert np.all(np.isfinite(rel))
    assert rel[0] / rel[1] > 10 and rel[1] / rel[2] > 10, rel
    assert rel[2] < 1e-6, rel


def _polynomial_slope(coeffs: list[float]):
    """A denoiser whose epsilon-form slope `(x - D) / sigma` is the polynomial p(sigma), whatever x is."""

    def den(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        return x - s * sum(c * s**k for k, c in enumerate(coeffs))

    return den


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_ipndm_adams_bashforth_table_is_exact_on_polynomial_slopes(degree: int) -> None:
    """iPNDM (Zhang & Chen 2023): Adams-Bashforth of order k integrates slopes of degree < k exactly on equal steps,
    with orders 1, 2, 3 as its warm start and 4 afterwards. For dx/dsigma = p(sigma) the error does not propagate, so
    with deg p = degree all of the error is made in the first `degree` warm-start steps (orders <= degree) and every
    later step adds exactly nothing; a wrong coefficient anywhere in the table breaks the equality."""
    coeffs = [0.7, -0.4, 0.25, -0.05][: degree + 1]
    den = _polynomial_slope(coeffs)
    sig = torch.linspace(6.0, 0.5, 12, dtype=torch.float64)  # 11 equal steps in sigma
    x = torch.randn(3, 2, dtype=torch.float64)

    def exact(lo: float, hi: float) -> torch.Tensor:  # x(lo) = x(hi) + integral_hi^lo p
        return x + sum(c * (lo ** (k + 1) - hi ** (k + 1)) / (k + 1) for k, c in enumerate(coeffs))

    full_err = get_solver("ipndm")(den, x, sig) - exact(float(sig[-1]), float(sig[0]))
    warm = max(degree, 1)  # steps whose order is <= degree (at least the first step, exact when degree == 0)
    warm_err = get_solver("ipndm")(den, x, sig[: warm + 1]) - exact(float(sig[warm]), float(sig[0]))
    assert torch.allclose(full_err, warm_err, atol=1e-12, rtol=0), (full_err, warm_err)
    if degree == 0:
        assert float(full_err.abs().max()) < 1e-12
    else:  # the warm start really is lower order (the test would be vacuous otherwise)
        assert float(warm_err.abs().max()) > 1e-6
