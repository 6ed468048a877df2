"""Conformance of every schedule optimizer and parameterization (STYLE.md lesson 9), on a small exact mixture.

`OptimizerTestCase` is the suite every optimizer runs: a valid schedule (nfe + 1 descending sigmas, the bank's
endpoints), strictly better than its start on its own objective, reported value = re-evaluated value,
deterministic, picklable (optimizers travel to Ray workers). A new optimizer adds one subclass here;
`test_every_registered_optimizer_has_a_conformance_case` fails until it does.
"""

from __future__ import annotations

import math
import pickle
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from scipy.special import betainc

from fewstep_search.bank import Bank, log_grid
from fewstep_search.models.mixture import GaussianMixture
from fewstep_search.phase1.optimizers import OptimizeResult
from fewstep_search.phase1.parameterizations import PARAMETERIZATIONS, beta_cdf, make_parameterization
from fewstep_search.phase1.problem import OBJECTIVES, Problem, StopTrial
from fewstep_search.phase1.registry import OPTIMIZERS, make_optimizer
from fewstep_search.schedules import Schedule, make_schedule

NFE = 4


def _problem(
    bank: Bank, den: GaussianMixture, objective: str, parameterization: str, **options: Any
) -> Problem:
    p = make_parameterization(
        parameterization,
        nfe=NFE,
        sigma_min=bank.sigma_min,
        sigma_max=bank.sigma_max,
        grid=bank.grid,
        **options,
    )
    return Problem(objective=objective, parameterization=p, fit=bank.fit(), denoiser=den, seed=0)


class OptimizerTestCase:
    """The conformance suite. Subclasses set `name`, `hyper`, `objective`, `parameterization`, `start`."""

    name: ClassVar[str]
    hyper: ClassVar[dict[str, Any]] = {}
    objective: ClassVar[str] = "direct"
    parameterization: ClassVar[str] = "logits"
    start: ClassVar[str] = "edm"

    @pytest.fixture(scope="class")
    @classmethod
    def outcome(cls, bank8: Bank, mixture8: GaussianMixture) -> tuple[Problem, OptimizeResult]:
        problem = _problem(bank8, mixture8, cls.objective, cls.parameterization)
        start = make_schedule(cls.start, NFE, bank8.sigma_min, bank8.sigma_max)
        return problem, make_optimizer(cls.name, **cls.hyper).minimize(problem, start)

    def test_returns_a_valid_schedule(self, outcome: tuple[Problem, OptimizeResult], bank8: Bank) -> None:
        _, res = outcome
        s = res.schedule
        assert isinstance(s, Schedule) and s.nfe == NFE
        assert s.sigma_max == pytest.approx(bank8.sigma_max, rel=1e-12)
        assert s.sigma_min == pytest.approx(bank8.sigma_min, rel=1e-12)
        assert np.all(np.diff(s.sigmas) < 0) and np.all(np.isfinite(s.sigmas))

    def test_improves_its_objective_from_the_start(self, outcome: tuple[Problem, OptimizeResult]) -> None:
        _, res = outcome
        assert math.isfinite(res.value) and res.value < res.start_value * (1 - 1e-3), (
            res.value,
            res.start_value,
        )

    def test_reported_value_is_the_schedules(
        self, outcome: tuple[Problem, OptimizeResult], bank8: Bank, mixture8: GaussianMixture
    ) -> None:
        problem, res = outcome
        again = _problem(bank8, mixture8, self.objective, self.parameterization).value_of(res.schedule)
        assert again == pytest.approx(res.value, rel=1e-9)
        assert res.evaluations >= 2 and problem.evaluations == res.evaluations

    def test_is_deterministic(
        self, outcome: tuple[Problem, OptimizeResult], bank8: Bank, mixture8: GaussianMixture
    ) -> None:
        _, res = outcome
        problem = _problem(bank8, mixture8, self.objective, self.parameterization)
        start = make_schedule(self.start, NFE, bank8.sigma_min, bank8.sigma_max)
        res2 = make_optimizer(self.name, **self.hyper).minimize(problem, start)
        np.testing.assert_allclose(res2.schedule.sigmas, res.schedule.sigmas, rtol=1e-9)

    def test_is_picklable_and_exposes_its_hyper_parameters(self) -> None:
        opt = make_optimizer(self.name, **self.hyper)
        clone = pickle.loads(pickle.dumps(opt))
        assert clone.hyper == opt.hyper
        for k, v in self.hyper.items():
            assert opt.hyper.get(k) == v


class TestGridDPBw(OptimizerTestCase):
    name, objective, parameterization = "dp", "bw", "grid"


class TestGridDPB0(OptimizerTestCase):
    name, objective, parameterization = "dp", "b0", "grid"


class TestAdamDirect(OptimizerTestCase):
    name, hyper = "adam", {"steps": 25, "lr": 0.05}


class TestAdamBound(OptimizerTestCase):
    name, hyper, objective = "adam", {"steps": 25, "lr": 0.05}, "bw"


class TestLBFGSB(OptimizerTestCase):
    name, hyper, start = "lbfgsb", {"maxiter": 15}, "log_uniform"


class TestTrustConstr(OptimizerTestCase):
    name, hyper, parameterization = "trust_constr", {"maxiter": 15}, "nodes"


class TestTPE(OptimizerTestCase):
    name, hyper, parameterization = "tpe", {"n_trials": 15}, "edm_rho"


class TestCMAES(OptimizerTestCase):
    name, hyper, parameterization, start = "cmaes", {"n_trials": 20}, "beta_warp", "log_uniform"

    @pytest.fixture(scope="class", autouse=True)
    @classmethod
    def _needs_cmaes(cls) -> None:
        pytest.importorskip("cmaes")


class TestDPThenAdam(OptimizerTestCase):
    name, hyper = "dp_adam", {"steps": 15}


def test_every_registered_optimizer_has_a_conformance_case() -> None:
    """The search's own optimizers run the suite; the peers return their method's schedule, not the best point
    they evaluated (so "better than the start" is not theirs to meet): tests/test_peers_wrappers.py covers them."""
    from fewstep_search.phase1.peers import PEER_OPTIMIZERS

    covered = {cls.name for cls in OptimizerTestCase.__subclasses__()}
    assert covered == set(OPTIMIZERS) - {"none"} - set(PEER_OPTIMIZERS)


def test_identity_returns_the_start(bank8: Bank, mixture8: GaussianMixture) -> None:
    start = make_schedule("vp_time_quadratic", NFE, bank8.sigma_min, bank8.sigma_max)
    res = make_optimizer("none").minimize(_problem(bank8, mixture8, "direct", "logits"), start)
    np.testing.assert_array_equal(res.schedule.sigmas, start.sigmas)
    assert res.value == res.start_value and res.evaluations == 1


@pytest.mark.parametrize(
    ("optimizer", "objective", "parameterization", "match"),
    [
        ("dp", "direct", "grid", "additive"),
        ("dp", "bw", "logits", "grid"),
        ("adam", "bw", "grid", "continuous"),
        ("tpe", "direct", "grid", "continuous"),
    ],
)
def test_check_rejects_pairs_outside_the_domain(
    optimizer: str, objective: str, parameterization: str, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        make_optimizer(optimizer).check(
            objective=OBJECTIVES[objective], parameterization=PARAMETERIZATIONS[parameterization]
        )


@pytest.mark.parametrize(
    ("name", "hyper"),
    [
        ("adam", {"lr": -1.0}),
        ("lbfgsb", {"maxiter": 0}),
        ("tpe", {"n_trials": 1.5}),
        ("nope", {}),
        ("adam", {"bogus": 1}),
    ],
)
def test_bad_hyper_parameters_and_names_fail_with_one_line(name: str, hyper: dict[str, Any]) -> None:
    with pytest.raises(ValueError) as info:
        make_optimizer(name, **hyper)
    assert "\n" not in str(info.value)


def test_a_monitor_sees_the_best_schedule_and_can_stop_a_run(bank8: Bank, mixture8: GaussianMixture) -> None:
    seen: list[tuple[int, float]] = []

    def monitor(problem: Problem) -> None:
        seen.append((problem.evaluations, problem.best_value))
        if problem.evaluations >= 15:
            raise StopTrial

    p = make_parameterization("logits", nfe=NFE, sigma_min=bank8.sigma_min, sigma_max=bank8.sigma_max)
    problem = Problem(objective="direct", parameterization=p, fit=bank8.fit(), denoiser=mixture8, monitor=monitor,
                      monitor_every=5)
    start = make_schedule("edm", NFE, bank8.sigma_min, bank8.sigma_max)
    with pytest.raises(StopTrial):
        make_optimizer("adam", steps=100).minimize(problem, start)
    assert [e for e, _ in seen] == [5, 10, 15] and problem.evaluations == 15
    assert all(b2 <= b1 for (_, b1), (_, b2) in zip(seen, seen[1:], strict=False))  # best so far never rises
    assert problem.best_schedule is not None and problem.best_value == seen[-1][1]


# ---------------------------------------------------------------- parameterizations

GRID = log_grid(0.002, 80.0, 24)


def _param(name: str, nfe: int = 6) -> Any:
    return make_parameterization(name, nfe=nfe, sigma_min=0.002, sigma_max=80.0, grid=GRID)


@pytest.mark.parametrize("name", sorted(PARAMETERIZATIONS))
def test_random_points_of_the_search_box_decode_to_valid_schedules(name: str) -> None:
    p = _param(name)
    lo, hi = p.search_box()
    rng = np.random.default_rng(0)
    if name == "grid":  # discrete: distinct ascending indices
        points = [
            np.sort(rng.choice(np.arange(lo[0], hi[0] + 1), size=p.dim, replace=False)) for _ in range(20)
        ]
    else:
        points = [lo, hi, *(rng.uniform(lo, hi) for _ in range(20))]
    for theta in [p.default(), *points]:
        s = p.schedule(theta)
        assert s.nfe == 6 and s.sigma_max == 80.0 and s.sigma_min == 0.002


@pytest.mark.parametrize("name", sorted(set(PARAMETERIZATIONS) - {"grid"}))
def test_gradients_are_finite(name: str) -> None:
    p = _param(name)
    theta = torch.tensor(p.clip(p.default() + 0.1), requires_grad=True)
    torch.log(p.decode(theta)).sum().backward()
    assert theta.grad is not None and torch.all(torch.isfinite(theta.grad))


@pytest.mark.parametrize("name", ["logits", "nodes"])
def test_free_parameterizations_encode_any_schedule_exactly(name: str) -> None:
    p = _param(name)
    for family in ("edm", "vp_time_quadratic", "log_uniform"):
        s = make_schedule(family, 6, 0.002, 80.0)
        np.testing.assert_allclose(p.schedule(p.encode(s)).sigmas, s.sigmas, rtol=1e-10)


def test_family_defaults_are_the_heuristics_they_generalize() -> None:
    np.testing.assert_allclose(
        _param("edm_rho").schedule(np.array([7.0, 0, 1])).sigmas,
        make_schedule("edm", 6, 0.002, 80.0).sigmas,
        rtol=1e-10,
    )
    for name in ("beta_warp", "spline", "logits"):
        np.testing.assert_allclose(
            _param(name).schedule(_param(name).default()).sigmas,
            make_schedule("log_uniform", 6, 0.002, 80.0).sigmas,
            rtol=1e-10,
        )


def test_nodes_repair_unordered_points_and_state_monotone_constraints() -> None:
    p = _param("nodes")
    s = p.schedule(np.array([0.5, 0.4, 0.9, 0.9, 2.0]))
    assert np.all(np.diff(s.sigmas) < 0)
    a, lb, _ = p.linear_constraints()
    assert np.all(a @ p.default() >= lb)


def test_beta_cdf_matches_scipy() -> None:
    x = torch.linspace(0.01, 0.99, 41, dtype=torch.float64)
    for a, b in [(1 / 3, 3.0), (3.0, 1 / 3), (0.5, 2.0), (2.5, 2.5), (1.0, 1.0)]:
        got = beta_cdf(x, torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
        np.testing.assert_allclose(got.numpy(), betainc(a, b, x.numpy()), atol=1e-5)


def test_unknown_parameterization_and_bad_range_fail_clearly() -> None:
    with pytest.raises(ValueError, match="unknown parameterization"):
        make_parameterization("zigzag", nfe=4, sigma_min=0.002, sigma_max=80.0)
    with pytest.raises(ValueError, match="needs the bank's grid"):
        make_parameterization("grid", nfe=4, sigma_min=0.002, sigma_max=80.0)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        make_parameterization("logits", nfe=4, sigma_min=1.0, sigma_max=0.5)
