"""`fewstep-search eval --schedule FILE.json|NAME [--schedule ...] [--study FILE] [--budget N] [--solver S]`.

Scores schedules on the study's model with the sampler every export runs: test E on fresh reference trajectories
(seeded by --seed; the default 1 is not the seed a run's bank and keep set use, 0), with a 95% bootstrap interval,
and the FD against real digits on the built-in model. With several --schedule, each row after the first also
gets its paired difference to the first (the same trajectories), so a schedule you sample with today can be
compared with a result:

  fewstep-search eval --schedule runs/demo/best/schedule.json --schedule edm --schedule vp_time_quadratic

A schedule is a JSON file with "sigmas" (a run's best/schedule.json, or an export), a run folder (its
best/schedule.json), or a heuristic's name (edm, log_uniform, vp_time_uniform, vp_time_quadratic, cosine,
flow_uniform, flow_shift3) built for --budget on the model's range. A run's kept pair is scored with its weights
(best/model.safetensors beside the schedule), everything else with the study's model (or --weights).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="score schedules on the study's model: test E with intervals (and FD)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schedule", action="append", required=True, metavar="FILE|NAME",
                   help="a schedule JSON, a run folder, or a heuristic's name; repeat to compare")
    p.add_argument("--study", type=Path, default=None, help="study TOML file (default: built-in digits model)")
    p.add_argument("--budget", type=int, default=None, help="NFE of heuristic schedules (default: the study's)")
    p.add_argument("--solver", default=None, help="solver for heuristic schedules (default ddim; files keep theirs)")
    p.add_argument("--weights", type=Path, default=None, help="a checkpoint of the study's model for every row")
    p.add_argument("--trajectories", type=int, default=256, help="fresh reference trajectories (default 256)")
    p.add_argument("--seed", type=int, default=1, help="seed of the fresh trajectories (default 1)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the study's)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(handler=run)


def _read_schedule(spec: str) -> tuple[Any, Path | None]:
    """(the schedule of a file or run folder, the pair's weights beside it), or (None, None) for a name."""
    from fewstep_search.schedules import Schedule

    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "best" / "schedule.json"
    if not path.is_file():
        if path.suffix == ".json" or "/" in spec:
            raise FileNotFoundError(f"schedule {spec}: no such file")
        return None, None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and data.get("sigmas") and data["sigmas"][-1] == 0.0:
            raise ValueError("its sigmas end in 0 (an export); use the run's best/schedule.json")
        schedule = Schedule.from_dict(data)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"schedule {path}: {e}") from None
    weights = path.parent / "model.safetensors"
    return schedule, (weights if int(data.get("round", 0)) > 0 and weights.is_file() else None)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from fewstep_search.bank.keep import build_keep_set
    from fewstep_search.denoiser import family_of
    from fewstep_search.intervals import bootstrap_mean, paired_difference
    from fewstep_search.objectives import trajectory_errors
    from fewstep_search.quality import sample_quality_of
    from fewstep_search.resolve import (
        check_conditions,
        model_source,
        resolve_device,
        resolve_range,
        resolve_shape,
        study_plan,
    )
    from fewstep_search.schedules import SCHEDULE_FAMILIES, make_schedule
    from fewstep_search.solvers import SOLVERS
    from fewstep_search.study import load_study

    if args.trajectories < 2:
        raise ValueError(f"--trajectories must be >= 2 (an interval needs two), got {args.trajectories}")
    if args.solver is not None and args.solver not in SOLVERS:
        raise ValueError(f"unknown solver {args.solver!r}; known: {', '.join(SOLVERS)}")
    config = load_study(args.study).with_overrides(nfe=args.budget, device=args.device)
    resolve_device(config.device)
    rows_in = [(spec, *_read_schedule(spec)) for spec in args.schedule]
    for spec, schedule, _ in rows_in:
        if schedule is None and spec not in SCHEDULE_FAMILIES:
            raise ValueError(f"schedule {spec!r} is neither a file nor a heuristic ({', '.join(SCHEDULE_FAMILIES)})")
    source = model_source(config, study_path=args.study)
    model = source.load(cache=False)
    check_conditions(model, source)
    notes: list[str] = []
    sigma_min, sigma_max = resolve_range(model, config, notes)
    shape = resolve_shape(model, config)
    plan = study_plan(model, config, sigma_min=sigma_min, sigma_max=sigma_max, shape=shape, keep_states=False,
                      seed=args.seed)
    fresh = build_keep_set(model, plan, args.trajectories, device=config.device, batch_size=config.bank.batch_size,
                           progress=not args.json)
    rows: list[dict[str, Any]] = []
    first: Any = None
    for spec, schedule, pair_weights in rows_in:
        if schedule is None:
            schedule = dataclasses.replace(make_schedule(spec, config.nfe, sigma_min, sigma_max),
                                           solver=args.solver or "ddim", family=family_of(model))
        weights = args.weights or pair_weights
        den = model if weights is None else source.with_checkpoint(weights).load(cache=False)
        errs = trajectory_errors(den, fresh, schedule.tensor(device=fresh.device), solver=schedule.solver,
                                 batch_size=config.bank.batch_size).numpy()
        mean, lo, hi = bootstrap_mean(errs)
        row = {"schedule": spec, "name": schedule.name, "solver": schedule.solver, "nfe": schedule.nfe,
               "weights": str(weights) if weights else "study model", "test_error": mean, "interval": [lo, hi]}
        if first is not None:
            row["vs_first"] = list(paired_difference(errs, first))
        first = errs if first is None else first
        quality = sample_quality_of(den, schedule, solver=schedule.solver, device=config.device)
        if quality is not None:
            row["fd"] = quality["fd"]
        rows.append(row)
    if args.json:
        print(json.dumps({"trajectories": args.trajectories, "seed": args.seed, "rows": rows}, indent=2))
    else:
        _print_table(rows, args.trajectories, args.seed, notes)
    return 0


def _print_table(rows: list[dict[str, Any]], n: int, seed: int, notes: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"test E on {n} fresh trajectories (seed {seed}), 95% bootstrap intervals")
    for col in ("schedule", "solver", "N", "weights", "test E [95%]", "minus the first [95%]", "FD"):
        table.add_column(col)
    for r in rows:
        lo, hi = r["interval"]
        diff = r.get("vs_first")
        table.add_row(r["schedule"], r["solver"], str(r["nfe"]), r["weights"],
                      f"{r['test_error']:.4f} [{lo:.4f}, {hi:.4f}]",
                      f"{diff[0]:+.4f} [{diff[1]:+.4f}, {diff[2]:+.4f}]" if diff else "",
                      f"{r['fd']:.2f}" if "fd" in r else "")
    console = Console()
    for line in notes:
        console.print(line)
    console.print(table)
