"""What the CLI shows: the live table of search trials, Phase-2 epochs, and the final results table.

`ConsoleReporter` implements the loop's `Reporter` with rich: a table that grows as trials finish (best select E
first; `E test` is the reported number, `vs heur` the ratio of test errors to the best heuristic's), one line per
Phase-2 epoch, and notes in yellow. `results_table` is the summary every run ends with: test E and FD for the best
heuristic, Phase-1 alone, and each round.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from fewstep_search.phase1.select import best_heuristic
from fewstep_search.phase1.trials import TrialRecord

__all__ = ["trials_table", "results_table", "ConsoleReporter"]

_MAX_ERROR_CHARS = 60


def trials_table(records: Sequence[TrialRecord], *, title: str, winner: TrialRecord | None = None,
                 total: int | None = None) -> Table:
    """One row per trial, best select E first, failed trials last; the winner marked."""
    ref = best_heuristic(records)
    ref_e = ref.test_error if ref is not None else math.nan
    done = sum(r.state == "COMPLETE" for r in records)
    stopped = sum(r.stopped_early for r in records)
    caption = f"{done} complete ({stopped} stopped early), {len(records) - done} failed" + (
        f", {total - len(records)} to go" if total is not None else "")
    table = Table(title=title, caption=caption, box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("trial", justify="left", overflow="fold")
    table.add_column("start", justify="left", no_wrap=True)
    for col in ("E select", "E test", "vs heur", "evals", "s"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in sorted(records, key=lambda r: (r.state != "COMPLETE", r.select_error)):
        s = r.spec
        name = "heuristic" if s.is_baseline else f"{s.optimizer} {s.objective} {s.parameterization}"
        if s.solver != "ddim":
            name += escape(f" [{s.solver}]")  # unescaped, rich reads [..] as a style tag and drops it
        if r.state == "COMPLETE":
            m = r.metrics
            ratio = m["test_error"] / ref_e if math.isfinite(ref_e) else math.nan
            evals = f"{int(m['evaluations'])}" + ("*" if r.stopped_early else "")
            cells = [f"{m['select_error']:.4f}", f"{m['test_error']:.4f}", f"{ratio:.3f}x", evals,
                     f"{m['seconds']:.2f}"]
            style = None
            if winner is not None and r.spec.key == winner.spec.key:
                name, style = f"* {name}", "bold green"
        else:
            cells, style = ["FAIL", f"{r.attempts} tries", "", "", ""], "red"
            name = f"{name}: {escape((r.error or 'failed')[:_MAX_ERROR_CHARS])}"
        table.add_row(name, s.start, *cells, style=style)
    return table


def _fmt(value: Any, spec: str = ".4f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def results_table(results: Mapping[str, Any]) -> Table:
    """Test E (and FD where measured) of the best heuristic, Phase-1 alone and each round; best pair marked.

    With a keep set, its E is shown too: the column the best pair was picked on (the test column decides nothing)."""
    on_keep = "keep_error" in results["baselines"]["phase1"]
    title = f"results (NFE = {results['nfe']}; E on the test trajectories" + (
        ", the best pair kept on E keep)" if on_keep else ")")
    table = Table(title=title, box=box.SIMPLE_HEAD)
    for col, just in (("pair", "left"), ("schedule", "left"), *((("E keep", "right"),) if on_keep else ()),
                      ("E test", "right"), ("vs heur", "right"), ("FD", "right")):
        table.add_column(col, justify=just, no_wrap=col != "schedule", overflow="fold")  # type: ignore[arg-type]
    base = results["baselines"]
    ref = base.get("best_heuristic", {}).get("test_error")
    rows: list[tuple[str, Mapping[str, Any], int | None]] = []
    if "best_heuristic" in base:
        rows.append(("untouched model, best heuristic", base["best_heuristic"], None))
    rows.append(("untouched model, Phase-1", base["phase1"], 0))
    for rd in results["rounds"]:
        rows.append((f"round {rd['round']}: Phase-1 + Phase-2", {**rd, "name": rd["schedule"]["name"]},
                     rd["round"]))
    best_round = results["best"]["round"]
    for label, row, rnd in rows:
        ratio = row["test_error"] / ref if ref else None
        style = "bold green" if rnd == best_round else None
        keep = (_fmt(row.get("keep_error")),) if on_keep else ()
        table.add_row(label, escape(str(row.get("name", ""))), *keep, _fmt(row["test_error"]), _fmt(ratio, ".3f"),
                      _fmt(row.get("fd"), ".2f"), style=style)
    return table


class ConsoleReporter:
    """The loop's `Reporter` on a rich console (see the module docstring)."""

    def __init__(self, console: Console | None = None, *, progress: bool = True) -> None:
        self.console = console or Console()
        self.progress = progress
        self.searches: list[list[TrialRecord]] = []

    def note(self, line: str) -> None:
        self.console.print(f"[yellow]note:[/yellow] {escape(line)}")

    def phase(self, line: str) -> None:
        self.console.print(f"[bold]{escape(line)}[/bold]")

    @contextlib.contextmanager
    def search(self, *, title: str, total: int) -> Iterator[Callable[[TrialRecord], None]]:
        records: list[TrialRecord] = []
        self.searches.append(records)
        live = Live(trials_table(records, title=title, total=total), console=self.console,
                    refresh_per_second=4, transient=True) if self.progress else None

        def show(record: TrialRecord) -> None:
            records.append(record)
            if live is not None:
                live.update(trials_table(records, title=title, total=total))

        if live is None:
            yield show
        else:
            with live:
                yield show
        if records:
            from fewstep_search.phase1.select import select_winner

            done = [r for r in records if r.state == "COMPLETE"]
            winner = select_winner(done) if done else None
            self.console.print(trials_table(records, title=title.replace(" search", " search, every trial"),
                                            winner=winner))

    def epoch(self, info: Mapping[str, Any]) -> None:
        parts = [f"{k} {_fmt(info[k], '.4f') if isinstance(info[k], float) else info[k]}"
                 for k in ("epoch", "step", "loss", "select_error", "test_error", "seconds") if k in info]
        self.console.print("  Phase-2 " + ", ".join(parts))
