"""Gradient refinement of a schedule on the true error E over the fit trajectories (the LD3 idea).

The schedule moves in the shared softmax-logit parameterization (`fewstep_search.schedules.sigmas_from_logits`),
so every step keeps it valid with exact endpoints. Adam, with the best iterate kept (E is non-convex and noisy in
the logits, and the last iterate is not always the best).
"""

from __future__ import annotations

import torch

from fewstep_search.bank import Bank
from fewstep_search.models.base import Denoiser
from fewstep_search.objectives import true_error
from fewstep_search.schedules import Schedule, logits_from_sigmas, sigmas_from_logits

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
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    lo, hi = start.sigma_min, start.sigma_max
    logits = logits_from_sigmas(start).clone().requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=lr)
    best = (start, float("inf"))
    for _ in range(steps + 1):
        opt.zero_grad()
        sig = sigmas_from_logits(logits, lo, hi)
        err = true_error(denoiser, fit, sig, solver=solver, batch_size=batch_size)
        value = err.detach().item()
        if value < best[1]:
            best = (Schedule(sig.detach().numpy(), name=name), value)
        err.backward()
        opt.step()
    return best
