"""A second opinion on a finished run: its schedules and its fine-tuned model re-scored on data no run has seen.

A run reports test E on the bank's test trajectories (32 for the default digits bank) and FD on one seeded batch
of 1000 samples. Both are honest (no decision looked at them) but noisy: a 1-point difference in a cut can be
noise. This script re-scores the run's pairs on `--trajectories` fresh reference trajectories (new noise seed,
solved like the bank: RK4 in log sigma, 2 sub-steps per cell of a 128-point grid) and FD on `--fd-seeds` fresh
batches, and reports each with its spread:

* E: mean over the fresh trajectories, and the cut of the fine-tuned pair against each untouched pair with a
  95% paired bootstrap interval (resampling trajectories);
* FD: mean and standard deviation over the seeds, and the paired difference (fine-tuned minus untouched, same
  noise in each seed) with its standard error, and the FD of the untouched model's accurate solve (what a
  student that matches its teacher tends to).

    .venv/bin/python benchmarks/fresh_check.py runs/benchmark_rounds/n4_20min_lr2e-5 \
        runs/benchmark_rounds/n10_20min_lr2e-5 --trajectories 512 --fd-seeds 5

Digits runs only (FD needs the digits classifier). The table goes to docs/phase2.md and README.md between
`<!-- fresh:start -->` and `<!-- fresh:end -->` unless `--no-write`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _blocks import markers, replace_block

from fewstep_search.bank.build import log_grid
from fewstep_search.denoiser import Denoiser
from fewstep_search.metrics import sample_quality
from fewstep_search.models.source import ModelSource
from fewstep_search.quality import QUALITY_SAMPLES, sample
from fewstep_search.schedules import Schedule, make_schedule
from fewstep_search.solvers import get_solver, reference, sampling_sigmas

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (1, 8, 8)
ACCURATE_STEPS = 200
"""iPNDM steps on EDM's (Karras) grid of the untouched model's accurate solve: the FD a student that matches its
teacher tends to (off the bank's reference by E = 0.0005 on digits; `benchmarks/rounds.py` shows the same)."""
SEED_BASE = 10_000
"""Fresh noise: the runs use seeds 0..K for the bank and seed 0 for FD; these start far above."""


def fresh_references(teacher: Denoiser, n: int, sigma_min: float, sigma_max: float,
                     batch: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_start, x0*) of `n` fresh trajectories, solved as the bank solves its own (float64, then the step into 0:
    the clean end x*(0)); another `seed` draws another set (a setting picked on one set is reported on another)."""
    gen = torch.Generator().manual_seed(SEED_BASE + seed)
    x = torch.randn((n, *SHAPE), generator=gen, dtype=torch.float64) * sigma_max
    grid = torch.cat([log_grid(sigma_min, sigma_max, 128).to(torch.float64), torch.zeros(1, dtype=torch.float64)])
    with torch.no_grad():
        ends = [reference(teacher, x[lo:lo + batch], grid, substeps=2) for lo in range(0, n, batch)]
    return x, torch.cat(ends)


def errors(den: Denoiser, sched: Schedule, solver: str, x: torch.Tensor, x0: torch.Tensor) -> np.ndarray:
    """Per-trajectory ||Solve(x) - x0*||, the scored sampler (its last step into 0)."""
    with torch.no_grad():
        out = get_solver(solver)(den, x, sampling_sigmas(sched.tensor(dtype=x.dtype)))
    return (out - x0).flatten(1).norm(dim=1).numpy()


def cut_interval(new: np.ndarray, old: np.ndarray, reps: int = 2000) -> tuple[float, float, float]:
    """Cut 1 - mean(new) / mean(old) and its 95% paired bootstrap interval over trajectories."""
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(new), size=(reps, len(new)))
    cuts = 1 - new[idx].mean(1) / old[idx].mean(1)
    lo, hi = np.percentile(cuts, [2.5, 97.5])
    return float(1 - new.mean() / old.mean()), float(lo), float(hi)


def fds(den: Denoiser, sched: Schedule, solver: str, seeds: list[int]) -> np.ndarray:
    return np.array([sample_quality(sample(den, sched, n=QUALITY_SAMPLES, shape=SHAPE, seed=s, solver=solver)).fd
                     for s in seeds])


def check(run: Path, n_traj: int, seeds: list[int]) -> dict[str, Any]:
    res = json.loads((run / "results.json").read_text())
    p1 = json.loads((run / "round_1" / "phase1.json").read_text())
    by_name = {c["name"]: c for c in p1["candidates"]}
    rnd = res["rounds"][0]
    pick = rnd["schedule"]
    winner = by_name[res["baselines"]["phase1"]["name"]]
    teacher = ModelSource(kind="digits").load()
    student = ModelSource(kind="digits").with_checkpoint(run / "round_1" / "model.safetensors").load()
    s_pick, s_win = Schedule.from_dict(pick), Schedule.from_dict(winner)
    # a round that trained its sigmas (phase2.schedule_lr) keeps Phase-1's pick beside them: the untouched model
    # is scored on what Phase-1 gave it, the student on what it was trained with
    s_pick_p1 = Schedule.from_dict({**pick, "sigmas": pick.get("phase1_sigmas", pick["sigmas"])})
    x, x0 = fresh_references(teacher, n_traj, s_pick.sigma_min, s_pick.sigma_max)
    e_win = errors(teacher, s_win, winner["solver"], x, x0)
    e_pick = errors(teacher, s_pick_p1, pick["solver"], x, x0)
    e_round = errors(student, s_pick, pick["solver"], x, x0)
    f_win = fds(teacher, s_win, winner["solver"], seeds)
    f_round = fds(student, s_pick, pick["solver"], seeds)
    f_teacher = fds(teacher, make_schedule("edm", ACCURATE_STEPS, s_pick.sigma_min, s_pick.sigma_max), "ipndm",
                    seeds)
    diff = f_round - f_win
    return {
        "run": run.name, "nfe": res["nfe"], "winner": winner["name"], "winner_solver": winner["solver"],
        "pick": pick["name"], "reported": {"winner": winner["test_error"], "pick": pick["test_error"],
                                           "round": rnd["test_error"]},
        "e_winner": float(e_win.mean()), "e_pick": float(e_pick.mean()), "e_round": float(e_round.mean()),
        "cut_vs_winner": cut_interval(e_round, e_win), "cut_vs_pick": cut_interval(e_round, e_pick),
        "fd_winner": (float(f_win.mean()), float(f_win.std(ddof=1))),
        "fd_round": (float(f_round.mean()), float(f_round.std(ddof=1))),
        "fd_diff": (float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff)))),
        "fd_teacher": (float(f_teacher.mean()), float(f_teacher.std(ddof=1))),
    }


def _cut(c: tuple[float, float, float]) -> str:
    return f"{100 * c[0]:.1f}% [{100 * c[1]:.1f}, {100 * c[2]:.1f}]"


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| run | N | Phase-1 winner (solver) | fresh E: winner / trained pick / round 1 | cut vs winner [95%] | "
            "cut vs pick [95%] | FD winner | FD round 1 | FD round 1 - winner (paired) | "
            "FD untouched, accurate solve |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| `{r['run']}` | {r['nfe']} | `{r['winner']}` ({r['winner_solver']}) | {r['e_winner']:.4f} / "
            f"{r['e_pick']:.4f} / {r['e_round']:.4f} | {_cut(r['cut_vs_winner'])} | {_cut(r['cut_vs_pick'])} | "
            f"{r['fd_winner'][0]:.2f} ± {r['fd_winner'][1]:.2f} | {r['fd_round'][0]:.2f} ± {r['fd_round'][1]:.2f} | "
            f"{r['fd_diff'][0]:+.2f} ± {r['fd_diff'][1]:.2f} | {r['fd_teacher'][0]:.2f} ± {r['fd_teacher'][1]:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="finished run folders (digits, at least one round)")
    ap.add_argument("--trajectories", type=int, default=512)
    ap.add_argument("--fd-seeds", type=int, default=5)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    seeds = [SEED_BASE + 1 + i for i in range(a.fd_seeds)]
    rows = []
    for run in a.runs:
        rows.append(check(run, a.trajectories, seeds))
        print(table(rows), file=sys.stderr)
    argv_text = " ".join(argv if argv is not None else sys.argv[1:])
    body = "\n".join([
        f"Made by `python benchmarks/fresh_check.py {argv_text}` on {platform.machine()}, {os.cpu_count()} CPUs. "
        f"E on {a.trajectories} fresh reference trajectories (not the run's bank); FD of {QUALITY_SAMPLES} samples "
        f"in each of {a.fd_seeds} fresh noise seeds (mean ± sd; the paired difference ± its standard error).",
        "", table(rows), ""])
    print(body)
    if not a.no_write:
        replace_block(ROOT / "docs" / "phase2.md", "fresh", body)
        if markers("fresh")[0] in (ROOT / "README.md").read_text():
            replace_block(ROOT / "README.md", "fresh", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
