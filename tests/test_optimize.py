from __future__ import annotations

import pytest

from fewstep_search import optimize_schedule
from fewstep_search.optimize import search_in_process


def test_never_worse_than_the_best_heuristic_on_heldout(mixture8, bank8) -> None:
    result = search_in_process(mixture8, nfe=4, shape=(8,), sigma_min=0.002, sigma_max=80.0, bank=bank8,
                               refine_steps=30)
    best = min(result.candidates, key=lambda c: c.heldout_error)
    assert result.best == best.schedule
    assert best.heldout_error <= result.best_heuristic.heldout_error
    kinds = {c.kind for c in result.candidates}
    assert kinds == {"heuristic", "dp", "refined"}
    refined = [c for c in result.candidates if c.kind == "refined"]
    starts = sorted(c.fit_error for c in result.candidates if c.kind != "refined")[:2]
    # Refinement keeps the best iterate, so each refined schedule is at least as good as its start on fit E.
    assert all(r <= s + 1e-12 for r, s in zip(sorted(c.fit_error for c in refined), starts, strict=True))


def test_optimize_schedule_public_entry(mixture2) -> None:
    s = optimize_schedule(mixture2, nfe=3, shape=(2,), sigma_min=0.002, sigma_max=80.0, n_trajectories=16,
                          grid_size=24, refine_steps=3)
    assert s.nfe == 3 and s.sigma_max == 80.0 and s.sigma_min == 0.002


@pytest.mark.parametrize(
    "kwargs, message",
    [({"nfe": 0}, "nfe"), ({"sigma_min": 1.0, "sigma_max": 0.5}, "sigma_min must be <"), ({"nfe": 100}, "grid")],
)
def test_bad_arguments_are_clear(mixture8, bank8, kwargs, message) -> None:
    args = dict(nfe=4, shape=(8,), sigma_min=0.002, sigma_max=80.0, bank=bank8) | kwargs
    with pytest.raises(ValueError, match=message):
        search_in_process(mixture8, **args)
