"""Foundation benchmark: held-out true error of heuristic, DP and optimized schedules (DESIGN.md section 5).

Prints a markdown table per model: held-out E = mean ||x0_hat - x0*|| of the first-order (DDIM) solver against the
bank's accurate reference solve, on trajectories no schedule was fitted to; ratios to the best heuristic are taken
in this same run. Usage (the README's tables come from this command):

    .venv/bin/python benchmarks/schedules.py --models mixture64 mixture2 digits --out docs/schedules_results.md
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
from fewstep_search.optimize import search_in_process

from fewstep_search.bank import build_bank
from fewstep_search.models.loading import load_model

BUDGETS = (3, 4, 5, 6, 8, 10)
TABLE_HEURISTICS = ("edm_rho7", "log_uniform", "vp_time_uniform")
MODELS = {
    "mixture64": ("mixture", {"dim": 64, "seed": 0}, (64,), "Gaussian mixture, d = 64 (exact denoiser)"),
    "mixture2": ("mixture", {"dim": 2, "seed": 0}, (2,), "Gaussian mixture, d = 2 (exact denoiser)"),
    "digits": ("digits", {}, (1, 8, 8), "built-in `digits` model (trained U-Net, 8x8)"),
}


def run_model(key: str, *, n_trajectories: int, grid_size: int, refine_steps: int, seed: int) -> list[str]:
    kind, options, shape, title = MODELS[key]
    model = load_model(kind, options=options)
    lo, hi = float(model.sigma_min), float(model.sigma_max)
    t = time.perf_counter()
    bank = build_bank(model, shape=shape, sigma_min=lo, sigma_max=hi, n_trajectories=n_trajectories,
                      grid_size=grid_size, seed=seed, model_id=key, progress=sys.stderr.isatty())
    t_bank = time.perf_counter() - t
    heads = ["N", "EDM rho=7", "log-uniform", "VP time-uniform", "(VP time-quadratic)", "B_0-DP", "B_w-DP",
             "optimize_schedule", "B_w-DP / best of 3", "optimize / best of 3", "optimize / best of all",
             "DP s", "refine s"]
    lines = [
        f"### {title}",
        "",
        f"K = {n_trajectories} trajectories ({len(bank.heldout_idx)} held out), grid M = {grid_size}, "
        f"sigma in [{lo:g}, {hi:g}]; bank built in {t_bank:.1f} s. Held-out E (lower is better).",
        "",
        "| " + " | ".join(heads) + " |",
        "|" + "|".join("---:" for _ in heads) + "|",
    ]
    for n in BUDGETS:
        r = search_in_process(model, nfe=n, shape=shape, sigma_min=lo, sigma_max=hi, bank=bank,
                              dp_bounds=("bw", "b0"), refine_steps=refine_steps)
        e = {c.schedule.name: c.heldout_error for c in r.candidates}
        best3 = min(e[h] for h in TABLE_HEURISTICS)
        best_all = r.best_heuristic.heldout_error
        opt = min(c.heldout_error for c in r.candidates)
        row = [str(n), *(f"{e[h]:.4f}" for h in TABLE_HEURISTICS), f"{e['vp_time_quadratic']:.4f}",
               f"{e['b0_dp']:.4f}", f"{e['bw_dp']:.4f}", f"**{opt:.4f}**", f"{e['bw_dp'] / best3:.3f}",
               f"{opt / best3:.3f}", f"{opt / best_all:.3f}",
               f"{r.timings['bw_dp'] + r.timings['b0_dp']:.2f}", f"{r.timings['refine']:.1f}"]
        lines.append("| " + " | ".join(row) + " |")
        print(f"{key} N={n} done", file=sys.stderr)
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mixture64", "mixture2"], choices=sorted(MODELS))
    ap.add_argument("--trajectories", type=int, default=512)
    ap.add_argument("--grid", type=int, default=128)
    ap.add_argument("--refine-steps", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = ap.parse_args()
    lines = [f"<!-- benchmarks/schedules.py on {platform.machine()}, {torch.get_num_threads()} threads, "
             f"torch {torch.__version__} -->", ""]
    for key in args.models:
        lines += run_model(key, n_trajectories=args.trajectories, grid_size=args.grid,
                           refine_steps=args.refine_steps, seed=args.seed)
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
