import json

import numpy as np
import pytest
import torch

from fewstep_search.noise import ContinuousVP, DiscreteVP, ddpm_alphas_cumprod, lambda_to_sigma, sigma_to_lambda
from fewstep_search.schedules import (
    SCHEDULE_FAMILIES,
    Schedule,
    logits_from_sigmas,
    make_schedule,
    sigmas_from_logits,
)


@pytest.mark.parametrize("family", sorted(SCHEDULE_FAMILIES))
@pytest.mark.parametrize("nfe", [1, 3, 10])
def test_families_are_valid_with_exact_endpoints(family: str, nfe: int) -> None:
    s = make_schedule(family, nfe, 0.002, 80.0)
    assert s.nfe == nfe and s.sigmas.dtype == np.float64
    assert s.sigmas[0] == 80.0 and s.sigmas[-1] == 0.002
    assert np.all(np.diff(s.sigmas) < 0)


def test_karras_matches_the_edm_formula() -> None:
    s = make_schedule("edm", 4, 0.002, 80.0, rho=7.0)
    i = np.arange(5)
    expect = (80.0 ** (1 / 7) + i / 4 * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    np.testing.assert_allclose(s.sigmas, expect, rtol=1e-12)


def test_log_uniform_is_uniform_in_lambda() -> None:
    lam = make_schedule("log_uniform", 6, 0.01, 10.0).lambdas()
    np.testing.assert_allclose(np.diff(lam), np.full(6, np.log(1000) / 6), rtol=1e-12)


@pytest.mark.parametrize(
    "bad, message",
    [
        ([1.0], "at least 2"),
        ([1.0, 2.0], "strictly decreasing"),
        ([2.0, 1.0, 1.0], "strictly decreasing"),
        ([2.0, 0.0], "positive"),
        ([float("nan"), 1.0], "finite"),
        ([float("inf"), 1.0], "finite"),
    ],
)
def test_schedule_rejects_bad_sigmas(bad: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Schedule(np.array(bad))


@pytest.mark.parametrize("nfe, lo, hi, message", [(0, 0.1, 1.0, "nfe"), (3, 1.0, 1.0, "sigma_min must be <"),
                                                  (3, 2.0, 1.0, "sigma_min must be <"), (3, 0.0, 1.0, "> 0")])
def test_families_reject_bad_ranges(nfe: int, lo: float, hi: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_schedule("edm", nfe, lo, hi)


def test_schedule_is_immutable_and_roundtrips_json() -> None:
    s = make_schedule("edm", 5, 0.002, 80.0)
    with pytest.raises(ValueError):
        s.sigmas[0] = 1.0
    back = Schedule.from_dict(json.loads(s.to_json()))
    assert back == s
    with pytest.raises(ValueError, match="nfe"):
        Schedule.from_dict({"sigmas": [3.0, 2.0, 1.0], "nfe": 5})


def test_logit_parameterization_roundtrip_and_validity() -> None:
    s = make_schedule("vp_time_quadratic", 7, 0.002, 80.0)
    back = sigmas_from_logits(logits_from_sigmas(s), 0.002, 80.0)
    np.testing.assert_allclose(back.numpy(), s.sigmas, rtol=1e-10)
    rand = sigmas_from_logits(torch.randn(7, dtype=torch.float64) * 3, 0.002, 80.0)
    Schedule(rand.numpy())  # any logits give a valid schedule
    assert float(rand[0]) == 80.0 and float(rand[-1]) == 0.002


def test_extreme_logits_stay_strictly_decreasing_in_float32() -> None:
    """An L-BFGS-B line search tries logits like these; the bank's float32 solve casts the sigmas, and a bare
    softmax let two of them collide there (the trial then failed after finding its best point)."""
    logits = torch.zeros(10, dtype=torch.float64)
    logits[-1], logits[3] = -80.0, 40.0
    sig = sigmas_from_logits(logits, 0.002, 80.0).to(torch.float32)
    assert bool(torch.all(sig[1:] < sig[:-1]))
    Schedule(sig.double().numpy())


def test_lambda_and_vp_conversions_roundtrip() -> None:
    sig = np.array([80.0, 3.0, 0.5, 0.002])
    np.testing.assert_allclose(lambda_to_sigma(sigma_to_lambda(sig)), sig, rtol=1e-14)
    vp = ContinuousVP()
    np.testing.assert_allclose(vp.sigma(vp.t(sig)), sig, rtol=1e-10)
    t = np.array([1e-3, 0.3, 1.0])
    np.testing.assert_allclose(vp.t(vp.sigma(t)), t, rtol=1e-10)
    disc = DiscreteVP(ddpm_alphas_cumprod(1000))
    steps = np.array([0.0, 10.0, 500.0, 999.0])
    np.testing.assert_allclose(disc.t(disc.sigma(steps)), steps, atol=1e-9)
    ac = ddpm_alphas_cumprod(1000)
    np.testing.assert_allclose(disc.sigma(np.array([250.0])), np.sqrt((1 - ac[250]) / ac[250]), rtol=1e-12)


def test_vp_schedules_use_the_vp_time_axis() -> None:
    vp = ContinuousVP()
    s = make_schedule("vp_time_uniform", 5, 0.01, 50.0)
    np.testing.assert_allclose(np.diff(s.vp_timesteps(vp)), np.diff(s.vp_timesteps(vp))[0], rtol=1e-9)
    disc = DiscreteVP(ddpm_alphas_cumprod(1000))
    sd = make_schedule("vp_time_uniform", 4, disc.sigma_min, disc.sigma_max, vp=disc)
    np.testing.assert_allclose(sd.vp_timesteps(disc), [999, 749.25, 499.5, 249.75, 0], atol=1e-6)
    sq = make_schedule("vp_time_quadratic", 4, 0.01, 50.0)
    np.testing.assert_allclose(np.diff(np.sqrt(sq.vp_timesteps(vp))), np.diff(np.sqrt(sq.vp_timesteps(vp)))[0],
                               rtol=1e-9)
