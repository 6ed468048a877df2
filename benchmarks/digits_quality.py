"""Sample quality of the built-in digits teacher: accurate reference sampler vs EDM rho=7 DDIM at few steps.

Prints a markdown table (Frechet distance in the metrics classifier's feature space against the held-out
digits, mean classifier confidence, and the error E = mean ||x0_hat - x0*|| against the reference from the
same noise), the real-data floor and the classifier's held-out accuracy; writes a sample grid PNG and a
markdown report.

    .venv/bin/python benchmarks/digits_quality.py --n 1500 --seed 0 \
        --png docs/digits_samples.png --md docs/digits_results.md

Everything is seeded; numbers are reproducible for the same torch build and thread count.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

from fewstep_search.atomic import atomic_write_json, atomic_write_text
from fewstep_search.data import DIGITS_SHAPE, digits_split
from fewstep_search.metrics import heldout_accuracy, real_data_floor, sample_quality
from fewstep_search.models.digits import EDMDenoiser, load_digits
from fewstep_search.pictures import save_sample_grid
from fewstep_search.schedules import karras, log_uniform
from fewstep_search.solvers import ddim, reference

DDIM_STEPS = (4, 6, 10)
REF_INTERVALS = 32
"""Reference grid: uniform in log sigma, RK4 with `--substeps` sub-steps per interval, then a final denoise
(one more network call from sigma_min into 0)."""


def _with_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


@torch.no_grad()
def _reference(model: EDMDenoiser, noise: Tensor, substeps: int) -> Tensor:
    sig = log_uniform(REF_INTERVALS, model.sigma_min, model.sigma_max).tensor()
    return reference(model, noise * model.sigma_max, _with_zero(sig), substeps=substeps)


@torch.no_grad()
def _ddim(model: EDMDenoiser, noise: Tensor, nfe: int) -> Tensor:
    sig = karras(nfe, model.sigma_min, model.sigma_max, rho=7.0).tensor()
    return ddim(model, noise * model.sigma_max, _with_zero(sig))


def _err(x: Tensor, ref: Tensor) -> float:
    return float((x - ref).flatten(1).norm(dim=1).mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1500, help="samples per sampler (default 1500 = size of train split)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--substeps", type=int, default=2, help="RK4 sub-steps per reference interval")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--png", type=Path, default=Path("docs/digits_samples.png"))
    p.add_argument("--md", type=Path, default=Path("docs/digits_results.md"))
    p.add_argument("--card", type=Path, default=None, help="also merge the metrics into this model card (JSON)")
    args = p.parse_args(argv)
    if args.n < 2:
        raise SystemExit("--n must be >= 2")
    torch.set_num_threads(args.threads)

    model = load_digits()
    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.randn((args.n, *DIGITS_SHAPE), generator=gen, dtype=torch.float64)

    t0 = time.perf_counter()
    ref = _reference(model, noise, args.substeps)
    t_ref = time.perf_counter() - t0
    # Convergence check of the reference itself: halve the step on a subset.
    sub = noise[: min(200, args.n)]
    ref_fine = _reference(model, sub, 2 * args.substeps)
    ref_check = _err(ref[: sub.shape[0]], ref_fine)
    ref_nfe = REF_INTERVALS * 4 * args.substeps + 1

    rows: list[tuple[str, int, dict[str, object], float | None]] = []
    q_ref = sample_quality(ref.float())
    rows.append(
        (
            f"reference (RK4 in log sigma, {REF_INTERVALS}x{args.substeps} steps)",
            ref_nfe,
            q_ref.to_dict(),
            None,
        )
    )
    samples = {}
    for nfe in DDIM_STEPS:
        x = _ddim(model, noise, nfe)
        samples[nfe] = x
        rows.append((f"DDIM, EDM rho=7, {nfe} steps", nfe, sample_quality(x.float()).to_dict(), _err(x, ref)))

    split = digits_split()
    floor = real_data_floor()
    floor_q = sample_quality(split.train_x)
    acc = heldout_accuracy()

    lines = [
        "| sampler | NFE | FD vs held-out (lower is better) | confidence | E = mean ‖x0 − x0*‖ |",
        "|---|---:|---:|---:|---:|",
        f"| real data floor: train split (1500) vs held-out (297) | – | {floor:.3f} | {floor_q.confidence:.4f} | – |",
    ]
    for name, nfe, q, e in rows:
        e_txt = "–" if e is None else f"{e:.3f}"
        lines.append(f"| {name} | {nfe} | {q['fd']:.3f} | {q['confidence']:.4f} | {e_txt} |")
    table = "\n".join(lines)
    notes = (
        f"N = {args.n} samples per sampler, seed {args.seed}, the same initial noise for every sampler. "
        f"Classifier held-out accuracy: {acc:.4f} (297 held-out digits). "
        f"Reference self-check (halved step, {sub.shape[0]} samples): mean ‖Δx0‖ = {ref_check:.2e}. "
        f"Reference sampling took {t_ref:.1f} s on this machine."
    )
    print(table)
    print()
    print(notes)

    grid = {"real (held-out)": split.heldout_x[:16], f"reference ({ref_nfe} NFE)": ref[:16].float()}
    for nfe in sorted(DDIM_STEPS, reverse=True):
        grid[f"DDIM rho=7, {nfe} NFE"] = samples[nfe][:16].float()
    save_sample_grid(args.png, grid)

    cmd = "python benchmarks/digits_quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = (
        "# Built-in digits model: sample quality\n\n"
        f"Command (from the repository root):\n\n```\n.venv/bin/{cmd.strip()}\n```\n\n"
        "FD: Frechet distance in the penultimate feature space of the project's digits classifier, "
        "against the 297 held-out real digits (`fewstep_search.metrics`). FD is biased upward at small N, "
        "so compare rows at equal N; the floor uses the 1,500 real training digits. Confidence: mean "
        "max-softmax probability. E: mean L2 distance to the reference sample from the same initial noise "
        "(the error the schedule search minimizes).\n\n"
        f"{table}\n\n{notes}\n\n"
        f"![samples]({args.png.name})\n"
    )
    atomic_write_text(args.md, md)
    if args.card is not None:
        card = json.loads(args.card.read_text())
        card.setdefault("metrics", {}).update(
            {
                "fd_reference_sampler": round(float(q_ref.fd), 4),
                "confidence_reference_sampler": round(float(q_ref.confidence), 4),
                **{f"fd_ddim_rho7_{n}": round(float(q["fd"]), 4) for _, n, q, e in rows[1:]},  # type: ignore[arg-type]
                "fd_real_data_floor": round(floor, 4),
                "quality_protocol": f"benchmarks/digits_quality.py --n {args.n} --seed {args.seed}",
            }
        )
        atomic_write_json(args.card, card)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
