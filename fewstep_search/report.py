"""Rich tables of scored schedules, shared by the CLI commands."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.table import Table

__all__ = ["candidates_table"]


def candidates_table(rows: Sequence[dict[str, Any]], *, title: str) -> Table:
    """One row per candidate: name, kind, fit E, held-out E, ratio to the best heuristic, seconds."""
    table = Table(title=title)
    for col, justify in (("schedule", "left"), ("kind", "left"), ("fit E", "right"), ("held-out E", "right"),
                         ("vs best heuristic", "right"), ("time s", "right")):
        table.add_column(col, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    best = min(r["heldout_error"] for r in rows)
    for r in sorted(rows, key=lambda r: r["heldout_error"]):
        style = "bold green" if r["heldout_error"] == best else None
        table.add_row(
            r["name"], r["kind"], f"{r['fit_error']:.4f}", f"{r['heldout_error']:.4f}",
            f"{r['heldout_vs_best_heuristic']:.3f}x", f"{r['seconds']:.2f}", style=style,
        )
    return table
