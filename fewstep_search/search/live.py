"""Rich tables of search trials: a live one that grows as trials finish, and the final one.

Columns: the trial (optimizer, objective, parameterization; "heuristic" for the baselines), its start,
held-out E, the ratio to the best heuristic (the best "none" trial so far), objective evaluations and
optimization wall time; failed trials show their error. B_w, B_0 and fit E are in the Optuna record and the
round's metrics.json.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import TracebackType

from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Table

from fewstep_search.search.select import BASELINE_OPTIMIZER, best_heuristic
from fewstep_search.search.trials import TrialRecord

__all__ = ["trials_table", "LiveTrials"]

_MAX_ERROR_CHARS = 60


def trials_table(
    records: Sequence[TrialRecord], *, title: str, winner: TrialRecord | None = None, total: int | None = None
) -> Table:
    """One row per trial, best held-out E first, failed trials last; the winner in bold green."""
    ref = best_heuristic(records)
    ref_e = ref.heldout_error if ref is not None else math.nan
    done = sum(r.state == "COMPLETE" for r in records)
    failed = len(records) - done
    caption = f"{done} complete, {failed} failed" + (
        f", {total - len(records)} to go" if total is not None else ""
    )
    table = Table(title=title, caption=caption, box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("trial", justify="left", overflow="fold")  # optimizer objective parameterization
    table.add_column("start", justify="left", no_wrap=True)
    for col in ("E held", "vs heur", "evals", "s"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in sorted(records, key=lambda r: (r.state != "COMPLETE", r.heldout_error)):
        s = r.spec
        name = (
            "heuristic"
            if s.optimizer == BASELINE_OPTIMIZER
            else f"{s.optimizer} {s.objective} {s.parameterization}"
        )
        if r.state == "COMPLETE":
            m = r.metrics
            ratio = m["heldout_error"] / ref_e if math.isfinite(ref_e) else math.nan
            cells = [
                f"{m['heldout_error']:.4f}",
                f"{ratio:.3f}x",
                f"{int(m['evaluations'])}",
                f"{m['seconds']:.2f}",
            ]
            style = None
            if winner is not None and r is winner:
                name, style = f"* {name}", "bold green"
        else:
            err = (r.error or "failed")[:_MAX_ERROR_CHARS]
            cells, style = ["FAIL", f"{r.attempts} tries", "", ""], "red"
            name = f"{name}: {err}"
        table.add_row(name, s.start, *cells, style=style)
    return table


class LiveTrials:
    """A rich.live table refreshed as each trial finishes; a no-op when disabled (quiet runs, tests).

    Use as a context manager; call `add(record)` from the thread that receives results.
    """

    def __init__(
        self, *, title: str, total: int, console: Console | None = None, enabled: bool = True
    ) -> None:
        self.title, self.total, self.enabled = title, total, enabled
        self.records: list[TrialRecord] = []
        self._live = (
            Live(self._render(), console=console, refresh_per_second=4, transient=True) if enabled else None
        )

    def _render(self) -> Table:
        return trials_table(self.records, title=self.title, total=self.total)

    def add(self, record: TrialRecord) -> None:
        self.records.append(record)
        if self._live is not None:
            self._live.update(self._render())

    def __enter__(self) -> LiveTrials:
        if self._live is not None:
            self._live.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._live is not None:
            self._live.__exit__(exc_type, exc, tb)
