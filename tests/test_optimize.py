from __future__ import annotations

import pytest

from fewstep_search import optimize_schedule, search_schedules
from fewstep_search.phase1.optimize import auto_bank_size


def test_never_worse_than_the_best_heuristic_on_select(mixture8, bank8) -> None:
    _, results = search_schedules(mixture8, nfe=4, shape=(8,), sigma_min=0.002, sigma_max=80.0, bank=bank8,
                                  refine_steps=30)
    result = results[4]
    assert result.best_heuristic is not None
    assert result.winner.select_error <= result.best_heuristic.select_error
    kinds = {r.spec.optimizer for r in result.records}
    assert kinds == {"none", "dp", "dp_adam", "adam"}
    for r in result.records:  # refinement keeps the best iterate: never worse than its start on fit E
        if r.spec.optimizer == "adam" and not r.stopped_early:
            assert r.metrics["fit_objective"] <= r.metrics["start_objective"] + 1e-12


def test_optimize_schedule_public_entry_and_one_bank_for_several_budgets(mixture2) -> None:
    s = optimize_schedule(mixture2, nfe=3, shape=(2,), sigma_min=0.002, sigma_max=80.0, n_trajectories=16,
                          grid_size=24, refine_steps=3)
    assert s.nfe == 3 and s.sigma_max == 80.0 and s.sigma_min == 0.002
    bank, results = search_schedules(mixture2, nfe=[3, 5], shape=(2,), sigma_min=0.002, sigma_max=80.0,
                                     n_trajectories=16, grid_size=24, refine_steps=3)
    assert sorted(results) == [3, 5]
    assert {r.winner.schedule.nfe for r in results.values()} == {3, 5}
    multi = optimize_schedule(mixture2, nfe=[3, 4], shape=(2,), sigma_min=0.002, sigma_max=80.0, bank=bank,
                              refine_steps=0)
    assert sorted(multi) == [3, 4] and multi[4].nfe == 4


def test_the_bank_is_sized_from_the_models_cost(mixture2) -> None:
    import time

    def slow(x, sigma):  # about 2 ms per sample: a small bank
        time.sleep(0.002 * x.shape[0])
        return mixture2(x, sigma)

    fast = auto_bank_size(mixture2, shape=(2,), sigma_max=80.0, budget_seconds=30)
    small = auto_bank_size(slow, shape=(2,), sigma_max=80.0, budget_seconds=30)
    assert fast.n_trajectories == 256 and small.n_trajectories < fast.n_trajectories
    assert 32 <= small.n_trajectories and small.n_trajectories % 4 == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [({"nfe": 0}, "nfe"), ({"sigma_min": 1.0, "sigma_max": 0.5}, "sigma_min must be <"), ({"nfe": 100}, "grid"),
     ({"nfe": []}, "non-empty")],
)
def test_bad_arguments_are_clear(mixture8, bank8, kwargs, message) -> None:
    args = dict(nfe=4, shape=(8,), sigma_min=0.002, sigma_max=80.0, bank=bank8) | kwargs
    with pytest.raises(ValueError, match=message):
        search_schedules(mixture8, **args)
