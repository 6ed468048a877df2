"""Device plumbing without a GPU: every tensor must be created on an explicit device.

With torch's default device set to `meta` (tensors without data), any tensor the code creates without saying
where would land on `meta` and fail as soon as it meets real data, exactly as a tensor left on the CPU fails
beside CUDA tensors on a GPU run. The real work below runs on the CPU, every device passed explicitly.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from fewstep_search.bank import Bank, build_bank
from fewstep_search.models.digits import load_digits
from fewstep_search.models.mixture import builtin_mixture
from fewstep_search.phase1.ray_worker import trial_resources
from fewstep_search.phase1.trials import TrialSpec, run_trial
from fewstep_search.quality import sample_quality_of
from fewstep_search.schedules import make_schedule

TRIALS = [
    TrialSpec(optimizer="none", objective="direct"),
    TrialSpec(optimizer="dp", objective="bw", parameterization="grid"),
    TrialSpec(optimizer="dp_adam", objective="direct", hyper={"steps": 2}),
    TrialSpec(optimizer="lbfgsb", objective="bw", hyper={"maxiter": 2}),
    TrialSpec(optimizer="trust_constr", objective="direct", parameterization="nodes", hyper={"maxiter": 2}),
    TrialSpec(optimizer="tpe", objective="direct", parameterization="edm_rho", hyper={"n_trials": 2}),
    TrialSpec(optimizer="cmaes", objective="direct", parameterization="spline", hyper={"n_trials": 2}),
    TrialSpec(optimizer="tpe", objective="direct", parameterization="beta_warp", hyper={"n_trials": 2}),
    TrialSpec(optimizer="adam", objective="direct", solver="heun", hyper={"steps": 2}),
]


@pytest.fixture
def meta_default() -> Iterator[None]:
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


@pytest.fixture(scope="module")
def small_bank() -> Bank:
    return build_bank(builtin_mixture(dim=4), shape=(4,), sigma_min=0.002, sigma_max=80.0, n_trajectories=12,
                      grid_size=16, device="cpu")


@pytest.mark.parametrize("spec", TRIALS, ids=lambda s: s.label)
def test_every_trial_kind_names_its_devices(spec: TrialSpec, small_bank: Bank, meta_default: None) -> None:
    rec = run_trial(spec, bank=small_bank, denoiser=builtin_mixture(dim=4), nfe=4)
    assert rec.state == "COMPLETE" and rec.schedule is not None


def test_the_digits_model_follows_its_weights_not_the_default_device(meta_default: None) -> None:
    den = load_digits(device="cpu")
    x = torch.randn(3, 1, 8, 8, device="cpu")
    out = den(x, torch.full((3,), 2.0, device="cpu"))
    assert out.device.type == "cpu" and torch.isfinite(out).all()
    q = sample_quality_of(den, make_schedule("edm", 3, 0.002, 80.0), n=64, device="cpu")
    assert q is not None and q["fd"] > 0


def test_trials_ask_ray_for_a_gpu_share_only_on_gpu_runs() -> None:
    assert trial_resources("cpu", cpus=1, gpus=0.25) == {"cpu": 1}
    assert trial_resources("cuda", cpus=1, gpus=0.25) == {"cpu": 1, "gpu": 0.25}
    assert trial_resources("cuda:1", cpus=2, gpus=0.5) == {"cpu": 2, "gpu": 0.5}
