"""Gradient refinement of a schedule on the true error E over the fit trajectories (the LD3 idea).

A thin wrapper kept for the in-process Phase-1 (`fewstep_search.optimize`): the optimizer itself is the
search's `Adam` (`fewstep_search.search.optimizers`) on the `direct` objective in the shared softmax-logit
parameterization (`fewstep_search.schedules.sigmas_from_logits`), so every step keeps the schedule valid with
exact endpoints, and the best iterate is kept (E is non-convex and noisy in the logits).
"""

from __future__ import annotations

from fewstep_search.bank import Bank
from fewstep_search.models.base import Denoiser
from fewstep_search.schedules import Schedule

__all__ = ["refine_on_true_error"]


def refine_on_true_error(
    denoiser: Denoiser,
    fit: Bank,
    start: Schedule,
    *,
    steps: int = 150,
    lr: float = 0.05,
    solver: str = "ddim",
    batch_size: int | None = None,
    name: str = "refined",
) -> tuple[Schedule, float]:
    """Minimize E(s) on `fit` from `start`; returns (best schedule seen, its fit E)."""
    from fewstep_search.search.optimizers import Adam
    from fewstep_search.search.parameterizations import Logits
    from fewstep_search.search.problem import Problem

    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    param = Logits(nfe=start.nfe, sigma_min=start.sigma_min, sigma_max=start.sigma_max)
    problem = Problem(objective="direct", parameterization=param, fit=fit, denoiser=denoiser, solver=solver,
                      batch_size=batch_size)
    result = Adam(steps=steps, lr=lr).minimize(problem, start)
    return Schedule(result.schedule.sigmas, name=name), result.value
