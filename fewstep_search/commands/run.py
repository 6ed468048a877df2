"""`fewstep-search run --budget N [--study FILE] [--out DIR]`: the main job.

Phase-1 is the Ray Tune search (`fewstep-search search`: optimizers x parameterizations x objectives, every
trial recorded in the Optuna study DIR/optuna.db, the winner chosen on held-out E); `--in-process` runs the
smaller in-process Phase-1 instead (heuristics, B_w dynamic program, true-error refinement), without Ray.
Results go to a resumable run directory (DIR/round_1/, DIR/best/schedule.json). Phase-2 plugs in here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fewstep_search.commands.search import add_search_options, resolve_config


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="search a schedule for a model (main job)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=int, default=None, help="NFE budget (number of solver steps); default: study's nfe")
    p.add_argument("--study", type=Path, default=None, help="study TOML file (default: built-in digits model)")
    p.add_argument("--out", type=Path, default=Path("runs/latest"), help="run directory (resumable)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--in-process", action="store_true",
                   help="run Phase-1 in this process (no Ray): heuristics, B_w-DP, true-error refinement")
    add_search_options(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    config = resolve_config(args)
    if args.dry_run:
        print(json.dumps(config.model_dump(mode="json"), indent=2))
        return 0

    from rich.console import Console

    from fewstep_search.pipeline import load_study_model, phase1_in_process
    from fewstep_search.report import candidates_table
    from fewstep_search.rundir import RunDir

    console = Console(stderr=False)
    rundir = RunDir(args.out)
    rundir.prepare(config)
    t0 = time.perf_counter()
    spec = config.model
    denoiser = load_study_model(config, args.study)
    console.print(f"[bold]model[/bold] {spec.model_id}  [bold]budget[/bold] {config.nfe} NFE  "
                  f"[bold]run dir[/bold] {rundir.path}")
    if args.in_process:
        result = phase1_in_process(denoiser, config, rundir, progress=not args.quiet, console=console)
        title = f"Phase-1 candidates (NFE = {config.nfe})"
        console.print(candidates_table(result["candidates"], title=title))
    else:
        from fewstep_search.search.phase1 import phase1_search, print_outcome, resolve_model_source

        source = resolve_model_source(config, study_path=args.study)
        outcome = phase1_search(denoiser, config, rundir, model=source, console=console,
                                progress=not args.quiet)
        print_outcome(outcome, console=console, nfe=config.nfe)
        result = outcome.metrics
    best = rundir.write_best(result["best"])
    console.print("sigmas: " + ", ".join(f"{s:.5g}" for s in result["best"]["sigmas"]))
    console.print(f"best schedule ({result['best']['name']}): held-out E {result['best']['heldout_error']:.4f}, "
                  f"{result['best']['heldout_vs_best_heuristic']:.3f}x the best heuristic -> {best}")
    console.print(f"total {time.perf_counter() - t0:.1f} s")
    sys.stdout.flush()
    return 0
