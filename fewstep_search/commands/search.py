"""`fewstep-search search --budget N [--study FILE] [--out DIR] [--workers W] [--address A]`: Phase-1 alone.

The same as `fewstep-search run --rounds 0`: the Phase-1 search (docs/design.md section 2) as Ray Tune trials over
optimizers x parameterizations x objectives, every trial recorded in an Optuna study (`DIR/optuna.db` unless
`--storage`), the winner picked on the select trajectories and reported on the test ones, written to
DIR/round_1/ and DIR/best/schedule.json. Rerunning the same command resumes: finished trials are read back from
the Optuna record. See the trials with `fewstep-search dashboard DIR`.
"""

from __future__ import annotations

import argparse

from fewstep_search.commands._options import add_run_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="Phase-1 alone: the Ray Tune schedule search, recorded in Optuna",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(p, default_out="runs/search")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from fewstep_search.commands.run import execute

    return execute(args, rounds=0)
