"""Progress bars (rich) that disappear when disabled, so library code can always report progress."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["task_progress"]


@contextmanager
def task_progress(description: str, *, total: int, enabled: bool = True) -> Iterator[Callable[[], None]]:
    """Yield a `tick()` that advances a rich progress bar by one (a no-op when disabled)."""
    if not enabled:
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)
