"""One Phase-1 optimizer run to convergence from several heuristic starts, on the bank of a run folder.

Why: the CLI's search stops each trial after a few tens of seconds and keeps the best by select E, so a table of
its winners cannot tell a time-stopped trial from a local optimum. This script runs one trial per start with no
time stop and no pruning (`search_schedules(..., pruning=False)`, the same trials the search runs), and prints
each end point's select and test E and its sigmas: how far apart the optima are, and whether
the start that wins on select E also wins on test E.

    .venv/bin/python benchmarks/phase1_starts.py runs/benchmark_rounds/n10_20min_k192-norm \
        runs/benchmark_rounds/n10_20min_fill --nfe 10 --solver ipndm

Prints a markdown table; writes nothing. One torch thread per process (`--threads`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fewstep_search.bank import load_bank
from fewstep_search.models.source import ModelSource
from fewstep_search.phase1.optimize import search_schedules
from fewstep_search.phase1.trials import TrialSpec

STARTS = ("vp_time_quadratic", "log_uniform", "edm", "vp_time_uniform")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run folders of the built-in digits model (their bank)")
    ap.add_argument("--nfe", type=int, default=10)
    ap.add_argument("--solver", default="ipndm")
    ap.add_argument("--optimizer", default="lbfgsb")
    ap.add_argument("--maxiter", type=int, default=100)
    ap.add_argument("--starts", nargs="+", default=list(STARTS))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = ModelSource(kind="digits").load(cache=False)
    specs = [TrialSpec(optimizer=args.optimizer, objective="direct", parameterization="logits", start=s,
                       hyper={"maxiter": args.maxiter}, solver=args.solver) for s in args.starts]
    print(f"`{args.optimizer}:direct:logits` for {args.solver} at N = {args.nfe}, maxiter {args.maxiter}, no time "
          f"stop (`benchmarks/phase1_starts.py {' '.join(str(r) for r in args.runs)} --nfe {args.nfe} "
          f"--solver {args.solver}`):\n")
    print("| run (bank) | start | select E | test E | sigmas |")
    print("|---|---|---|---|---|")
    for run in args.runs:
        bank = load_bank(run / "bank.safetensors")
        _, res = search_schedules(model, nfe=args.nfe, shape=bank.shape, sigma_min=bank.sigma_min,
                                  sigma_max=bank.sigma_max, bank=bank, specs=specs, pruning=False, progress=False)
        for rec in res[args.nfe].records:
            if rec.schedule is None:
                print(f"| `{run.name}` | {rec.spec.start} | failed: {rec.error} | | |")
                continue
            sig = ", ".join(f"{float(v):.3g}" for v in rec.schedule.sigmas)
            print(f"| `{run.name}` | {rec.spec.start} | {rec.select_error:.4f} | {rec.test_error:.4f} | {sig} |",
                  flush=True)


if __name__ == "__main__":
    main()
