"""Benchmark of the Phase-1 search: quality against an oracle, and where the wall time goes.

For each model (the exact mixture `builtin_mixture(64)`; the built-in `digits` model) and budget N, on the bank
the CLI builds by default for it (digits: K = 128, M = 64, float32; mixture: studies/mixture64.toml's K = 512,
M = 128, float64), the default portfolio runs through the Ray Tune executor (the CLI's path; Ray started
once, its start-up reported apart; the cheap trials in the driver first, as the CLI runs them) twice in one
run: with early stopping of costly trials (ASHA on the select error, the default) and without. Reported:
* test E of the winner (picked on select E), of each optimizer family's best trial (picked on select E), of the
  best heuristic (picked on select E), and, with `--oracle-steps`, of an oracle: a long direct optimization of E
  (Adam, then L-BFGS-B) from every heuristic start and the B_w-DP schedule, the best of them picked on select;
* wall time of the whole search, and per trial kind (optimizer): summed and longest trial time.
Ratios, not absolute times, are what transfer between machines (DESIGN.md section 5).

Usage:
    python benchmarks/search.py --models digits --budgets 10 --workers 2            # the issue's target
    python benchmarks/search.py --models mixture digits --budgets 4 6 10 --oracle-steps 600 --out docs/search_results.md
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from _banks import MODELS, cached_bank

from fewstep_search.bank import Bank
from fewstep_search.phase1.budget import auto_fit_trajectories
from fewstep_search.phase1.chains import Chain, DPThenAdam, Stage
from fewstep_search.phase1.engine import Phase1Result, TrialContext, run_phase1
from fewstep_search.phase1.executors import tiered_executor
from fewstep_search.phase1.optimizers import LBFGSB, Adam
from fewstep_search.phase1.parameterizations import Logits
from fewstep_search.phase1.portfolio import trial_specs
from fewstep_search.phase1.problem import Problem
from fewstep_search.phase1.select import by_family
from fewstep_search.phase1.trials import score_schedule
from fewstep_search.ray_runtime import ray_session
from fewstep_search.schedules import DEFAULT_HEURISTICS, make_schedule
from fewstep_search.study import PruningSpec, SearchSpec

FAMILIES = ("dp", "lbfgsb", "dp_adam", "adam", "trust_constr", "tpe", "cmaes")


def _oracle(den: Any, bank: Bank, nfe: int, steps: int) -> float:
    """Test E of the best (on select E) of long direct optimizations from every heuristic and B_w-DP."""
    param = Logits(nfe=nfe, sigma_min=bank.sigma_min, sigma_max=bank.sigma_max)
    polish = Stage(LBFGSB(maxiter=200))
    starts = [make_schedule(f, nfe, bank.sigma_min, bank.sigma_max) for f in DEFAULT_HEURISTICS]
    runs = [(Chain(stages=[Stage(Adam(steps=steps, lr=0.02)), polish]), s) for s in starts]
    runs.append((Chain(stages=[Stage(DPThenAdam(steps=steps, lr=0.02)), polish]), starts[0]))
    best = (math.inf, math.inf)
    for opt, start in runs:
        problem = Problem(objective="direct", parameterization=param, fit=bank.fit(), denoiser=den)
        sched = opt.minimize(problem, start).schedule
        scores = score_schedule(den, bank, sched, parts=("select", "test"))
        best = min(best, (scores["select_error"], scores["test_error"]))
    return best[1]


def _search(bank: Bank, kind: str, nfe: int, workers: int, pruning: bool,
            seconds: float | None, cheap_on_ray: bool = True) -> tuple[Phase1Result, float, dict[str, float]]:
    spec = SearchSpec(pruning=PruningSpec(enabled=pruning), **({} if seconds is None else {"seconds": seconds}))
    specs = trial_specs(spec, budget=nfe)
    executor = tiered_executor(spec.model_copy(update={"workers": workers}), name=f"bench_{kind}_{nfe}_{pruning}",
                               cheap_on_ray=cheap_on_ray)
    t = time.perf_counter()
    arrived: dict[str, float] = {}
    result = run_phase1(specs, bank=bank, model=MODELS[kind]["source"],
                        context=TrialContext(nfe=nfe, fit_trajectories=auto_fit_trajectories(
                            MODELS[kind]["source"].load(), bank.fit(), nfe,
                            seconds_per_evaluation=spec.seconds_per_evaluation),
                            trial_seconds=spec.trial_seconds or None, search_seconds=spec.seconds or None),
                        executor=executor, on_record=lambda r: arrived.setdefault(r.spec.key, time.perf_counter() - t))
    return result, time.perf_counter() - t, arrived


def _budget(seconds: float | None) -> str:
    value = SearchSpec().seconds if seconds is None else seconds
    return f"{value:g} s" if value else "none"


def _kind_times(result: Phase1Result) -> dict[str, tuple[float, float, int]]:
    out: dict[str, list[float]] = defaultdict(list)
    for r in result.records:
        if r.state == "COMPLETE":
            out["heuristic" if r.spec.is_baseline else r.spec.optimizer].append(r.seconds)
    return {k: (sum(v), max(v), len(v)) for k, v in out.items()}


def _trial_rows(result: Phase1Result, arrived: dict[str, float], prefix: str) -> list[str]:
    done = sorted((r for r in result.records if r.state == "COMPLETE"), key=lambda r: r.select_error)
    rows = [f"{prefix} {r.spec.label} | {r.select_error:.4f} | {r.test_error:.4f} | "
            f"{int(r.metrics.get('evaluations', 0))}{'*' if r.stopped_early else ''} | {r.seconds:.1f} | "
            f"{arrived.get(r.spec.key, math.nan):.1f} |" for r in done]
    return rows + [f"{prefix} {label} (not run: budget spent) | - | - | 0 | - | - |" for label in result.not_run]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["digits"], choices=list(MODELS))
    ap.add_argument("--budgets", nargs="+", type=int, default=[10])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--pruning", choices=("on", "off", "both"), default="both",
                    help="early stopping of costly trials: with, without, or both runs")
    ap.add_argument("--oracle-steps", type=int, default=0, help="Adam steps per oracle start (0: no oracle)")
    ap.add_argument("--cache", type=Path, default=Path("runs/benchmark_banks"), help="where banks are kept")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    ap.add_argument("--trials", action="store_true", help="also a table of every trial")
    ap.add_argument("--seconds", type=float, nargs="+", default=[None],
                    help="search.seconds values, the whole search's wall-time budget, one search each (default: the "
                         "study default; 0: none)")
    ap.add_argument("--cheap-in-driver", action="store_true", help="run the cheap tier in the driver, not on Ray")
    args = ap.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    quality = ["| model | N | early stop, search budget | best heuristic | " + " | ".join(FAMILIES)
               + " | winner | oracle | winner / oracle | search s |",
               "|---|---|---|---|" + "---|" * len(FAMILIES) + "---|---|---|---|"]
    timing = ["| model | N | early stop, search budget | trial kind | trials | summed trial s | longest trial s |",
              "|---|---|---|---|---:|---:|---:|"]
    per_trial = ["| model | N | early stop, search budget | trial | select E | test E | evaluations | trial s "
                 "| done at s |",
                 "|---|---|---|---|---:|---:|---:|---:|---:|"]
    t = time.perf_counter()
    with ray_session(workers=args.workers):
        ray_start = time.perf_counter() - t
        for kind in args.models:
            den = MODELS[kind]["source"].load()
            bank = cached_bank(kind, den, args.cache)
            for n in args.budgets:
                oracle = _oracle(den, bank, n, args.oracle_steps) if args.oracle_steps else math.nan
                for pruning, budget in itertools.product(
                        {"on": (True,), "off": (False,), "both": (True, False)}[args.pruning], args.seconds):
                    result, seconds, arrived = _search(bank, kind, n, args.workers, pruning, budget,
                                                       cheap_on_ray=not args.cheap_in_driver)
                    fam = by_family(result.records)
                    heur, win = result.best_heuristic, result.winner
                    assert heur is not None
                    cells = [f"{fam[f].test_error:.4f}" if f in fam else "-" for f in FAMILIES]
                    flag = ("on" if pruning else "off") + f", budget {_budget(budget)}"
                    quality.append(
                        f"| {kind} | {n} | {flag} | {heur.test_error:.4f} ({heur.spec.start}) | " + " | ".join(cells)
                        + f" | {win.test_error:.4f} ({win.spec.optimizer}) | {oracle:.4f} | "
                        f"{win.test_error / oracle:.3f} | {seconds:.1f} |")
                    print(quality[-1], file=sys.stderr)
                    for k, (total, longest, count) in sorted(_kind_times(result).items()):
                        timing.append(f"| {kind} | {n} | {flag} | {k} | {count} | {total:.1f} | {longest:.1f} |")
                    if args.trials:
                        per_trial.extend(_trial_rows(result, arrived, f"| {kind} | {n} | {flag} |"))
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    text = "\n".join([
        "Test E (mean ||x0_hat - x0*|| over the bank's test trajectories, first-order solver). Every pick (the "
        "winner, each family's column, the best heuristic, the oracle's start) is made on the select "
        "trajectories.", "", *quality, "",
        f"Where the time goes ({args.workers} workers; Ray started once in {ray_start:.1f} s, not counted).", "",
        *timing, "",
        *(["Every trial (sorted by select E; `*`: stopped early).", "", *per_trial, ""] if args.trials else []),
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {load[0]:.1f} at the end; "
        f"torch {torch.__version__}. Command: `python benchmarks/search.py "
        f"{' '.join(argv if argv is not None else sys.argv[1:])}`.",
    ])
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
