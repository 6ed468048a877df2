"""Phase-2 on the built-in digits model: test error and sample quality before and after one fine-tuning round.

For each budget N and each variant of the Phase-2 settings, one round of `fine_tune` on a fixed schedule, then
a markdown table: test E (mean ||x0_hat - x0*|| on the bank's test trajectories) before / after, the cut, the
cut per minute of training, the Frechet distance (FD, classifier features vs held-out digits) of DDIM samples
from fresh noise before / after, and the FD of the untouched model with 10 steps of EDM's schedule.

    .venv/bin/python benchmarks/phase2.py --nfe 4 10 --minutes 20
    .venv/bin/python benchmarks/phase2.py --nfe 4 --minutes 2 \
        --variant plain:pool_size=null,cache_first_target=false,target_reuse=1 --variant default:

A variant is `name:key=value,key=value` (Phase2Spec fields; values are JSON, e.g. null, true, 0.5); `--set`
applies to every variant. `--run DIR` trains on a run folder's bank and one of its round-1 Phase-1 candidates
(`--candidate NAME`; default: the best on select E that Phase-2 trains), with that candidate's solver, which is
what the main job's round trains:

    .venv/bin/fewstep-search run --budget 10 --rounds 0 --out runs/p1n10
    .venv/bin/python benchmarks/phase2.py --run runs/p1n10 --minutes 10 --set clock=cpu --threads 1 \
        --variant lr4e-5:lr=4e-5,lr_final=1e-5 --variant lr2e-5:lr=2e-5,lr_final=5e-6

The bank is cached in `--out`. Times are wall time on whatever the machine is doing (report the cut per minute,
and say if the machine was shared).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewstep_search.atomic import atomic_write_json, atomic_write_text
from fewstep_search.bank import Bank, build_bank, load_bank
from fewstep_search.dp import dp_optimal
from fewstep_search.metrics import sample_quality
from fewstep_search.models.digits import load_digits
from fewstep_search.models.source import ModelSource, load_checkpoint_into
from fewstep_search.objectives import grid_cost_matrix, true_error
from fewstep_search.phase2 import fine_tune
from fewstep_search.schedules import Schedule, make_schedule
from fewstep_search.solvers import get_solver, sampling_sigmas
from fewstep_search.study.phase2 import Phase2Spec

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def _parse_pairs(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _bank(out: Path, k: int, m: int) -> Bank:
    path = out / f"bank_digits_k{k}_m{m}.safetensors"
    if path.is_file():
        return load_bank(path, expect={"model_id": "digits"})
    bank = build_bank(load_digits(), shape=(1, 8, 8), sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, n_trajectories=k,
                      grid_size=m, dtype=torch.float32, model_id="digits", progress=True)
    bank.save(path)
    return bank


def _candidate(run: Path, name: str | None) -> tuple[Schedule, str]:
    """(schedule, solver) of a Phase-1 candidate of `run`'s round 1: `name`, or the best on select E among the
    candidates whose solver Phase-2 trains."""
    from fewstep_search.phase2.steps import PHASE2_SOLVERS

    cands = json.loads((run / "round_1" / "phase1.json").read_text())["candidates"]
    pool = [c for c in cands if c["name"] == name] if name else [c for c in cands if c["solver"] in PHASE2_SOLVERS]
    if not pool:
        raise SystemExit(f"{run}: no candidate {name!r} in round_1/phase1.json")
    best = min(pool, key=lambda c: c["select_error"])
    return Schedule(best["sigmas"], name=best["name"]), best["solver"]


def _schedule(kind: str, nfe: int, bank: Bank) -> Schedule:
    if kind == "dp":
        idx, _ = dp_optimal(grid_cost_matrix(bank.fit(), "bw"), nfe)
        return Schedule(bank.grid[torch.as_tensor(idx)].numpy(), name="bw_dp")
    return make_schedule(kind, nfe, SIGMA_MIN, SIGMA_MAX)


@torch.no_grad()
def _fd(den: Any, sigmas: Tensor, n: int, seed: int, solver: str = "ddim") -> float:
    g = torch.Generator().manual_seed(seed)
    x = SIGMA_MAX * torch.randn(n, 1, 8, 8, generator=g)
    solve = get_solver(solver)
    out = torch.cat([solve(den, x[i : i + 500], sampling_sigmas(sigmas.float())) for i in range(0, n, 500)])
    return sample_quality(out).fd


@torch.no_grad()
def _test_e(den: Any, bank: Bank, sigmas: Tensor, solver: str = "ddim") -> float:
    return float(true_error(den, bank.test(), sigmas, solver=solver, batch_size=256))


@torch.no_grad()
def target_accuracy(nfe_list: list[int], schedule: str, bank: Bank, *, n: int = 32, seed: int = 0) -> str:
    """Markdown table: the teacher target's error relative to the student's residual, per interval and solver.

    States are the untouched model's own DDIM states from fresh noise (what a round starts from); the reference
    is plain RK4 with sub-steps of 1/48 in log sigma. The residual is `(1 - r) ||D - D_bar||` (the step error
    the loss removes); a target error much smaller than it does not limit training.
    """
    from fewstep_search.phase2.targets import calls_for, solve_interval

    den = load_digits()
    lines = ["| N | interval | residual | " + " | ".join(
        f"{solver} {h:g} (calls)" for solver in ("rk4", "rk4_exp") for h in (1.0, 0.5, 0.25)) + " |",
        "|" + "---|" * 9]
    for nfe in nfe_list:
        sig = _schedule(schedule, nfe, bank).sigmas
        x = SIGMA_MAX * torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
        for i in range(nfe):
            s0, s1 = float(sig[i]), float(sig[i + 1])
            d = den(x, torch.full((n,), s0))
            r = s1 / s0
            ref = solve_interval(den, x, s0, s1, max_log_step=1 / 48)
            resid = float(((1 - r) * d - (ref - r * x)).flatten(1).norm(dim=1).mean())
            cells = []
            for solver in ("rk4", "rk4_exp"):
                for h in (1.0, 0.5, 0.25):
                    y = solve_interval(den, x, s0, s1, max_log_step=h, solver=solver)  # type: ignore[arg-type]
                    err = float((y - ref).flatten(1).norm(dim=1).mean())
                    cells.append(f"{100 * err / resid:.1f}% ({calls_for(s0, s1, max_log_step=h)})")
            lines.append(f"| {nfe} | {s0:.3g} -> {s1:.3g} | {resid:.3f} | " + " | ".join(cells) + " |")
            print(lines[-1], file=sys.stderr)
            x = r * x + (1 - r) * d
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nfe", type=int, nargs="+", default=[4, 10])
    p.add_argument("--minutes", type=float, default=20.0, help="training budget of each round")
    p.add_argument("--schedule", default="vp_time_quadratic", help="a heuristic family name, or 'dp' (B_w-DP)")
    p.add_argument("--solver", default="ddim", help="the sampler trained for and scored with (ddim, euler, ipndm)")
    p.add_argument("--variant", action="append", default=None, help="name:key=value,... (Phase2Spec overrides)")
    p.add_argument("--set", default="", help="key=value,... applied to every variant")
    p.add_argument("--engine", choices=("local", "ray"), default="local")
    p.add_argument("--samples", type=int, default=2000, help="samples per FD")
    p.add_argument("--trajectories", type=int, default=128)
    p.add_argument("--grid", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("/tmp/fewstep_phase2_bench"))
    p.add_argument("--md", type=Path, default=None, help="also write the table here")
    p.add_argument("--run", type=Path, default=None, help="a run folder: its bank and a Phase-1 candidate")
    p.add_argument("--candidate", default=None, help="with --run: the candidate's name")
    p.add_argument("--targets", action="store_true", help="only the teacher-target accuracy table")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.targets:
        print(target_accuracy(a.nfe, a.schedule, _bank(a.out, a.trajectories, a.grid)))
        return 0
    variants = [v.partition(":") for v in (a.variant or ["default:"])]
    common = _parse_pairs(a.set)
    den = load_digits()
    t0 = time.monotonic()
    bank = _bank(a.out, a.trajectories, a.grid) if a.run is None else load_bank(a.run / "bank.safetensors")
    if a.run is not None:
        run_sched, a.solver = _candidate(a.run, a.candidate)
        a.nfe = [run_sched.nfe]
    print(f"bank: K={bank.n_trajectories} M={bank.grid.numel()} {bank.sizes()} ({time.monotonic() - t0:.0f} s)",
          file=sys.stderr)
    edm10 = make_schedule("edm", 10, SIGMA_MIN, SIGMA_MAX).tensor()
    fd_edm10 = _fd(den, edm10, a.samples, a.seed + 1)
    rows = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for nfe in a.nfe:
        sched = _schedule(a.schedule, nfe, bank) if a.run is None else run_sched
        sig = sched.tensor()
        e0, fd0 = _test_e(den, bank, sig, a.solver), _fd(den, sig, a.samples, a.seed + 1, a.solver)
        for name, _, pairs in variants:
            spec = Phase2Spec(**{"max_minutes": a.minutes, "seed": a.seed, **common, **_parse_pairs(pairs)})
            out_dir = a.out / f"{stamp}_n{nfe}_{name or 'default'}"
            res = fine_tune(
                teacher=ModelSource(kind="digits"), student=ModelSource(kind="digits"),
                schedule=dataclasses.replace(sched, solver=a.solver), bank=bank, spec=spec, out_dir=out_dir,
                engine=a.engine,
                on_epoch=lambda m, nfe=nfe, name=name: print(
                    f"  N={nfe} {name} epoch {m['epoch']} step {m['step']} {m['seconds']:.0f}s loss {m['loss']:.4f} "
                    f"select {m['select_error']:.4f} test {m['test_error']:.4f} [{m['mode']}]", file=sys.stderr),
            )
            tuned = copy.deepcopy(den)
            load_checkpoint_into(tuned, res.checkpoint)
            # a round that trained the sigmas too (phase2.schedule_lr) is scored with them: the pair it returns
            own = sig if res.sigmas is None else torch.tensor(res.sigmas, dtype=sig.dtype)
            e1, fd1 = _test_e(tuned, bank, own, a.solver), _fd(tuned, own, a.samples, a.seed + 1, a.solver)
            minutes = res.seconds / 60.0
            cut = 1.0 - e1 / e0
            rows.append({
                "nfe": nfe, "schedule": sched.name, "solver": a.solver, "variant": name or "default",
                "minutes": minutes,
                "wall_minutes": res.wall_seconds / 60.0, "clock": spec.clock,
                "steps": res.steps, "teacher_calls": res.teacher_calls, "test_e_before": e0, "test_e_after": e1,
                "select_e_before": (res.initial or {}).get("select_error", float("nan")),
                "select_e_after": (res.final or {}).get("select_error", float("nan")),
                "cut": cut, "cut_per_min": cut / minutes if minutes > 0 else float("nan"), "fd_before": fd0,
                "fd_after": fd1, "fd_edm10_untouched": fd_edm10, "stopped": res.stopped_reason,
                "spec": spec.model_dump(), "history": res.history, "trained_sigmas": res.sigmas,
            })
            print(f"N={nfe} {name}: E {e0:.4f} -> {e1:.4f} ({100 * cut:.1f}%), FD {fd0:.2f} -> {fd1:.2f}",
                  file=sys.stderr)
            atomic_write_json(a.out / f"{stamp}_results.json", rows)
    header = ("| N | schedule (solver) | variant | minutes (clock) | wall min | steps | teacher calls | "
              "select E before / after | test E before | test E after | cut | cut / min | FD before | FD after | "
              "FD untouched, EDM 10 steps |")
    lines = [header, "|" + "---|" * 15]
    for r in rows:
        lines.append(
            f"| {r['nfe']} | {r['schedule']} ({r['solver']}) | {r['variant']} | {r['minutes']:.1f} ({r['clock']}) | "
            f"{r['wall_minutes']:.1f} | {r['steps']} | "
            f"{r['teacher_calls'] / 1e6:.2f} M | {r['select_e_before']:.4f} / {r['select_e_after']:.4f} | "
            f"{r['test_e_before']:.4f} | {r['test_e_after']:.4f} | "
            f"{100 * r['cut']:.1f}% | {100 * r['cut_per_min']:.1f}% | {r['fd_before']:.2f} | {r['fd_after']:.2f} | "
            f"{r['fd_edm10_untouched']:.2f} |"
        )
    table = "\n".join(lines)
    cmd = "    .venv/bin/python benchmarks/phase2.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(table)
    if a.md is not None:
        atomic_write_text(a.md, f"{cmd}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
