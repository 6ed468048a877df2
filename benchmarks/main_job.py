"""The README's "main job" tables, from a finished run folder: each phase's wall time and each pair's errors.

    make demo                                            # or: fewstep-search run --budget 10 --out runs/demo
    .venv/bin/python benchmarks/main_job.py runs/demo    # writes README.md between the main-job markers

Reads only the run's `results.json` (nothing is re-measured): `timings` (wall seconds per phase, as the run
recorded them), `baselines` (the untouched model with its best heuristic and with the Phase-1 winner) and
`rounds`. E test is on the bank's test trajectories, which decide nothing; the pair kept was picked on E keep (the
run's keep set; E select where the run had none).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from typing import Any

from _blocks import replace_block

ROOT = Path(__file__).resolve().parents[1]


def _fd(row: dict[str, Any]) -> str:
    return f"{row['fd']:.2f}" if row.get("fd") is not None else "-"


def _e(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def tables(res: dict[str, Any]) -> str:
    t = res["timings"]
    named = {k: v for k, v in t.items() if k != "total"}
    lines = ["| phase | wall time |", "|---|---|"]
    for key, sec in named.items():
        lines.append(f"| {key.replace('_', ' ')} | {sec:.0f} s |")
    rest = t["total"] - sum(named.values())
    lines += [f"| the rest (final FD of each pair, figures, Ray start and stop) | {rest:.0f} s |",
              f"| **total** | **{t['total']:.0f} s** |", ""]
    lines += [f"| pair (NFE = {res['nfe']}) | schedule (solver) | E select | E keep | E test | FD |",
              "|---|---|---|---|---|---|"]
    base = res["baselines"]
    rows = [("untouched model, best heuristic", base["best_heuristic"]),
            ("untouched model, Phase-1 winner", base["phase1"])]
    rows += [(f"round {r['round']}: fine-tuned ({len(r['phase2']['history'])} epochs, "
              f"{r['phase2']['history'][-1]['step'] if r['phase2']['history'] else 0} steps)",
              {**r["schedule"], **{k: r.get(k) for k in ("select_error", "keep_error", "test_error", "fd")}})
             for r in res["rounds"]]
    kept = res["best"]["round"]
    for i, (label, row) in enumerate(rows):
        is_kept = (kept == 0 and i == 1) or (kept == i - 1 and i >= 2)
        errors = " | ".join(_e(row.get(k)) for k in ("select_error", "keep_error", "test_error"))
        lines.append(f"| {label}{' (kept)' if is_kept else ''} | `{row['name']}` ({row.get('solver', 'ddim')}) | "
                     f"{errors} | {_fd(row)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--no-write", action="store_true", help="print only")
    a = ap.parse_args(argv)
    res = json.loads((a.run_dir / "results.json").read_text())
    body = (f"From `{a.run_dir}/results.json` by `python benchmarks/main_job.py {a.run_dir}` "
            f"({platform.machine()}, {os.cpu_count()} CPUs).\n\n{tables(res)}\n")
    print(body)
    if not a.no_write:
        replace_block(ROOT / "README.md", "main-job", body.rstrip("\n"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
