"""Benchmark of the Phase-1 search: quality against an oracle, and wall time with 1 and 2 Ray workers.

For each model (the exact mixture `builtin_mixture(64)`; the built-in `digits` model when its weights are
installed) and each budget N, on one bank (K = 256 trajectories, half held out, M = 128 grid points):
* held-out E of the search winner, of each optimizer family's best trial, of the best heuristic, and of an
  oracle: a long direct optimization (Adam, then L-BFGS-B) of E from several starts (the heuristics and the
  B_w-DP schedule), the best of them on held-out E;
* wall time of the whole search (Ray already started; its start-up is reported apart) with 1 and 2 workers,
  and the mean / max wall time of one trial.
Prints markdown tables (and writes them with `--out`). Ratios, not absolute times, are what transfer between
machines (DESIGN.md section 5).

Usage:
    python benchmarks/search.py                       # mixture, and digits if available; N = 4 6 10
    python benchmarks/search.py --models mixture --budgets 4 --workers 2 --oracle-steps 200   # quick
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fewstep_search.bank import Bank, BankMismatchError, build_bank, load_bank
from fewstep_search.models.loading import load_model
from fewstep_search.schedules import make_schedule
from fewstep_search.search.config import DEFAULT_BASELINES, SearchSpec
from fewstep_search.search.engine import ModelSource, run_search
from fewstep_search.search.optimizers import LBFGSB, Adam, Chain, DPThenAdam, Stage
from fewstep_search.search.parameterizations import Logits
from fewstep_search.search.problem import Problem
from fewstep_search.search.select import best_heuristic, by_family, select_winner
from fewstep_search.search.trials import TrialRecord, score_schedule

MODELS: dict[str, dict[str, Any]] = {"mixture": {"options": {"dim": 64}}, "digits": {"options": {}}}
FAMILIES = ("dp", "dp_adam", "adam", "lbfgsb", "trust_constr", "tpe", "cmaes")
BANK = {"n_trajectories": 256, "grid_size": 128, "seed": 0}


@dataclass
class SearchRun:
    records: list[TrialRecord]
    seconds: float


def _bank(kind: str, den: Any, cache: Path) -> Bank:
    path = cache / f"{kind}_K{BANK['n_trajectories']}_M{BANK['grid_size']}.safetensors"
    lo, hi = float(den.sigma_min), float(den.sigma_max)
    expect = {"model_id": kind, "sigma_min": lo, "sigma_max": hi, **BANK}
    if path.exists():
        try:
            return load_bank(path, expect=expect)
        except (BankMismatchError, ValueError):
            pass
    t = time.perf_counter()
    bank = build_bank(
        den, shape=tuple(den.shape), sigma_min=lo, sigma_max=hi, model_id=kind, progress=True, **BANK
    )
    print(f"[{kind}] bank built in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    bank.save(path)
    return bank


def _oracle(den: Any, bank: Bank, nfe: int, steps: int) -> float:
    """Best held-out E over long direct optimizations (Adam, then L-BFGS-B) from several starts."""
    fit = bank.fit()
    param = Logits(nfe=nfe, sigma_min=bank.sigma_min, sigma_max=bank.sigma_max)
    polish = Stage(LBFGSB(maxiter=200))
    runs = [
        (
            Chain(stages=[Stage(Adam(steps=steps, lr=0.02)), polish]),
            make_schedule(f, nfe, bank.sigma_min, bank.sigma_max),
        )
        for f in DEFAULT_BASELINES
    ]
    runs.append((Chain(stages=[Stage(DPThenAdam(steps=steps, lr=0.02)), polish]), runs[0][1]))
    best = math.inf
    for opt, start in runs:
        problem = Problem(objective="direct", parameterization=param, fit=fit, denoiser=den)
        sched = opt.minimize(problem, start).schedule
        best = min(best, score_schedule(den, bank, sched)["heldout_error"])
    return best


def _search(bank: Bank, kind: str, nfe: int, workers: int) -> SearchRun:
    specs = SearchSpec().specs()
    t = time.perf_counter()
    records = run_search(
        specs,
        bank=bank,
        model=ModelSource(kind=kind, options=MODELS[kind]["options"]),
        nfe=nfe,
        workers=workers,
        name=f"bench_{kind}_{nfe}_{workers}",
    )
    return SearchRun(records, time.perf_counter() - t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--budgets", nargs="+", type=int, default=[4, 6, 10])
    ap.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--oracle-steps", type=int, default=1000, help="Adam steps per oracle start")
    ap.add_argument("--cache", type=Path, default=Path("runs/benchmark_banks"), help="where banks are kept")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = ap.parse_args(argv)
    import ray

    torch.set_num_threads(1)
    args.cache.mkdir(parents=True, exist_ok=True)
    quality = [
        "| model | N | best heuristic | " + " | ".join(FAMILIES) + " | winner | oracle | winner / oracle |",
        "|---|---|---|" + "---|" * len(FAMILIES) + "---|---|---|",
    ]
    timing = [
        "| model | N | workers | Ray start s | whole search s | trials | mean trial s | max trial s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    skipped = []
    for kind in args.models:
        try:
            den = load_model(kind, options=MODELS[kind]["options"])
        except (ValueError, FileNotFoundError, RuntimeError) as exc:
            skipped.append(f"{kind}: {str(exc).splitlines()[0]}")
            continue
        bank = _bank(kind, den, args.cache)
        runs: dict[tuple[int, int], SearchRun] = {}
        for w in args.workers:
            t = time.perf_counter()
            ray.init(num_cpus=w, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
            start = time.perf_counter() - t
            try:
                for n in args.budgets:
                    runs[(n, w)] = r = _search(bank, kind, n, w)
                    secs = [x.seconds for x in r.records if x.state == "COMPLETE"]
                    timing.append(
                        f"| {kind} | {n} | {w} | {start:.1f} | {r.seconds:.1f} | {len(r.records)} | "
                        f"{sum(secs) / len(secs):.2f} | {max(secs):.2f} |"
                    )
                    print(timing[-1], file=sys.stderr)
            finally:
                ray.shutdown()
        for n in args.budgets:
            recs = runs[(n, max(args.workers))].records
            fam = by_family(recs)
            heur = best_heuristic(recs)
            win = select_winner(recs)
            t = time.perf_counter()
            oracle = _oracle(den, bank, n, args.oracle_steps)
            print(f"[{kind}] N={n} oracle in {time.perf_counter() - t:.0f} s", file=sys.stderr)
            cells = [f"{fam[f].heldout_error:.4f}" if f in fam else "-" for f in FAMILIES]
            if heur is None:
                raise RuntimeError("the search ran no heuristic baseline")
            quality.append(
                f"| {kind} | {n} | {heur.heldout_error:.4f} ({heur.spec.start}) | "
                + " | ".join(cells)
                + f" | {win.heldout_error:.4f} ({win.spec.optimizer}) | {oracle:.4f} | "
                f"{win.heldout_error / oracle:.3f} |"
            )
            print(quality[-1], file=sys.stderr)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    text = "\n".join(
        [
            "Held-out E (mean ||x0_hat - x0*|| over 128 held-out trajectories, first-order solver); "
            "each family's column is its best trial.",
            "",
            *quality,
            "",
            "Wall time (search with Ray already running; the bank already built).",
            "",
            *timing,
            "",
            f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {load[0]:.1f} at the end "
            "(CPUs shared with other jobs); torch " + torch.__version__ + ".",
            *(f"Skipped {s}" for s in skipped),
        ]
    )
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
