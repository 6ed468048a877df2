"""The keep set: fresh reference trajectories on which the loop decides which (schedule, model) pair to keep.

Why a fourth set: the loop compares Phase-1's pair (the untouched model with the search's winner) with each
round's pair (a fine-tuned student with its schedule). Phase-1's winner was picked on the select trajectories
among every trial, so its select E is biased low, while a round's select E is not (Phase-2 picks nothing on
it). Deciding on trajectories that no earlier choice looked at removes that bias, and more of them (256 by
default, against 64 select) damp the noise of a student's rare mode flips (`fewstep_search.best_pair`); the test
set stays what results are reported on, never decided on.

The keep trajectories are the bank plan's trajectories K..K+n-1: their start noise comes from the same seeded
per-trajectory generator as the bank's (so they are disjoint from it and reproducible), and they are solved
exactly as the bank solves its own (RK4 in log sigma down the bank's grid, `substeps` per cell, then the last
step into 0), so keep E and test E measure the same thing. Only the end points are kept: E needs nothing else,
so no gains are swept and no outputs are stored (`denoised` has width 0; every trajectory is labelled select,
the set's role).
"""

from __future__ import annotations

import math

import torch

from fewstep_search.bank.build import BankPlan
from fewstep_search.bank.container import SPLIT_NAMES, Bank
from fewstep_search.denoiser import CheckedDenoiser, Denoiser, bind_condition
from fewstep_search.progress import task_progress
from fewstep_search.solvers import rk4_interval

__all__ = ["build_keep_set", "keep_expectation"]

KEEP_SET = "keep"
"""`meta["set"]` of a keep set: a bank file of reference trajectories is never mistaken for one, nor back."""
KEEP_CHUNK = 128
"""Trajectories solved together by default (`bank.batch_size` overrides): only the current states are held, no
grid of them, so the chunk is bounded by the model's activations. On the digits model (2 cores) 256 trajectories
took 36 s in chunks of 128 and 52 s in one chunk; 128 took 21 s in one chunk and 37 s in chunks of 32."""


def keep_expectation(bank_expect: dict[str, object], n: int) -> dict[str, object]:
    """The metadata a cached keep set must have: the bank's (model, range, grid, solve, seed, K) and its size."""
    return {**bank_expect, "set": KEEP_SET, "keep_trajectories": int(n)}


def build_keep_set(denoiser: Denoiser, plan: BankPlan, n: int, *, device: torch.device | str = "cpu",
                   batch_size: int | None = None, progress: bool = False) -> Bank:
    """Solve the `n` keep trajectories of `plan` (see the module docstring); a `Bank` for `true_error`."""
    if n < 1:
        raise ValueError(f"a keep set needs at least one trajectory, got {n}")
    den = denoiser if isinstance(denoiser, CheckedDenoiser) else CheckedDenoiser(denoiser)
    k0 = plan.n_trajectories
    grid = plan.grid().to(device)
    x_start = plan.x_start(k0, k0 + n)
    allowed = plan.decision_conditions()  # a prompt set's test prompts never decide
    cond = None if allowed is None else allowed[torch.arange(k0, k0 + n) % allowed.numel()]
    x_end = torch.empty_like(x_start)
    chunk = batch_size or min(n, KEEP_CHUNK)
    with task_progress("solving the keep set", total=(grid.numel() - 1) * math.ceil(n / chunk),
                       enabled=progress) as tick, torch.no_grad():
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            part = bind_condition(den, None if cond is None else cond[lo:hi].to(device))
            x = x_start[lo:hi].to(device)
            for j in range(grid.numel() - 1):
                x = rk4_interval(part, x, grid[j], grid[j + 1], substeps=plan.substeps)
                tick()
            x_end[lo:hi] = part(x, grid[-1].to(x.dtype).expand(x.shape[0])).cpu()  # the step into 0, as the bank's
    m = plan.grid_size
    return Bank(grid=plan.grid(), x_start=x_start, x_end=x_end, denoised=x_start.new_zeros((n, m, 0)),
                phi=torch.ones((n, m), dtype=torch.float64),
                split=torch.full((n,), SPLIT_NAMES.index("select"), dtype=torch.int8), cond=cond,
                meta={**plan.meta(), "set": KEEP_SET, "keep_trajectories": int(n)})
