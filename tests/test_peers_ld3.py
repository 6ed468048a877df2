"""LD3-style (Tong et al., ICLR 2025): radius 0 is plain direct optimization of the end-point error E; the
per-sample slack of the soft objective stays in its ball around the teacher's start noise."""

from __future__ import annotations

import math

import pytest
import torch

from fewstep_search.bank import Bank, build_bank
from fewstep_search.models.mixture import GaussianMixture
from fewstep_search.objectives import true_error
from fewstep_search.phase1.peers.ld3 import ld3_schedule, project_to_ball, soft_errors
from fewstep_search.schedules import karras, logits_from_sigmas, sigmas_from_logits

LO, HI = 0.002, 80.0


@pytest.fixture(scope="module")
def model() -> GaussianMixture:
    return GaussianMixture.random(8, n_components=6, seed=1)


@pytest.fixture(scope="module")
def fit(model: GaussianMixture) -> Bank:
    bank = build_bank(model, shape=(8,), sigma_min=LO, sigma_max=HI, n_trajectories=32, grid_size=32, seed=0,
                      probes=1, keep_states=False)
    return bank.fit()


def test_radius_zero_is_plain_direct_optimization(model: GaussianMixture, fit: Bank) -> None:
    """With r = 0 the ball is the point x_T: the same Adam steps on E itself give the same schedule."""
    steps, lr, every, nfe = 12, 0.05, 4, 4
    res = ld3_schedule(model, fit, nfe, radius=0.0, steps=steps, lr=lr, eval_every=every)
    logits = logits_from_sigmas(karras(nfe, LO, HI)).clone().requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=lr)
    with torch.no_grad():
        best_sig = sigmas_from_logits(logits, LO, HI)
        best = float(true_error(model, fit, best_sig))
    for step in range(1, steps + 1):
        opt.zero_grad()
        true_error(model, fit, sigmas_from_logits(logits, LO, HI)).backward()
        opt.step()
        if step % every == 0:
            with torch.no_grad():
                sig = sigmas_from_logits(logits, LO, HI)
                value = float(true_error(model, fit, sig))
            if value < best:
                best, best_sig = value, sig
    assert res.error == pytest.approx(best, rel=1e-10)
    assert torch.allclose(res.schedule.tensor(), best_sig.double(), rtol=1e-10)
    assert res.rho == 0.0 and float(res.slack.abs().max()) == 0.0
    assert res.error < float(true_error(model, fit, karras(nfe, LO, HI).tensor()))  # it did optimize


def test_slack_stays_in_its_ball(model: GaussianMixture, fit: Bank) -> None:
    radius = 0.02
    res = ld3_schedule(model, fit, 4, radius=radius, steps=15, slack_lr=0.5, eval_every=5)
    assert res.rho == pytest.approx(radius * HI * math.sqrt(8))
    norms = res.slack.flatten(1).norm(dim=1)
    assert float(norms.max()) <= res.rho * (1 + 1e-9)
    assert float(norms.min()) > 0.0  # every sample used its slack
    # the returned E is the un-relaxed error of the returned schedule (from the teacher's own start)
    assert res.error == pytest.approx(float(true_error(model, fit, res.schedule.tensor())), rel=1e-10)
    assert res.schedule.sigmas[0] == HI and res.schedule.sigmas[-1] == LO


def test_projection_onto_the_ball() -> None:
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(6, 3, 2, generator=g, dtype=torch.float64) * torch.tensor([0.1, 1, 10, 0.5, 3, 0.01]).reshape(
        6, 1, 1).double()
    p = project_to_ball(delta, 1.0)
    norms_in, norms_out = delta.flatten(1).norm(dim=1), p.flatten(1).norm(dim=1)
    inside = norms_in <= 1.0
    assert torch.equal(p[inside], delta[inside])  # points inside the ball do not move
    assert torch.allclose(norms_out[~inside], torch.ones_like(norms_out[~inside]))  # the others land on it
    assert torch.allclose(p[~inside] / norms_out[~inside, None, None], delta[~inside] / norms_in[~inside, None, None])
    assert torch.equal(project_to_ball(p, 1.0), p)  # idempotent
    assert float(project_to_ball(delta, 0.0).abs().max()) == 0.0


def test_soft_errors_at_zero_slack_are_the_true_error(model: GaussianMixture, fit: Bank) -> None:
    sig = karras(5, LO, HI).tensor()
    per_sample = soft_errors(model, fit, sig, torch.zeros_like(fit.x_start))
    assert float(per_sample.mean()) == pytest.approx(float(true_error(model, fit, sig)), rel=1e-12)


def test_rejects_bad_arguments(model: GaussianMixture, fit: Bank) -> None:
    with pytest.raises(ValueError, match="radius"):
        ld3_schedule(model, fit, 3, radius=-1.0)
    with pytest.raises(ValueError, match="steps"):
        ld3_schedule(model, fit, 3, init=karras(4, LO, HI))
