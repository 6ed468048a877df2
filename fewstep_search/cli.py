"""The `fewstep-search` command line. Thin by design: it parses, validates and calls.

Each subcommand lives in `fewstep_search/commands/<name>.py` and exposes `add_parser(subparsers)` and `run(args)`;
heavy imports happen inside `run`, so `fewstep-search --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from fewstep_search import __version__

# name -> module under fewstep_search.commands
COMMANDS: tuple[str, ...] = ("run", "search", "export", "eval", "dashboard", "pretrain")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fewstep-search",
        description="Search sampling schedules that make diffusion models sample well in 3-10 steps.",
    )
    parser.add_argument("--version", action="version", version=f"fewstep-search {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"fewstep_search.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"fewstep_search.commands.{name}":
                continue  # command not shipped in this build
            raise
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; finished work is kept in the run directory (rerun the same command to resume)",
              file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, MemoryError) as exc:
        # User-facing failures (bad study file, budget 0, a checkpoint that does not load, NaNs from the model)
        # are one line, not a traceback. FEWSTEP_DEBUG=1 shows the traceback.
        import os

        if os.environ.get("FEWSTEP_DEBUG"):
            raise
        print(f"fewstep-search: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
