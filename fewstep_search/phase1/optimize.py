"""`optimize_schedule`: Phase-1 alone, in process, for a user's own model (docs/design.md section 4).

It builds one bank (or reuses the one given), runs the engine's in-process executor over a small default
portfolio (the heuristics, the B_w and B_0 dynamic programs, DP -> Adam and Adam on the true error), picks the
winner on the select trajectories, and returns its schedule. One bank serves several budgets:
`optimize_schedule(..., nfe=[4, 6, 10])` returns {4: Schedule, 6: Schedule, 10: Schedule}.

Bank size: where `n_trajectories` is not given it is chosen from the model's measured cost so the bank takes
about `bank_seconds` (printed when `progress` is on, and recorded in `bank.meta`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fewstep_search.bank import Bank, build_bank
from fewstep_search.denoiser import CheckedDenoiser, Denoiser, bind_condition, is_conditional
from fewstep_search.models.source import ModelSource
from fewstep_search.phase1.engine import InProcessExecutor, Phase1Result, TrialContext, run_phase1
from fewstep_search.phase1.portfolio import library_specs
from fewstep_search.phase1.trials import TrialRecord, TrialSpec
from fewstep_search.schedules import Schedule, check_range
from fewstep_search.study.search import PruningSpec

__all__ = ["optimize_schedule", "search_schedules", "auto_bank_size", "BankSize"]


@dataclass(frozen=True)
class BankSize:
    """The bank size `auto_bank_size` chose, and why."""

    n_trajectories: int
    grid_size: int
    seconds_per_call: float
    predicted_seconds: float


def auto_bank_size(denoiser: Denoiser, *, shape: Sequence[int], sigma_max: float, budget_seconds: float,
                   grid_size: int = 64, substeps: int = 2, probes: int = 1, dtype: torch.dtype = torch.float32,
                   bounds: tuple[int, int] = (32, 256)) -> BankSize:
    """K so that the bank takes about `budget_seconds`, from one timed batch of model calls (K in `bounds`).

    Per trajectory the build makes M (4 substeps) calls forward and, for the gains, (M - 1) probes 4 calls
    forward and backward (about 3x a forward call each).
    """
    batch = 16
    x = torch.randn(batch, *shape, dtype=dtype) * sigma_max
    s = torch.full((batch,), sigma_max, dtype=dtype)
    den = bind_condition(denoiser, torch.zeros(batch, dtype=torch.long)) if is_conditional(denoiser) else denoiser
    with torch.no_grad():
        den(x, s)  # warm-up (lazy initialization, caches)
        t0 = time.perf_counter()
        den(x, s)
        per_call = (time.perf_counter() - t0) / batch
    calls = grid_size * 4 * substeps + (grid_size - 1) * probes * 4 * 3
    k = budget_seconds / max(per_call * calls, 1e-12)
    k = int(min(max(k, bounds[0]), bounds[1])) // 4 * 4
    return BankSize(k, grid_size, per_call, k * calls * per_call)


def search_schedules(
    denoiser: Denoiser,
    *,
    nfe: int | Sequence[int],
    shape: Sequence[int],
    sigma_min: float,
    sigma_max: float,
    seed: int = 0,
    bank: Bank | None = None,
    specs: Sequence[TrialSpec] | None = None,
    n_trajectories: int | None = None,
    grid_size: int = 64,
    bank_seconds: float = 60.0,
    refine_steps: int = 60,
    lr: float = 0.05,
    batch_size: int | None = None,
    pruning: bool = True,
    progress: bool = True,
    bank_options: dict[str, Any] | None = None,
) -> tuple[Bank, dict[int, Phase1Result]]:
    """The bank and, per budget, the full Phase-1 result (every trial's fit / select / test errors).

    Args:
        bank: reuse a bank (its range must match); otherwise one is built with `n_trajectories` (default:
            sized from the model's cost, see `auto_bank_size`), `grid_size`, `seed` and `bank_options`.
        specs: the trials (default: `fewstep_search.phase1.portfolio.library_specs(refine_steps=..., lr=...)`).
        pruning: stop costly trials early by successive halving on the select error.
        progress: a progress bar for the bank, what size was chosen, and one line per finished trial (stderr).
    """
    budgets = [nfe] if isinstance(nfe, int) else list(nfe)
    if not budgets:
        raise ValueError("nfe must be a budget or a non-empty list of budgets")
    for n in budgets:
        check_range(n, sigma_min, sigma_max)
    den = denoiser if isinstance(denoiser, CheckedDenoiser) else CheckedDenoiser(denoiser)
    if bank is None:
        opts = dict(bank_options or {})
        if n_trajectories is None:
            size = auto_bank_size(den, shape=shape, sigma_max=sigma_max, budget_seconds=bank_seconds,
                                  grid_size=grid_size, dtype=getattr(torch, str(opts.get("dtype", "float64"))
                                                                     .removeprefix("torch.")))
            n_trajectories = size.n_trajectories
            if progress:
                _stderr().print(
                    f"bank: K = {size.n_trajectories} trajectories, M = {grid_size} grid points "
                    f"(model call {size.seconds_per_call * 1e3:.2f} ms/sample, about {size.predicted_seconds:.0f} s)")
        bank = build_bank(den, shape=tuple(shape), sigma_min=sigma_min, sigma_max=sigma_max,
                          n_trajectories=n_trajectories, grid_size=grid_size, seed=seed, progress=progress, **opts)
    elif not (math.isclose(bank.sigma_min, sigma_min, rel_tol=1e-9)
              and math.isclose(bank.sigma_max, sigma_max, rel_tol=1e-9)):
        raise ValueError(
            f"bank covers [{bank.sigma_min:g}, {bank.sigma_max:g}], not the requested [{sigma_min:g}, {sigma_max:g}]"
        )
    for n in budgets:
        if n > bank.grid.numel() - 1:
            raise ValueError(f"nfe={n} exceeds the bank grid ({bank.grid.numel()} points); use a larger grid_size")
    chosen = list(specs) if specs is not None else library_specs(refine_steps=refine_steps, lr=lr)
    executor = InProcessExecutor(pruning=PruningSpec(enabled=pruning))
    results = {}
    for n in budgets:
        results[n] = run_phase1(chosen, bank=bank, model=ModelSource.of(den),
                                context=TrialContext(nfe=n, batch_size=batch_size, device=str(bank.device)),
                                executor=executor, on_record=_trial_printer(n, len(chosen)) if progress else None)
        if progress:
            w = results[n].winner
            _stderr().print(f"NFE {n}: {w.spec.label} wins (select E {w.select_error:.4f}, test E {w.test_error:.4f})")
    return bank, results


def _stderr() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def _trial_printer(nfe: int, total: int) -> Callable[[TrialRecord], None]:
    """One line per finished trial, so a notebook user sees the search move."""
    console, seen = _stderr(), [0]

    def show(record: TrialRecord) -> None:
        seen[0] += 1
        what = (f"select E {record.select_error:.4f}" + (" (stopped early)" if record.stopped_early else "")
                if record.state == "COMPLETE" else f"FAILED: {record.error}")
        console.print(f"NFE {nfe} trial {seen[0]}/{total} {record.spec.label}: {what}, {record.seconds:.1f} s")

    return show


def optimize_schedule(
    denoiser: Denoiser,
    *,
    nfe: int | Sequence[int],
    shape: Sequence[int],
    sigma_min: float,
    sigma_max: float,
    seed: int = 0,
    **options: Any,
) -> Schedule | dict[int, Schedule]:
    """Find a good `nfe`-step schedule for `denoiser` in process; see `search_schedules` for the options.

    Returns the winner (lowest error on the select trajectories); a list of budgets gives {budget: Schedule},
    all searched on one bank.

    Example:
        >>> from fewstep_search import optimize_schedule
        >>> from fewstep_search.models.mixture import builtin_mixture
        >>> s = optimize_schedule(builtin_mixture(dim=2), nfe=4, shape=(2,), sigma_min=0.002, sigma_max=80.0,
        ...                       n_trajectories=32, grid_size=32, refine_steps=5)
        >>> s.nfe
        4
    """
    _, results = search_schedules(denoiser, nfe=nfe, shape=shape, sigma_min=sigma_min, sigma_max=sigma_max,
                                  seed=seed, **options)
    winners = {n: r.winner.schedule for n, r in results.items()}
    if any(s is None for s in winners.values()):  # cannot happen: select_winner returns complete trials
        raise RuntimeError("a winning trial has no schedule")
    if isinstance(nfe, int):
        return winners[nfe]  # type: ignore[return-value]
    return winners  # type: ignore[return-value]
