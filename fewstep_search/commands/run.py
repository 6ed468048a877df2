"""`fewstep-search run --budget N [--rounds R] [--study FILE] [--out DIR] ...`: the main job.

Rounds of Phase-1 (a Ray Tune search over optimizers x parameterizations x objectives, every trial recorded in
the Optuna study DIR/optuna.db, the winner picked on the select trajectories) and Phase-2 (a Ray Train fine-tune
of the model on exactly the winning steps), keeping the best (schedule, checkpoint) pair. `--rounds 0` is
Phase-1 alone. Results: DIR/best/schedule.json, DIR/best/model.safetensors, DIR/results.json, DIR/samples.png.
Errors are reported on the test trajectories, which no decision looks at. Rerunning the same command (or
`--resume --out DIR`) continues an interrupted run without redoing finished work.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from fewstep_search.commands._options import add_run_options, resolve_config


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="search a schedule and fine-tune the model on it (main job)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(p, default_out="runs/latest")
    p.add_argument("--rounds", type=int, default=None, help="Phase-1 + Phase-2 rounds (default: study's, 1); "
                   "0 = Phase-1 alone")
    p.set_defaults(handler=run)


def execute(args: argparse.Namespace, *, rounds: int | None = None) -> int:
    """Shared by `run` and `search` (which is `run` with rounds = 0)."""
    config, study_path = resolve_config(args, rounds=rounds)
    if args.dry_run:
        from fewstep_search.phase1.portfolio import trial_specs

        trials = [spec.key for spec in trial_specs(config.search, budget=config.nfe)]
        print(json.dumps({"config": config.model_dump(mode="json"), "trials": trials}, indent=2))
        return 0

    from rich.console import Console

    from fewstep_search.loop import LoopOptions, run_loop
    from fewstep_search.report import ConsoleReporter, results_table
    from fewstep_search.rundir import RunDir

    console = Console()
    t0 = time.perf_counter()
    rundir = RunDir(args.out)
    console.print(f"[bold]model[/bold] {config.model_id}  [bold]budget[/bold] {config.nfe} NFE  "
                  f"[bold]rounds[/bold] {config.rounds}  [bold]run dir[/bold] {rundir.path}")
    reporter = ConsoleReporter(console, progress=not args.quiet)
    options = LoopOptions(engine="local" if args.in_process else "ray", study_path=study_path)
    results = run_loop(config, rundir, reporter=reporter, options=options)
    from fewstep_search.figures import write_run_figures

    figures = write_run_figures(rundir, results, config, study_path=study_path)
    console.print(results_table(results))
    best = json.loads((rundir.path / "best" / "schedule.json").read_text())
    console.print("best sigmas: " + ", ".join(f"{s:.5g}" for s in best["sigmas"]))
    where = "best/schedule.json" + (" and best/model.safetensors" if results["best"].get("model") else "")
    console.print(f"best pair: round {results['best']['round']}, test E {results['best']['test_error']:.4f} -> "
                  f"{rundir.path}/{where}")
    if figures:
        console.print("figures: " + ", ".join(str(f) for f in figures))
    console.print(f"export: {export_command(best, config, rundir.path)}  (`fewstep-search export "
                  f"{rundir.path}` lists every format)")
    console.print(f"total {time.perf_counter() - t0:.1f} s")
    return 0


def export_command(best: dict[str, Any], config: Any, run_dir: Path) -> str:
    """The export command that carries most of the kept pair and works for it (`export.format_statuses`)."""
    from fewstep_search.export import FOLDER_KINDS, format_statuses
    from fewstep_search.schedules import Schedule

    kind = config.model.kind
    rows = {r.name: r for r in format_statuses(Schedule.from_dict(best), kind=kind,
                                               has_folder=kind in FOLDER_KINDS and bool(config.model.path))}
    name = next((n for n in ("diffusers-folder", "k-diffusion", "json") if rows[n].works), "json")
    return f"fewstep-search export {run_dir} --format {name}" + (
        f" --out {run_dir}/diffusers" if name == "diffusers-folder" else "")


def run(args: argparse.Namespace) -> int:
    return execute(args)
