"""`fewstep-search search --budget N [--study FILE] [--out DIR] [--workers W] [--address A]`: Phase-1 alone.

Runs the Phase-1 search (DESIGN.md section 2) as Ray Tune trials over optimizers x parameterizations x
objectives, records every trial in an Optuna study (`DIR/optuna.db` unless `--storage`), and writes the winner
(lowest held-out E) to DIR/round_1/schedule.json and DIR/best/schedule.json. Rerunning the same command
resumes: finished trials are read back from the Optuna record. See the trials with `fewstep-search dashboard
DIR`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def add_search_options(p: argparse.ArgumentParser) -> None:
    """The Ray / Optuna options, shared with `run`."""
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="concurrent trials (local Ray CPUs); default: study, else all CPUs",
    )
    p.add_argument(
        "--address",
        default=None,
        help="attach to this Ray cluster (e.g. auto) instead of starting Ray locally",
    )
    p.add_argument(
        "--storage", default=None, help="Optuna storage URL for the record (default: sqlite DIR/optuna.db)"
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "search",
        help="Phase-1 alone: the Ray Tune schedule search, recorded in Optuna",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--budget", type=int, default=None, help="NFE budget (number of solver steps); default: study's nfe"
    )
    p.add_argument(
        "--study", type=Path, default=None, help="study TOML file (default: built-in digits model)"
    )
    p.add_argument("--out", type=Path, default=Path("runs/search"), help="run directory (resumable)")
    add_search_options(p)
    p.add_argument(
        "--dry-run", action="store_true", help="print the resolved config and the trials, then exit"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or live table")
    p.set_defaults(handler=run)


def apply_search_overrides(config: Any, args: argparse.Namespace) -> Any:
    """The study with `--workers`, `--address`, `--storage` applied to its [search] table, validated again."""
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    changes = {k: getattr(args, k) for k in ("workers", "address", "storage") if getattr(args, k) is not None}
    if not changes:
        return config
    return config.with_overrides(search=config.search.model_copy(update=changes).model_dump())


def resolve_config(args: argparse.Namespace) -> Any:
    """The study with the command-line overrides applied (budget, workers, address, storage), validated."""
    from fewstep_search.study import load_study

    config = load_study(args.study)
    if args.budget is not None:
        if args.budget < 1:
            raise ValueError(f"--budget must be >= 1 network evaluation, got {args.budget}")
        config = config.with_overrides(nfe=args.budget)
    return apply_search_overrides(config, args)


def run(args: argparse.Namespace) -> int:
    config = resolve_config(args)
    if args.dry_run:
        print(json.dumps(config.model_dump(mode="json"), indent=2))
        for spec in config.search.specs():
            print(spec.key)
        return 0

    from rich.console import Console

    from fewstep_search.pipeline import load_study_model
    from fewstep_search.rundir import RunDir
    from fewstep_search.search.phase1 import phase1_search, print_outcome, resolve_model_source

    console = Console()
    rundir = RunDir(args.out)
    rundir.prepare(config)
    t0 = time.perf_counter()
    spec = config.model
    denoiser = load_study_model(config, args.study)
    console.print(
        f"[bold]model[/bold] {spec.model_id}  [bold]budget[/bold] {config.nfe} NFE  "
        f"[bold]run dir[/bold] {rundir.path}  [bold]trials[/bold] {len(config.search.specs())}"
    )
    outcome = phase1_search(
        denoiser,
        config,
        rundir,
        model=resolve_model_source(config, study_path=args.study),
        console=console,
        progress=not args.quiet,
    )
    print_outcome(outcome, console=console, nfe=config.nfe)
    best = outcome.metrics["best"]
    path = rundir.write_best(best)
    console.print("sigmas: " + ", ".join(f"{s:.5g}" for s in best["sigmas"]))
    console.print(
        f"winner ({best['name']}): held-out E {best['heldout_error']:.4f}, "
        f"{best['heldout_vs_best_heuristic']:.3f}x the best heuristic -> {path}"
    )
    console.print(f"total {time.perf_counter() - t0:.1f} s")
    return 0
