"""Sample quality of a (model, schedule) pair where the model has data to compare against (Frechet distance).

Only models that advertise a `dataset` the project has real samples of are scored; today that is the built-in
`digits` model (FD in the features of the shipped digits classifier, against the held-out real digits, see
`fewstep_search.metrics`). Every pair is sampled from the same seeded noise, so FDs in one run compare like
for like.
"""

from __future__ import annotations

from typing import Any

import torch

from fewstep_search.denoiser import Denoiser, bind_condition, is_conditional
from fewstep_search.schedules import Schedule, prior_scale
from fewstep_search.solvers import get_solver, sampling_sigmas

__all__ = ["has_quality_metric", "sample", "sample_quality_of", "QUALITY_SAMPLES"]

QUALITY_SAMPLES = 1000
"""Samples per FD: FD is biased upward for small counts, so every FD of a run uses the same number."""


def has_quality_metric(denoiser: object) -> bool:
    return getattr(denoiser, "dataset", None) == "digits"


def sample(denoiser: Denoiser, schedule: Schedule, *, n: int, shape: tuple[int, ...], seed: int = 0,
           solver: str = "ddim", batch_size: int = 500, device: str = "cpu") -> torch.Tensor:
    """n samples from seeded noise, started from the family's prior as every solve is (`solvers.sample`), solved
    with `schedule` (its last step into 0, as exported); in float32, batched, for pictures and sample quality."""
    gen = torch.Generator().manual_seed(seed)
    scale = prior_scale(schedule.family, schedule.sigma_max)
    x = torch.randn((n, *shape), generator=gen, dtype=torch.float64, device="cpu") * scale
    solve = get_solver(solver)
    sigmas = sampling_sigmas(schedule.tensor(device=device))
    out = []
    with torch.no_grad():
        for lo in range(0, n, batch_size):
            xb = x[lo : lo + batch_size].to(device=device, dtype=torch.float32)
            cond = (torch.arange(lo, lo + xb.shape[0], device=device) % len(denoiser.conditions)  # type: ignore
                    if is_conditional(denoiser) else None)
            out.append(solve(bind_condition(denoiser, cond), xb, sigmas.to(xb.dtype)).cpu())
    return torch.cat(out)


def sample_quality_of(denoiser: Denoiser, schedule: Schedule, *, solver: str = "ddim", n: int = QUALITY_SAMPLES,
                      seed: int = 0, device: str = "cpu") -> dict[str, Any] | None:
    """{"fd", "confidence", "n"} for models with a quality metric, else None."""
    if not has_quality_metric(denoiser):
        return None
    from fewstep_search.data import DIGITS_SHAPE
    from fewstep_search.metrics import sample_quality

    q = sample_quality(sample(denoiser, schedule, n=n, shape=DIGITS_SHAPE, seed=seed, solver=solver, device=device))
    return {"fd": q.fd, "confidence": q.confidence, "n": q.n}
