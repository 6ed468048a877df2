"""`optimize_schedule`: Phase-1 in process, for a user's own model (DESIGN.md section 4).

Pipeline: build a bank -> heuristic schedules -> B_w dynamic program on the grid -> refine the best starts on the
true error over the fit trajectories -> score every candidate on the held-out trajectories and return the best.
Because the heuristics are candidates too, the result is never worse on held-out E than the best heuristic tried.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fewstep_search.bank import Bank, build_bank
from fewstep_search.dp import dp_optimal
from fewstep_search.models.base import CheckedDenoiser, Denoiser
from fewstep_search.objectives import BoundKind, grid_cost_matrix, true_error
from fewstep_search.refine import refine_on_true_error
from fewstep_search.schedules import Schedule, check_range, make_schedule

__all__ = ["optimize_schedule", "search_in_process", "Candidate", "InProcessResult", "DEFAULT_HEURISTICS"]

DEFAULT_HEURISTICS: tuple[str, ...] = ("edm", "log_uniform", "vp_time_uniform", "vp_time_quadratic")


@dataclass(frozen=True)
class Candidate:
    """One scored schedule: `kind` is heuristic / dp / refined; E values are mean ||x0_hat - x0*||."""

    schedule: Schedule
    kind: str
    fit_error: float
    heldout_error: float
    seconds: float


@dataclass
class InProcessResult:
    """Everything `search_in_process` tried, and the winner (lowest held-out E)."""

    best: Schedule
    candidates: list[Candidate]
    bank: Bank
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def best_heuristic(self) -> Candidate:
        return min((c for c in self.candidates if c.kind == "heuristic"), key=lambda c: c.heldout_error)

    def candidate(self, name: str) -> Candidate:
        return next(c for c in self.candidates if c.schedule.name == name)


def _score(denoiser: Denoiser, bank: Bank, schedule: Schedule, solver: str, batch_size: int | None) -> float:
    with torch.no_grad():
        return float(true_error(denoiser, bank, schedule.tensor(), solver=solver, batch_size=batch_size))


def search_in_process(
    denoiser: Denoiser,
    *,
    nfe: int,
    shape: Sequence[int],
    sigma_min: float,
    sigma_max: float,
    seed: int = 0,
    bank: Bank | None = None,
    n_trajectories: int = 256,
    grid_size: int = 128,
    heuristics: Sequence[str] = DEFAULT_HEURISTICS,
    dp_bounds: Sequence[BoundKind] = ("bw",),
    refine_starts: int = 2,
    refine_steps: int = 150,
    lr: float = 0.05,
    solver: str = "ddim",
    batch_size: int | None = None,
    progress: bool = False,
    bank_options: dict[str, Any] | None = None,
) -> InProcessResult:
    """Run the in-process Phase-1 and return every candidate with its fit and held-out error.

    Args:
        bank: reuse a bank (its range must match); otherwise one is built with `n_trajectories`, `grid_size`,
            `seed` and `bank_options` (see `build_bank`).
        heuristics: schedule families to include (`fewstep_search.schedules.SCHEDULE_FAMILIES`).
        dp_bounds: which bounds get an exact grid DP ("bw", "b0").
        refine_starts: how many of the best candidates (by fit E) are refined on the true error.
        refine_steps, lr: Adam iterations and step size of each refinement.
    """
    check_range(nfe, sigma_min, sigma_max)
    den = denoiser if isinstance(denoiser, CheckedDenoiser) else CheckedDenoiser(denoiser)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if bank is None:
        bank = build_bank(
            den,
            shape=tuple(shape),
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            n_trajectories=n_trajectories,
            grid_size=grid_size,
            seed=seed,
            progress=progress,
            **(bank_options or {}),
        )
    elif abs(bank.sigma_min - sigma_min) > 1e-9 * sigma_min or abs(bank.sigma_max - sigma_max) > 1e-9 * sigma_max:
        raise ValueError(
            f"bank covers [{bank.sigma_min:g}, {bank.sigma_max:g}], not the requested [{sigma_min:g}, {sigma_max:g}]"
        )
    if nfe > bank.grid.numel() - 1:
        raise ValueError(f"nfe={nfe} exceeds the bank grid ({bank.grid.numel()} points); use a larger grid_size")
    timings["bank"] = time.perf_counter() - t0
    fit, held = bank.fit(), bank.heldout()

    found: list[tuple[Schedule, str, float]] = []
    for family in heuristics:
        t = time.perf_counter()
        found.append((make_schedule(family, nfe, sigma_min, sigma_max), "heuristic", time.perf_counter() - t))
    for kind in dp_bounds:
        t = time.perf_counter()
        idx, _ = dp_optimal(grid_cost_matrix(fit, kind), nfe)
        found.append((Schedule(bank.grid[idx].numpy(), name=f"{kind}_dp"), "dp", time.perf_counter() - t))
        timings[f"{kind}_dp"] = found[-1][2]

    fit_errors = [_score(den, fit, s, solver, batch_size) for s, _, _ in found]
    order = sorted(range(len(found)), key=lambda i: fit_errors[i])
    t_ref = time.perf_counter()
    refined = []
    for i in order[: max(0, refine_starts)]:
        t = time.perf_counter()
        start = found[i][0]
        sched, _ = refine_on_true_error(
            den, fit, start, steps=refine_steps, lr=lr, solver=solver, batch_size=batch_size,
            name=f"refined_from_{start.name}",
        )
        refined.append((sched, "refined", time.perf_counter() - t + found[i][2]))
    timings["refine"] = time.perf_counter() - t_ref
    found += refined
    fit_errors += [_score(den, fit, s, solver, batch_size) for s, _, _ in refined]

    t = time.perf_counter()
    candidates = [
        Candidate(s, kind, fe, _score(den, held, s, solver, batch_size), sec)
        for (s, kind, sec), fe in zip(found, fit_errors, strict=True)
    ]
    timings["score"] = time.perf_counter() - t
    best = min(candidates, key=lambda c: c.heldout_error)
    return InProcessResult(best=best.schedule, candidates=candidates, bank=bank, timings=timings)


def optimize_schedule(
    denoiser: Denoiser,
    *,
    nfe: int,
    shape: Sequence[int],
    sigma_min: float,
    sigma_max: float,
    seed: int = 0,
    **options: Any,
) -> Schedule:
    """Find a good `nfe`-step schedule for `denoiser` in process; see `search_in_process` for the options.

    Example:
        >>> from fewstep_search import optimize_schedule
        >>> from fewstep_search.models.mixture import builtin_mixture
        >>> s = optimize_schedule(builtin_mixture(dim=2), nfe=4, shape=(2,), sigma_min=0.002, sigma_max=80.0,
        ...                       n_trajectories=32, grid_size=32, refine_steps=5)
        >>> s.nfe
        4
    """
    return search_in_process(
        denoiser, nfe=nfe, shape=shape, sigma_min=sigma_min, sigma_max=sigma_max, seed=seed, **options
    ).best
