"""The generated blocks of README.md and docs pages: `<!-- NAME:start -->` ... `<!-- NAME:end -->`, shared by the
benchmark scripts that write their tables there (peers, rounds, main_job)."""

from __future__ import annotations

from pathlib import Path

from fewstep_search.atomic import atomic_write_text

__all__ = ["markers", "replace_block"]


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def replace_block(path: Path, name: str, body: str, *, create: bool = False) -> None:
    """Put `body` between the block's markers in `path` (atomically); a missing file is made only with `create`,
    a file without the markers is refused in one line, so a table never lands where no one asked for it."""
    start, end = markers(name)
    text = f"{start}\n{end}\n" if create and not path.is_file() else path.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{path}: no {start} ... {end} block to fill")
    head, rest = text.split(start, 1)
    atomic_write_text(path, f"{head}{start}\n{body}\n{end}{rest.split(end, 1)[1]}")
