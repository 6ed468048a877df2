"""How accurate the end-to-end term's targets are: the teacher's end points x0* against a much finer solve.

    .venv/bin/python benchmarks/teacher_accuracy.py            # writes docs/phase2.md's teacher-accuracy block

Why it matters: the student is regressed onto these end points, so it cannot get closer to the reference (the
bank's x0*, which every reported E uses) than they are. For each model, `--samples` noise draws at sigma_max are
solved by RK4 in sub-steps of 1/32 in log sigma (the yardstick), and each candidate solve's E (mean L2 distance
of the end points, as `true_error` measures) is reported beside its teacher calls per sample:

* the bank's own reference (RK4 on the CLI's log grid, 2 sub-steps per cell): what E is measured against;
* RK4 through the nodes of a 10-step EDM schedule at `max_log_step` 0.5 / 0.25 / 0.125 (`teacher_solver =
  "auto"`: the end-to-end targets before `end_to_end_teacher_steps`, 0.5 being the old default);
* iPNDM on a fine Karras grid (`phase2.targets.end_point`, the default with 200 steps).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _banks import MODELS
from _blocks import replace_block
from torch import Tensor

from fewstep_search.bank.build import log_grid
from fewstep_search.phase2.targets import CountingDenoiser, IntervalTeacher, end_point, solve_interval
from fewstep_search.schedules import karras
from fewstep_search.solvers import reference

ROOT = Path(__file__).resolve().parents[1]
YARDSTICK_STEP = 1 / 32


def candidates(den: Any, grid_size: int) -> list[tuple[str, Callable[[Any, Tensor], Tensor]]]:
    lo, hi = float(den.sigma_min), float(den.sigma_max)
    nodes = tuple(float(s) for s in karras(10, lo, hi).sigmas)
    rows: list[tuple[str, Callable[[Any, Tensor], Tensor]]] = [
        (f"the bank's reference (RK4, {grid_size} log cells x 2 sub-steps)",
         lambda d, x: reference(d, x, log_grid(lo, hi, grid_size + 1).to(torch.float64), substeps=2)),
    ]
    for step in (0.5, 0.25, 0.125):
        rows.append((f"RK4 through EDM-10 nodes, max_log_step {step}",
                     lambda d, x, s=step: IntervalTeacher(d, nodes, s, "auto").trajectory(x)[-1]))
    for n in (100, 150, 200, 300):
        rows.append((f"iPNDM on a {n}-step Karras grid", lambda d, x, n=n: end_point(d, x, hi, lo, steps=n)))
    return rows


def measure(kind: str, samples: int) -> list[str]:
    den = MODELS[kind]["source"].load()
    dtype = MODELS[kind]["bank"]["dtype"]
    g = torch.Generator().manual_seed(0)
    x = float(den.sigma_max) * torch.randn(samples, *den.shape, generator=g, dtype=torch.float64).to(dtype)
    with torch.no_grad():
        ref = solve_interval(den, x, float(den.sigma_max), float(den.sigma_min), max_log_step=YARDSTICK_STEP,
                             solver="rk4")
        scale = float(ref.flatten(1).norm(dim=1).mean())
        rows = []
        for label, solve in candidates(den, MODELS[kind]["bank"]["grid_size"]):
            counter = CountingDenoiser(den)
            t0 = time.perf_counter()
            y = solve(counter, x)
            sec = time.perf_counter() - t0
            err = float((y - ref).flatten(1).norm(dim=1).mean())
            rows.append(f"| {kind} | {label} | {counter.sample_calls / samples:.0f} | {err:.4f} | "
                        f"{err / scale:.1e} | {sec / samples * 1e3:.0f} |")
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["digits", "mixture"], choices=sorted(MODELS))
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/phase2.md alone")
    a = ap.parse_args(argv)
    lines = ["| model | end-point solve | teacher calls per sample | E against RK4 at 1/32 | E / mean norm of x0 | "
             "ms per sample |", "|---|---|---|---|---|---|"]
    for kind in a.models:
        lines += measure(kind, a.samples)
    args = " ".join(argv if argv is not None else sys.argv[1:])
    body = (f"Made by `python benchmarks/teacher_accuracy.py{' ' + args if args else ''}` on {platform.machine()}, "
            f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads "
            f"({a.samples} noise draws per model; times are indicative).\n\n" + "\n".join(lines) + "\n")
    print(body)
    if not a.no_write:
        replace_block(ROOT / "docs" / "phase2.md", "teacher-accuracy", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
