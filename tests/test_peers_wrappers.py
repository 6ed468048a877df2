"""The peers as Phase-1 optimizers: registry, hyper-parameters, domain (any objective), and one trial each."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from fewstep_search.bank import Bank, build_bank
from fewstep_search.dp import dp_optimal
from fewstep_search.models.mixture import GaussianMixture
from fewstep_search.objectives import grid_cost_matrix
from fewstep_search.phase1.optimizers import ScheduleOptimizer
from fewstep_search.phase1.parameterizations import PARAMETERIZATIONS, make_parameterization
from fewstep_search.phase1.peers import PEER_OPTIMIZERS
from fewstep_search.phase1.peers.gits import gits_schedule
from fewstep_search.phase1.problem import OBJECTIVES, Problem
from fewstep_search.schedules import karras

LO, HI = 0.002, 80.0
FAST = {
    "gits": {},
    "dm_nonuniform": {"maxiter": 60},
    "ays": {"n_samples": 24, "quad_points": 3, "candidates": 3, "max_sweeps": 1},
    "ld3": {"steps": 4, "eval_every": 2},
    "b0_dp": {},
}


@pytest.fixture(scope="module")
def model() -> GaussianMixture:
    return GaussianMixture.random(8, n_components=6, seed=1)


@pytest.fixture(scope="module")
def bank(model: GaussianMixture) -> Bank:
    return build_bank(model, shape=(8,), sigma_min=LO, sigma_max=HI, n_trajectories=32, grid_size=32, seed=0,
                      probes=1)


def _problem(bank: Bank, model: GaussianMixture, objective: str = "direct", nfe: int = 4) -> Problem:
    param = make_parameterization("logits", nfe=nfe, sigma_min=LO, sigma_max=HI)
    return Problem(objective=objective, parameterization=param, fit=bank.fit(), denoiser=model)


def test_registry_names_and_hyper_parameters() -> None:
    assert set(PEER_OPTIMIZERS) == {"gits", "dm_nonuniform", "ays", "ld3", "b0_dp"}
    for name, cls in PEER_OPTIMIZERS.items():
        assert issubclass(cls, ScheduleOptimizer) and cls.name == name
        opt = cls()
        json.dumps(opt.hyper)  # recorded with the trial
        assert cls(**opt.hyper).hyper == opt.hyper  # round-trips
    assert PEER_OPTIMIZERS["gits"]().hyper["coeff"] == 1.15


@pytest.mark.parametrize(("name", "bad"), [
    ("gits", {"coeff": 0}), ("gits", {"metric": "l3"}), ("dm_nonuniform", {"solver": "unipc"}),
    ("dm_nonuniform", {"lower_order_final": 1}), ("ays", {"data": "imagenet"}), ("ays", {"n_samples": 0}),
    ("ld3", {"radius": -0.1}), ("ld3", {"steps": 1.5}),
])
def test_bad_hyper_parameters_are_value_errors(name: str, bad: dict) -> None:
    with pytest.raises(ValueError):
        PEER_OPTIMIZERS[name](**bad)


def test_every_objective_and_parameterization_is_accepted() -> None:
    """Peers have their own objectives: the trial's only scores the result."""
    for cls in PEER_OPTIMIZERS.values():
        for objective in OBJECTIVES.values():
            for param in PARAMETERIZATIONS.values():
                cls().check(objective=objective, parameterization=param)


@pytest.mark.parametrize("name", sorted(PEER_OPTIMIZERS))
def test_one_trial_each(name: str, bank: Bank, model: GaussianMixture) -> None:
    problem = _problem(bank, model)
    res = PEER_OPTIMIZERS[name](**FAST[name]).minimize(problem, karras(4, LO, HI))
    s = res.schedule
    assert s.nfe == 4 and s.sigmas[0] == HI and s.sigmas[-1] == LO and s.name == name
    assert np.isfinite(res.value) and np.isfinite(res.start_value) and problem.evaluations >= 2
    assert res.value == pytest.approx(problem.value_of(s), rel=1e-12)  # scored by the trial's objective


def test_the_peers_own_schedule_is_returned(bank: Bank, model: GaussianMixture) -> None:
    """Even where the start scores better on the trial's objective, the trial reports the method itself."""
    problem = _problem(bank, model, objective="b0")
    res = PEER_OPTIMIZERS["gits"]().minimize(problem, karras(4, LO, HI))
    assert res.schedule == gits_schedule(bank.fit(), 4)
    b0 = PEER_OPTIMIZERS["b0_dp"]().minimize(_problem(bank, model, objective="b0"), karras(4, LO, HI))
    idx, _ = dp_optimal(grid_cost_matrix(bank.fit(), "b0"), 4)
    assert np.array_equal(b0.schedule.sigmas, bank.fit().grid[idx].numpy())


def test_lean_bank_and_missing_denoiser(bank: Bank, model: GaussianMixture) -> None:
    lean = bank.lean()
    param = make_parameterization("logits", nfe=3, sigma_min=LO, sigma_max=HI)
    with_model = Problem(objective="direct", parameterization=param, fit=lean.fit(), denoiser=model)
    assert PEER_OPTIMIZERS["gits"]().minimize(with_model, karras(3, LO, HI)).schedule == gits_schedule(bank.fit(), 3)
    no_model = Problem(objective="bw", parameterization=param, fit=bank.fit())
    with pytest.raises(ValueError, match="denoiser"):
        PEER_OPTIMIZERS["ld3"](**FAST["ld3"]).minimize(no_model, karras(3, LO, HI))


@pytest.fixture
def meta_default() -> Iterator[None]:
    """Torch's default device set to `meta`: a tensor created without naming its device fails at once, as a CPU
    tensor beside CUDA ones would on a GPU run (tests/test_devices.py's check, for the peers)."""
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


@pytest.mark.parametrize("name", sorted(PEER_OPTIMIZERS))
def test_peers_name_their_devices(name: str, bank: Bank, model: GaussianMixture, meta_default: None) -> None:
    fit = bank.lean().fit() if name == "gits" else bank.fit()  # GITS re-solves the teacher on a lean bank
    param = make_parameterization("logits", nfe=3, sigma_min=LO, sigma_max=HI)
    problem = Problem(objective="direct", parameterization=param, fit=fit, denoiser=model)
    res = PEER_OPTIMIZERS[name](**FAST[name]).minimize(problem, karras(3, LO, HI))
    assert res.schedule.nfe == 3 and np.isfinite(res.value)
