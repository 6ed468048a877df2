"""Choosing the Phase-1 winner from finished trials, and the rows that report them.

Rule (DESIGN.md section 2): the lowest held-out E wins; trials within `tie_tolerance` (relative) of it are a
tie, and a tie goes to the cheaper trial (less optimization wall time), since its schedule is as good and
easier to reproduce. Heuristic baselines (optimizer "none") are trials too, so the winner is never worse than
the best heuristic on held-out E.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from fewstep_search.search.trials import TrialRecord

__all__ = [
    "BASELINE_OPTIMIZER",
    "DEFAULT_TIE_TOLERANCE",
    "best_heuristic",
    "select_winner",
    "candidate_row",
    "by_family",
]

DEFAULT_TIE_TOLERANCE = 1e-3
"""Held-out E within 0.1% of each other is a tie: below the Monte-Carlo noise of a 128-trajectory mean."""

BASELINE_OPTIMIZER = "none"


def _complete(records: Sequence[TrialRecord]) -> list[TrialRecord]:
    return [r for r in records if r.state == "COMPLETE" and math.isfinite(r.heldout_error)]


def best_heuristic(records: Sequence[TrialRecord]) -> TrialRecord | None:
    """The best baseline trial (optimizer "none"), or None when the search had none."""
    base = [r for r in _complete(records) if r.spec.optimizer == BASELINE_OPTIMIZER]
    return min(base, key=lambda r: r.heldout_error) if base else None


def select_winner(
    records: Sequence[TrialRecord], *, tie_tolerance: float = DEFAULT_TIE_TOLERANCE
) -> TrialRecord:
    """The lowest held-out E; among trials within `tie_tolerance` of it the cheapest. ValueError if none."""
    if tie_tolerance < 0:
        raise ValueError(f"tie_tolerance must be >= 0, got {tie_tolerance}")
    done = _complete(records)
    if not done:
        raise ValueError(f"no trial finished ({len(records)} failed); see the errors in the Optuna record")
    best = min(r.heldout_error for r in done)
    tied = [r for r in done if r.heldout_error <= best * (1.0 + tie_tolerance)]
    return min(tied, key=lambda r: (r.seconds, r.heldout_error))


def by_family(records: Sequence[TrialRecord]) -> dict[str, TrialRecord]:
    """The best complete trial of each optimizer (family), by held-out E."""
    out: dict[str, TrialRecord] = {}
    for r in _complete(records):
        cur = out.get(r.spec.optimizer)
        if cur is None or r.heldout_error < cur.heldout_error:
            out[r.spec.optimizer] = r
    return out


def candidate_row(record: TrialRecord, *, reference: float | None) -> dict[str, Any]:
    """A complete trial as a row of the round's metrics.json (the schema `fewstep_search.report` reads)."""
    if record.schedule is None:
        raise ValueError(f"trial {record.spec.label} has no schedule (state {record.state})")
    m = record.metrics
    ratio = m["heldout_error"] / reference if reference else math.nan
    return {
        **record.schedule.to_dict(),
        "kind": "heuristic" if record.spec.optimizer == BASELINE_OPTIMIZER else record.spec.optimizer,
        "fit_error": m["fit_error"],
        "heldout_error": m["heldout_error"],
        "heldout_vs_best_heuristic": ratio,
        "seconds": m["seconds"],
        "bw": m["bw"],
        "b0": m["b0"],
        "evaluations": int(m.get("evaluations", 0)),
        "trial": record.spec.to_dict(),
        "key": record.spec.key,
    }
