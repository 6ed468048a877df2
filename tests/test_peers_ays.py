"""Align Your Steps-style (Sabour et al., ICML 2024): the log-linear interpolation keeps the endpoints and is the
identity at the same step count; the KLUB estimate matches its closed form on a Gaussian; the coordinate search
never increases it and stops early."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from fewstep_search.denoiser import CheckedDenoiser
from fewstep_search.models.mixture import GaussianMixture, SingleGaussian
from fewstep_search.phase1.peers.ays import KLUB, ays_schedule, coordinate_search, loglinear_interp
from fewstep_search.phase1.peers.data_source import data_samples
from fewstep_search.schedules import karras, log_uniform

LO, HI = 0.002, 80.0


@pytest.fixture(scope="module")
def model() -> GaussianMixture:
    return GaussianMixture.random(8, n_components=6, seed=1)


@pytest.fixture(scope="module")
def klub(model: GaussianMixture) -> KLUB:
    return KLUB(model, data_samples("mixture", model, 48, seed=0), quad_points=4, seed=0)


@pytest.mark.parametrize("nfe", [1, 3, 5, 10, 17])
def test_loglinear_interp_keeps_endpoints_and_order(nfe: int) -> None:
    s = karras(6, LO, HI)
    t = loglinear_interp(s, nfe)
    assert t.nfe == nfe and t.sigmas[0] == HI and t.sigmas[-1] == LO
    assert np.all(np.diff(t.sigmas) < 0)


def test_loglinear_interp_identity_and_refinement() -> None:
    """Identity at the same count; doubling the steps keeps every old node (at the even positions) and puts each
    new node at the geometric mean of its neighbours (linear in log sigma)."""
    s = karras(5, LO, HI)
    assert np.array_equal(loglinear_interp(s, 5).sigmas, s.sigmas)
    d = loglinear_interp(s, 10).sigmas
    assert np.allclose(d[::2], s.sigmas, rtol=1e-12)
    assert np.allclose(d[1::2], np.sqrt(s.sigmas[:-1] * s.sigmas[1:]), rtol=1e-12)
    assert np.allclose(loglinear_interp(log_uniform(4, LO, HI), 9).sigmas, log_uniform(9, LO, HI).sigmas, rtol=1e-12)


def test_klub_matches_its_closed_form_on_a_gaussian() -> None:
    """For data N(mu, s^2): D = mu + a(t)(x - mu), a = s^2/(s^2+t^2), so per dimension
    E||D(x_t,t) - D(x_hi,hi)||^2 = (a_t - a_hi)^2 (s^2 + t^2) + a_hi^2 (hi^2 - t^2); the Monte-Carlo KLUB must match
    int_lo^hi t^-3 (...) dt."""
    s2 = 0.25
    g = SingleGaussian(torch.full((4,), 0.3), torch.full((4,), math.sqrt(s2)))
    gen = torch.Generator().manual_seed(5)
    x0 = g.sample(6000, generator=gen)
    est = KLUB(g, x0, quad_points=12, seed=1)
    for lo, hi in ((0.05, 0.4), (0.3, 2.0), (1.0, 10.0)):
        def f(t: float, hi: float = hi) -> float:
            a_t, a_h = s2 / (s2 + t * t), s2 / (s2 + hi * hi)
            return ((a_t - a_h) ** 2 * (s2 + t * t) + a_h**2 * (hi * hi - t * t)) / t**3
        exact = quad(f, lo, hi, epsrel=1e-10)[0]
        assert est.interval(lo, hi) == pytest.approx(exact, rel=0.02), (lo, hi)


def test_klub_is_deterministic_and_additive(klub: KLUB) -> None:
    s = karras(4, LO, HI)
    total = klub.total(s)
    assert total == klub.total(s)  # common random numbers: a function of the schedule
    assert total == pytest.approx(sum(klub.interval(s.sigmas[i + 1], s.sigmas[i]) for i in range(4)), rel=1e-12)
    with pytest.raises(ValueError, match="lo < hi"):
        klub.interval(1.0, 0.5)


def test_coordinate_search_never_increases_the_klub(klub: KLUB) -> None:
    start = karras(5, LO, HI)
    res = coordinate_search(klub, start, candidates=4, max_sweeps=3, tol=0.0)
    h = np.asarray(res.history)
    assert h[0] == pytest.approx(klub.total(start), rel=1e-12)
    assert np.all(np.diff(h) <= 0) and h[-1] < h[0]
    assert klub.total(res.schedule) == pytest.approx(h[-1], rel=1e-12)  # the bookkeeping is the real estimate
    s = res.schedule
    assert s.nfe == 5 and s.sigmas[0] == HI and s.sigmas[-1] == LO and np.all(np.diff(s.sigmas) < 0)


def test_early_stopping(klub: KLUB) -> None:
    """A sweep that improves the KLUB by less than `tol` (relative) ends the search; max_sweeps = 0 is the start."""
    start = karras(4, LO, HI)
    assert len(coordinate_search(klub, start, candidates=3, max_sweeps=5, tol=0.999).history) == 2
    none = coordinate_search(klub, start, max_sweeps=0)
    assert none.schedule == start and len(none.history) == 1


def test_ays_schedule_from_a_schedule_of_another_step_count(model: GaussianMixture) -> None:
    data = data_samples("mixture", model, 32, seed=1)
    res = ays_schedule(model, data, 4, LO, HI, init=karras(8, LO, HI), quad_points=3, candidates=3, max_sweeps=1)
    assert res.schedule.nfe == 4 and res.history[-1] <= res.history[0]
    with pytest.raises(ValueError, match="span"):
        ays_schedule(model, data, 4, LO, HI, init=karras(4, 0.01, HI), max_sweeps=0)


def test_data_sources(model: GaussianMixture) -> None:
    wrapped = CheckedDenoiser(model)
    x = data_samples("auto", wrapped, 10, seed=0)  # a wrapped mixture: found through `.inner`
    assert x.shape == (10, 8) and torch.equal(x, data_samples("mixture", model, 10, seed=0))

    class WithData:
        def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            return x

        def sample_data(self, n: int, generator: torch.Generator) -> torch.Tensor:
            return torch.full((n, 3), 7.0)

    assert torch.equal(data_samples("auto", CheckedDenoiser(WithData()), 2), torch.full((2, 3), 7.0))
    digits = data_samples("digits", WithData(), 20, seed=0)
    assert digits.shape == (20, 1, 8, 8) and float(digits.min()) >= -1 and float(digits.max()) <= 1
    with pytest.raises(ValueError, match="digits"):
        data_samples("auto", lambda x, s: x, 4)
    with pytest.raises(ValueError, match="mixture"):
        data_samples("mixture", WithData(), 4)
    with pytest.raises(ValueError, match="unknown data source"):
        data_samples("imagenet", model, 4)


def test_klub_refuses_conditional_models() -> None:
    class Cond:
        conditions = ("a", "b")

        def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
            return x

    with pytest.raises(ValueError, match="unconditional"):
        KLUB(Cond(), torch.zeros(3, 2))
