"""How many fit trajectories a true-error evaluation solves: sized from the model's measured speed.

Why: a costly trial's wall time is (evaluations) x (trajectories per evaluation) x (model call time). On a cheap
model (an analytic mixture) every fit trajectory costs microseconds and fitting on all of them is free; on a
network (the digits U-Net: ~2 ms per sample-call on one core) a search that solves all 64 fit trajectories per
evaluation takes minutes. `auto_fit_trajectories` times one evaluation and keeps the number of trajectories whose
forward solve takes about `seconds_per_evaluation`, never fewer than `minimum`: the optimizers fit a fixed subset
(the split is random, so the first n are a random sample), the select set still picks the winner, and the full
fit error is still reported.
"""

from __future__ import annotations

import time

import torch

from fewstep_search.bank import Bank
from fewstep_search.denoiser import Denoiser
from fewstep_search.objectives import true_error
from fewstep_search.schedules import make_schedule

__all__ = ["auto_fit_trajectories"]


def auto_fit_trajectories(denoiser: Denoiser, fit: Bank, nfe: int, *, seconds_per_evaluation: float,
                          minimum: int = 16, batch_size: int | None = None) -> int:
    """Fit trajectories per evaluation: one forward solve of E on them takes about `seconds_per_evaluation`."""
    if seconds_per_evaluation <= 0:
        raise ValueError(f"seconds_per_evaluation must be > 0, got {seconds_per_evaluation}")
    k = fit.n_trajectories
    n = min(k, max(1, minimum))
    probe = fit.subset(torch.arange(n))
    sigmas = make_schedule("edm", nfe, fit.sigma_min, fit.sigma_max).tensor(device=fit.device)
    with torch.no_grad():
        true_error(denoiser, probe, sigmas, batch_size=batch_size)  # warm-up: first calls allocate
        t0 = time.perf_counter()
        true_error(denoiser, probe, sigmas, batch_size=batch_size)
        per_trajectory = (time.perf_counter() - t0) / n
    return int(min(k, max(n, seconds_per_evaluation / max(per_trajectory, 1e-9))))
