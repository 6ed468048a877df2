"""Does the library call finish on a laptop CPU? `optimize_schedule` with its defaults on a small diffusers UNet.

A randomly initialized `UNet2DModel` (3 x 16 x 16, about 1.1M parameters, DDPM linear betas, epsilon prediction)
through the diffusers adapter; `optimize_schedule(den, nfe=[4, 6, 10], ...)` sizes its bank from the model's
measured cost, builds it once, and searches the three budgets on it. Reports the chosen bank size, the bank's
time, each budget's search time, the total, and each winner's test E against the best heuristic's.
(Random weights make the schedules meaningless as schedules; the point is the cost, which does not depend on
what the weights learned.)

Usage:
    python benchmarks/library.py              # defaults (about a minute of bank)
    python benchmarks/library.py --bank-seconds 30 --budgets 4 6
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from fewstep_search.models.diffusers_adapter import DiffusersUNetDenoiser
from fewstep_search.noise import DiscreteVP, ddpm_alphas_cumprod
from fewstep_search.phase1.optimize import search_schedules


def small_unet(seed: int = 0) -> torch.nn.Module:
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64, 64),
                       layers_per_block=1, down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3,
                       norm_num_groups=8)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return unet.eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", nargs="+", type=int, default=[4, 6, 10])
    ap.add_argument("--bank-seconds", type=float, default=60.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    unet = small_unet()
    n_params = sum(p.numel() for p in unet.parameters())
    den = DiffusersUNetDenoiser(unet, DiscreteVP(ddpm_alphas_cumprod(1000)))
    t0 = time.perf_counter()
    bank, results = search_schedules(den, nfe=args.budgets, shape=(3, 16, 16), sigma_min=den.sigma_min,
                                     sigma_max=den.sigma_max, bank_seconds=args.bank_seconds,
                                     bank_options={"dtype": "float32", "probes": 1})
    total = time.perf_counter() - t0
    rows = ["| N | search s | winner | winner test E | best heuristic test E |", "|---:|---:|---|---:|---:|"]
    for n, r in results.items():
        seconds = sum(x.seconds for x in r.records)
        heur = r.best_heuristic
        rows.append(f"| {n} | {seconds:.0f} | {r.winner.spec.label} | {r.winner.test_error:.4f} | "
                    f"{heur.test_error if heur else float('nan'):.4f} |")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print("\n".join([
        f"UNet2DModel 3x16x16, {n_params / 1e6:.2f}M parameters, {args.threads} torch threads; bank K = "
        f"{bank.n_trajectories}, M = {bank.grid.numel()} (chosen from the model's cost).", "", *rows, "",
        f"Whole call (bank + {len(results)} budgets): {total:.0f} s; load average {load:.1f} at the end. "
        f"Command: `python benchmarks/library.py {' '.join(argv if argv is not None else sys.argv[1:])}`."]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
