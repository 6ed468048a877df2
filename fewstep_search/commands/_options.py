"""Options shared by `run` and `search`, and turning them into a validated study (one-line errors)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["add_run_options", "resolve_config", "MAX_BUDGET"]

MAX_BUDGET = 1000


def add_run_options(p: argparse.ArgumentParser, *, default_out: str) -> None:
    p.add_argument("--budget", type=int, default=None, help="NFE budget (model calls per sample); default: study's nfe")
    p.add_argument("--study", type=Path, default=None, help="study TOML file (default: built-in digits model)")
    p.add_argument("--out", type=Path, default=Path(default_out), help="run directory (resumable)")
    p.add_argument("--workers", type=int, default=None, help="concurrent trials (local Ray CPUs); default: all CPUs")
    p.add_argument("--address", default=None, help="attach to this Ray cluster (e.g. auto) instead of a local Ray")
    p.add_argument("--storage", default=None, help="Optuna storage URL for the record (default: sqlite DIR/optuna.db)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: the study's, else cpu)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out with the config it recorded (no --study needed)")
    p.add_argument("--in-process", action="store_true",
                   help="no Ray: trials and training in this process (small models, debugging)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and the trials, then exit")
    p.add_argument("--quiet", action="store_true", help="no progress bars or live tables")


def _check_numbers(args: argparse.Namespace) -> None:
    if args.budget is not None and not 1 <= args.budget <= MAX_BUDGET:
        raise ValueError(f"--budget must be between 1 and {MAX_BUDGET} network evaluations, got {args.budget}")
    if getattr(args, "rounds", None) is not None and args.rounds < 0:
        raise ValueError(f"--rounds must be >= 0 (0 = Phase-1 alone), got {args.rounds}")
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")


def resolve_config(args: argparse.Namespace, *, rounds: int | None = None) -> tuple[Any, Path | None]:
    """(the study with the command-line overrides applied and every trial name checked, the study file)."""
    from fewstep_search.phase1.portfolio import trial_specs
    from fewstep_search.resolve import resolve_device
    from fewstep_search.rundir import RunDir, RunDirError
    from fewstep_search.study import StudyConfig, load_study

    _check_numbers(args)
    study_path = args.study
    if args.resume:
        run = RunDir(args.out)
        recorded = run.recorded_config()
        if recorded is None:
            raise RunDirError(f"--resume: {args.out} holds no run to continue (no config.json)")
        config = StudyConfig.model_validate(recorded)
        if args.budget is not None and args.budget != config.nfe:
            raise RunDirError(f"--resume continues the run in {args.out} (budget {config.nfe}); drop --budget "
                              "or choose another --out")
        if args.study is not None:
            raise RunDirError("--resume uses the study the run recorded; drop --study")
        study_path = run.recorded_study_file()
    else:
        config = load_study(args.study)
    changes: dict[str, Any] = {"nfe": args.budget, "device": args.device,
                               "rounds": rounds if rounds is not None else getattr(args, "rounds", None)}
    search = {k: getattr(args, k) for k in ("workers", "address", "storage") if getattr(args, k) is not None}
    if search:
        changes["search"] = config.search.model_copy(update=search).model_dump()
    config = config.with_overrides(**changes)
    resolve_device(config.device)
    trial_specs(config.search, budget=config.nfe)
    return config, study_path
