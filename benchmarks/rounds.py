"""The main job with a 20-minute Phase-2 round: what one round buys over Phase-1 alone, at each budget N.

Runs `fewstep-search run --budget N --rounds 1` (the CLI, Ray Tune and Ray Train as a user runs it) on the
built-in digits model for each N, with the Phase-2 round given `--minutes` of CPU time per torch thread
(`phase2.clock = "cpu"`: the budget a 2-core machine spends in that many idle minutes, whatever else runs), and
writes one table from the runs' `results.json`: the untouched model's Phase-1 winner (any solver) and its
first-order pick (what Phase-2 trains), the round's test E and FD, the cut against each, the cut per minute of
training, and the FD of the untouched model with 10 steps of EDM's schedule. Every number is on the test
trajectories; no decision looked at them.

    .venv/bin/python benchmarks/rounds.py --nfe 4 10 --minutes 20 --tag e2e8k --set per_step_weight=0 \
        --set end_to_end_weight=1 --set 'train_for="winner"' --set pool_size=8192   # ~50 min on 2 cores
    .venv/bin/python benchmarks/rounds.py --nfe 4 10 --minutes 20 --tag per-step --set per_step_weight=1 \
        --set end_to_end_weight=0 --set 'train_for="first_order"'        # the per-step loss (the old default)

The runs live in `--out` (rerunning resumes them); the table goes to docs/phase2.md between
`<!-- rounds:start -->` and `<!-- rounds:end -->` (`<!-- rounds-TAG:start -->` ... with `--tag TAG`), and to
README.md where it has that block, unless `--no-write`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _blocks import markers, replace_block
from fresh_check import ACCURATE_STEPS

from fewstep_search.atomic import atomic_write_text
from fewstep_search.models.source import ModelSource
from fewstep_search.quality import sample_quality_of
from fewstep_search.schedules import make_schedule

ROOT = Path(__file__).resolve().parents[1]
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def study_text(minutes: float, extra: dict[str, str] | None = None) -> str:
    """The default digits study, with the round's budget and the `--set` keys of its `[phase2]` table changed.

    `extra` values are TOML literals as given (`per_step_weight=0`, `train_for='"winner"'`), parsed by the CLI's
    study loader, which refuses unknown keys.
    """
    lines = [f"max_minutes = {minutes}", 'clock = "cpu"', *(f"{k} = {v}" for k, v in (extra or {}).items())]
    return '[model]\nkind = "digits"\n\n[phase2]\n' + "\n".join(lines) + "\n"


def run_job(nfe: int, minutes: float, out: Path, extra: dict[str, str] | None = None,
            tag: str = "") -> tuple[dict[str, Any], float]:
    """(results.json, wall seconds of this invocation) of the main job at budget `nfe`; resumes a finished run."""
    out.mkdir(parents=True, exist_ok=True)
    study = out / f"study_{minutes:g}min{tag}.toml"
    atomic_write_text(study, study_text(minutes, extra))
    run_dir = out / f"n{nfe}_{minutes:g}min{tag}"
    cmd = [sys.executable, "-m", "fewstep_search.cli", "run", "--out", str(run_dir), "--quiet"]
    if (run_dir / "config.json").is_file():
        cmd.append("--resume")  # the run's own recorded config
    else:
        cmd += ["--budget", str(nfe), "--rounds", "1", "--study", str(study)]
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    return json.loads((run_dir / "results.json").read_text()), time.perf_counter() - t


def row(nfe: int, res: dict[str, Any], edm10_fd: float, teacher_fd: float) -> dict[str, Any]:
    rnd = res["rounds"][0]
    p1, pick, p2 = res["baselines"]["phase1"], rnd["schedule"], rnd["phase2"]
    hist = p2["history"]
    minutes = hist[-1]["seconds"] / 60.0
    return {
        "nfe": nfe, "phase1": p1["name"], "phase1_test": p1["test_error"], "phase1_fd": p1.get("fd"),
        "pick": pick["name"], "pick_solver": pick.get("solver", "ddim"), "pick_test": pick["test_error"],
        "round_test": rnd["test_error"], "round_fd": rnd.get("fd"),
        "minutes": minutes, "wall_minutes": hist[-1]["wall_seconds"] / 60.0, "steps": hist[-1]["step"],
        "cut_pick": 1 - rnd["test_error"] / pick["test_error"],
        "cut_phase1": 1 - rnd["test_error"] / p1["test_error"],
        "edm10_fd": edm10_fd, "teacher_fd": teacher_fd, "best": res["best"]["round"],
        "stopped": rnd.get("stopped_reason"), "pool": hist[-1].get("pool_size"),
        "teacher_steps": (p2.get("initial") or {}).get("teacher_steps"),
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| N | Phase-1 winner, untouched model | its test E / FD | trained pick (solver) | its test E | "
            "round 1 test E / FD | cut vs pick | cut vs Phase-1 winner | cut vs Phase-1 winner per min | training "
            "min (CPU / wall) | steps | pool (end-point steps) | FD untouched, EDM 10 steps | FD untouched, accurate "
            "solve | pair kept |")
    lines = [head, "|" + "---|" * 15]
    for r in rows:
        kept = "round 1" if r["best"] == 1 else "Phase-1 (untouched)"
        lines.append(
            f"| {r['nfe']} | `{r['phase1']}` | {r['phase1_test']:.4f} / {r['phase1_fd']:.2f} | `{r['pick']}` "
            f"({r['pick_solver']}) | {r['pick_test']:.4f} | {r['round_test']:.4f} / {r['round_fd']:.2f} | "
            f"{100 * r['cut_pick']:.1f}% | {100 * r['cut_phase1']:.1f}% | "
            f"{100 * r['cut_phase1'] / r['minutes']:.2f}% | "
            f"{r['minutes']:.1f} / {r['wall_minutes']:.1f} | {r['steps']} | {r['pool'] or '-'} "
            f"({r['teacher_steps'] or 'fixed'}) | {r['edm10_fd']:.2f} | "
            f"{r['teacher_fd']:.2f} | {kept} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nfe", nargs="+", type=int, default=[4, 10])
    ap.add_argument("--minutes", type=float, default=20.0, help="Phase-2 budget (CPU minutes per torch thread)")
    ap.add_argument("--out", type=Path, default=Path("runs/benchmark_rounds"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=TOML",
                    help="a [phase2] key for every run, e.g. per_step_weight=0 (repeatable)")
    ap.add_argument("--tag", default="", help="suffix of the run folders (runs with other --set keys)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave README.md and docs/ alone")
    a = ap.parse_args(argv)
    extra = dict(item.split("=", 1) for item in a.set)
    digits = ModelSource(kind="digits").load()
    edm10 = sample_quality_of(digits, make_schedule("edm", 10, SIGMA_MIN, SIGMA_MAX))
    # the floor a student that matches its teacher exactly tends to: an accurate solve of the untouched model
    accurate = sample_quality_of(digits, make_schedule("edm", ACCURATE_STEPS, SIGMA_MIN, SIGMA_MAX), solver="ipndm")
    assert edm10 is not None and accurate is not None
    rows, walls = [], {}
    for nfe in a.nfe:
        res, walls[nfe] = run_job(nfe, a.minutes, a.out, extra, f"_{a.tag}" if a.tag else "")
        rows.append(row(nfe, res, edm10["fd"], accurate["fd"]))
        print(table(rows), file=sys.stderr)
    argv_text = " ".join(argv if argv is not None else sys.argv[1:])
    body = "\n".join([
        f"Made by `python benchmarks/rounds.py {argv_text}` on {platform.machine()}, {os.cpu_count()} CPUs "
        f"(`fewstep-search run --budget N --rounds 1` with `phase2.max_minutes = {a.minutes:g}`, "
        "`phase2.clock = \"cpu\"`" + "".join(f", `phase2.{k} = {v}`" for k, v in extra.items())
        + "). Test E on the test trajectories; FD of 1000 samples from the same noise; the accurate solve is "
        f"iPNDM on a {ACCURATE_STEPS}-step Karras grid.",
        "", table(rows), ""])
    print(body)
    if not a.no_write:
        name = f"rounds-{a.tag}" if a.tag else "rounds"
        replace_block(ROOT / "docs" / "phase2.md", name, body)
        readme = ROOT / "README.md"
        if markers(name)[0] in readme.read_text():  # the README shows today's defaults; docs keep every tag
            replace_block(readme, name, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
