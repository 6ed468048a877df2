"""Fine-tuned digits students on one schedule, scored on fresh trajectories and on their own training pool.

Why: a round reports E on the bank's 64 test trajectories, too few to see the tail of the error distribution,
and never says how far its held-out error is from what it reaches on the noise it trained on. This script
scores the untouched model and each given student (a `model.safetensors` from a round or from
`benchmarks/phase2.py`) with one schedule (a student whose round trained the sigmas too, `phase2.schedule_lr`,
with those) on `--trajectories` fresh reference trajectories (solved like the
bank, `fresh_check.fresh_references`), and prints mean, median, 90th / 99th percentile, the count above 1, the
count the student makes worse than the untouched model by more than 0.5, and the cut of the mean against the
untouched model with a 95% paired bootstrap interval. With `--pool CHECKPOINT_DIR` (an epoch checkpoint of a
one-worker round trained with `seed = 0`) it also scores the round's own noise pool against the teacher's end
points cached there: the training set's error beside the held-out one.

    .venv/bin/python benchmarks/heldout.py --run runs/benchmark_rounds/n10_20min_k192-norm \
        --candidate 'lbfgsb:direct:logits<-best[ipndm]' --trajectories 1024 \
        base=/tmp/p2/base/model.safetensors t100=/tmp/p2/t100/model.safetensors

`--cache FILE` keeps the fresh references (seeded, so the same on every run) for the next call.

Prints a markdown table; writes nothing but the `--cache` file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from fresh_check import cut_interval, errors, fresh_references
from safetensors.torch import load_file, save_file

from fewstep_search.atomic import atomic_path
from fewstep_search.models.source import ModelSource
from fewstep_search.phase2.pool import NoisePool
from fewstep_search.phase2.result import FineTuneResult
from fewstep_search.schedules import Schedule


def _schedule(run: Path, candidate: str | None) -> tuple[Schedule, str]:
    """A Phase-1 candidate of the run's first round (default: the round's trained schedule) and its solver."""
    if candidate is None:
        d = json.loads((run / "round_1" / "schedule.json").read_text())
    else:
        cands = json.loads((run / "round_1" / "phase1.json").read_text())["candidates"]
        by_name = {c["name"]: c for c in cands}
        if candidate not in by_name:
            raise SystemExit(f"no candidate {candidate!r} in {run}; known: {', '.join(sorted(by_name))}")
        d = by_name[candidate]
    return Schedule.from_dict(d), d["solver"]


def trained_sigmas(model: Path) -> list[float] | None:
    """The sigmas a student was trained with when its round trained them (`phase2.schedule_lr`), else None.

    Read beside the weights: a round's `metrics.json` (the loop) or a Phase-2 folder's `result.json`. Why: such
    a student is a pair with its own sigmas; scoring it on the Phase-1 schedule would score half of it."""
    metrics, result = model.parent / "metrics.json", model.parent / "result.json"
    if metrics.is_file():
        sched = json.loads(metrics.read_text()).get("schedule", {})
        return sched["sigmas"] if sched.get("trained_sigmas") else None
    if result.is_file():
        sigmas = FineTuneResult.from_dict(json.loads(result.read_text()), result.parent).sigmas
        return None if sigmas is None else list(sigmas)
    return None


def _references(teacher: object, count: int, sched: Schedule, cache: Path | None,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The fresh (noise, reference end point) pairs, read from `cache` when it holds `count` of them for these
    sigma bounds. Why: the accurate solves are most of a run of this script, and they are seeded, so scoring
    more students against the same trajectories need not solve them again."""
    key = torch.tensor([float(count), sched.sigma_min, sched.sigma_max, *([float(seed)] if seed else [])],
                       dtype=torch.float64)  # seed 0's key as before the option: its caches stay valid
    if cache is not None and cache.is_file():
        held = load_file(str(cache))
        if held["key"].shape == key.shape and torch.equal(held["key"], key):
            return held["x"], held["x0"]
    x, x0 = fresh_references(teacher, count, sched.sigma_min, sched.sigma_max, seed=seed)
    if cache is not None:  # atomically: a kill mid-write must not leave a cache the next run cannot read
        with atomic_path(cache) as tmp:
            save_file({"key": key, "x": x.contiguous(), "x0": x0.contiguous()}, str(tmp))
    return x, x0


def _row(name: str, e: np.ndarray, base: np.ndarray | None) -> str:
    q50, q90, q99 = np.percentile(e, [50, 90, 99])
    if base is None:
        cut, worse = "", ""
    else:
        c = cut_interval(e, base)
        cut = f"{100 * c[0]:.1f}% [{100 * c[1]:.1f}, {100 * c[2]:.1f}]"
        worse = str(int((e - base > 0.5).sum()))
    return (f"| {name} | {e.mean():.4f} | {q50:.3f} | {q90:.3f} | {q99:.3f} | {int((e > 1).sum())} | {worse} | "
            f"{cut} |")


def pool_errors(teacher: object, den: object, ckpt: Path, sched: Schedule,
                solver: str) -> tuple[np.ndarray, np.ndarray]:
    """(untouched, student) E on the pool of a checkpoint (rank 0, seed 0) against its cached end points."""
    cache = load_file(str(ckpt / "pool.safetensors"))
    end, has = cache["end"], cache["has_end"].bool()
    pool = NoisePool(end.shape[0], tuple(end.shape[1:]), sched.sigma_max, seed=0, device="cpu", dtype=end.dtype)
    x, x0 = pool.x[has], end[has]
    return errors(teacher, sched, solver, x, x0), errors(den, sched, solver, x, x0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+", help="NAME=PATH of a student's model.safetensors")
    ap.add_argument("--run", type=Path, required=True, help="the run folder whose Phase-1 schedule is scored")
    ap.add_argument("--candidate", default=None, help="a Phase-1 candidate's name (default: the trained one)")
    ap.add_argument("--trajectories", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0, help="which fresh set: report on a seed other than the one "
                    "a setting was picked on")
    ap.add_argument("--cache", type=Path, default=None,
                    help="a .safetensors file for the fresh references: read when it holds as many, else written")
    ap.add_argument("--pool", type=Path, action="append", default=[],
                    help="NAME=CHECKPOINT_DIR: also score that model on its round's own pool")
    a = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    sched, solver = _schedule(a.run, a.candidate)
    teacher = ModelSource(kind="digits").load()
    x, x0 = _references(teacher, a.trajectories, sched, a.cache, a.seed)
    head = ("| model | mean E | median | p90 | p99 | E > 1 | worse by > 0.5 | cut of the mean vs untouched [95%] |\n"
            "|---|---|---|---|---|---|---|---|")
    base = errors(teacher, sched, solver, x, x0)
    lines = [head, _row("untouched", base, None)]
    students = {}
    for item in a.models:
        name, _, path = item.partition("=")
        students[name] = ModelSource(kind="digits").with_checkpoint(path).load()
        own = trained_sigmas(Path(path))
        label = name if own is None else f"{name} (its trained sigmas)"
        lines.append(_row(label, errors(students[name], sched if own is None else Schedule(own), solver, x, x0),
                          base))
        print("\n".join(lines), file=sys.stderr)
    for item in a.pool:
        name, _, ckpt = str(item).partition("=")
        if name not in students:
            raise SystemExit(f"--pool {name}=...: no model named {name!r} among {', '.join(students)}")
        u, s = pool_errors(teacher, students[name], Path(ckpt), sched, solver)
        lines += [_row(f"untouched, {name}'s pool ({len(u)})", u, None), _row(f"{name} on its own pool", s, u)]
    print(f"`{sched.name}` ({solver}), {a.trajectories} fresh trajectories (`benchmarks/heldout.py "
          f"{' '.join(argv if argv is not None else sys.argv[1:])}`):\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
