"""Choosing the Phase-1 winner from finished trials, and the rows that report them.

Rule (docs/design.md section 2): the lowest **select** E wins; trials within `tie_tolerance` (relative) of it are a
tie, and a tie goes to the cheaper trial (less optimization wall time), since its schedule is as good and easier
to reproduce. The best heuristic (the baseline every ratio is taken against) is also picked on select E. Every
number reported for a pick is its **test** E, from trajectories no decision looked at, so adding trials can
change which schedule wins but never flatters the reported error of a fixed schedule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from fewstep_search.phase1.trials import BEST_START, TrialRecord, TrialSpec, best_start_key

__all__ = ["DEFAULT_TIE_TOLERANCE", "best_heuristic", "best_starts", "select_winner", "candidate_row", "by_family",
           "by_start_quality", "complete"]

DEFAULT_TIE_TOLERANCE = 1e-3
"""Select E within 0.1% of each other is a tie: below the Monte-Carlo noise of a 32-trajectory mean."""


def complete(records: Sequence[TrialRecord]) -> list[TrialRecord]:
    """The trials that finished with a finite select error."""
    return [r for r in records if r.state == "COMPLETE" and math.isfinite(r.select_error)]


def best_heuristic(records: Sequence[TrialRecord]) -> TrialRecord | None:
    """The best baseline trial (optimizer "none") by select E, or None when the search had none."""
    base = [r for r in complete(records) if r.spec.is_baseline]
    return min(base, key=lambda r: r.select_error) if base else None


def select_winner(records: Sequence[TrialRecord], *, tie_tolerance: float = DEFAULT_TIE_TOLERANCE) -> TrialRecord:
    """The lowest select E; among trials within `tie_tolerance` of it the cheapest. ValueError if none."""
    if tie_tolerance < 0:
        raise ValueError(f"tie_tolerance must be >= 0, got {tie_tolerance}")
    done = complete(records)
    if not done:
        raise ValueError(f"no trial finished ({len(records)} failed); see the errors in the Optuna record")
    best = min(r.select_error for r in done)
    tied = [r for r in done if r.select_error <= best * (1.0 + tie_tolerance)]
    return min(tied, key=lambda r: (r.seconds, r.select_error))


def best_starts(records: Sequence[TrialRecord]) -> dict[str, list[float]]:
    """Per solver, the sigmas of the complete cheap trial with the lowest select E (what start "best" refines).

    Picked on select, like every other decision: the refinement then fits on fit and is picked on select again.
    """
    best: dict[str, TrialRecord] = {}
    for r in complete(records):
        if r.spec.is_costly or r.schedule is None:
            continue
        cur = best.get(r.spec.solver)
        if cur is None or r.select_error < cur.select_error:
            best[r.spec.solver] = r
    return {best_start_key(s): [float(v) for v in r.schedule.sigmas] for s, r in best.items()
            if r.schedule is not None}


def by_start_quality(specs: Sequence[TrialSpec], records: Sequence[TrialRecord], *,
                     lead_solvers: Sequence[str] = ()) -> list[TrialSpec]:
    """`specs` ordered by the select E of their start (ties: "best" first, then file order; unscored last).

    Why: under a wall-time budget the trials that refine the most promising points should run first. A start's
    select E is that of its heuristic's baseline with the trial's solver, or for start "best" that of the best
    cheap trial of the solver (what it refines). `lead_solvers`: the most promising trial with one of these
    solvers goes first whatever its rank (the loop's Phase-2 trains on the best first-order schedule).
    """
    quality: dict[tuple[str, str], float] = {}
    for r in complete(records):
        if r.spec.is_costly:
            continue
        keys = [(BEST_START, r.spec.solver)] + ([(r.spec.start, r.spec.solver)] if r.spec.is_baseline else [])
        for key in keys:
            quality[key] = min(quality.get(key, math.inf), r.select_error)
    ordered = sorted(specs, key=lambda s: (quality.get((s.start, s.solver), math.inf), s.start != BEST_START))
    lead = next((s for s in ordered if s.solver in lead_solvers), None)
    return ordered if lead is None else [lead, *(s for s in ordered if s is not lead)]


def by_family(records: Sequence[TrialRecord]) -> dict[str, TrialRecord]:
    """The best complete trial of each optimizer (family), picked by select E."""
    out: dict[str, TrialRecord] = {}
    for r in complete(records):
        cur = out.get(r.spec.optimizer)
        if cur is None or r.select_error < cur.select_error:
            out[r.spec.optimizer] = r
    return out


def candidate_row(record: TrialRecord, *, reference: TrialRecord | None) -> dict[str, Any]:
    """A complete trial as a row of a round's metrics.json; `vs_best_heuristic` is a ratio of test errors."""
    if record.schedule is None:
        raise ValueError(f"trial {record.spec.label} has no schedule (state {record.state})")
    m = record.metrics
    ratio = m["test_error"] / reference.test_error if reference is not None and reference.test_error else math.nan
    return {
        **record.schedule.to_dict(),
        "kind": "heuristic" if record.spec.is_baseline else record.spec.optimizer,
        "solver": record.spec.solver,
        **{k: float(m[k]) for k in ("fit_error", "select_error", "test_error", "bw", "b0", "seconds") if k in m},
        "test_vs_best_heuristic": ratio,
        "evaluations": int(m.get("evaluations", 0)),
        "stopped_early": bool(m.get("stopped_early", 0.0)),
        "trial": record.spec.to_dict(),
        "key": record.spec.key,
    }
