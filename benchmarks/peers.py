"""Peers side by side: fewstep-search's own search against the published schedule optimizers, fairly.

Same model, same bank, same test trajectories, same NFE for every method; each method's row is the best of its
variants *picked on the select trajectories* (the solver included) and reported on the test trajectories that
no decision saw. Methods:

* hand-made: the best of DEFAULT_HEURISTICS x the search's solvers (ddim, dpmpp_2m, ipndm);
* B_0: the plain convex-combination bound, minimized exactly on the grid (DP);
* GITS, DM-NonUniform, AYS-style, LD3-style: docs/peers.md, each with its own default hyper-parameters, run to
  completion (never stopped early), with the solvers its paper uses;
* fewstep-search: the default search portfolio (its own optimizers; early stopping on, as users run it).

Digits also gets the FD of each pick (1000 samples, classifier features vs held-out digits) and, at
`--phase2-nfe`, one Phase-2 round (`--phase2-minutes`) on ours' and on the best peer's first-order pick.

Outputs: the generated block of docs/results.md (between `<!-- results:start -->` and
`<!-- results:end -->`), and docs/results_error.png, docs/results_schedules.png, docs/results_samples.png.
Per-(model, N) results are cached as JSON in `--cache` (atomic writes), so an interrupted run resumes.

    .venv/bin/python benchmarks/peers.py                                  # everything (about an hour, 2 cores)
    .venv/bin/python benchmarks/peers.py --models mixture --nfe 4 --no-write   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from _banks import MODELS, cached_bank
from _blocks import replace_block

from fewstep_search.atomic import atomic_path, atomic_write_json
from fewstep_search.bank import Bank
from fewstep_search.phase1.budget import auto_fit_trajectories
from fewstep_search.phase1.engine import InProcessExecutor, TieredExecutor, TrialContext, run_phase1
from fewstep_search.phase1.portfolio import trial_specs
from fewstep_search.phase1.trials import TrialRecord, TrialSpec, score_schedule
from fewstep_search.quality import sample, sample_quality_of
from fewstep_search.schedules import Schedule
from fewstep_search.study import PruningSpec, SearchSpec
from fewstep_search.study.phase2 import Phase2Spec

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("hand-made", "B_0", "GITS", "DM-NonUniform", "AYS-style", "LD3-style", "fewstep-search")
PEER_METHOD = {"gits": "GITS", "dm_nonuniform": "DM-NonUniform", "ays": "AYS-style", "ld3": "LD3-style",
               "b0_dp": "B_0"}
SAMPLES_NFE = 4
SCHEDULES_NFE = 6


def peer_specs() -> list[TrialSpec]:
    """Each peer with the solvers its paper uses (its own objective; `direct` only scores the result)."""
    def spec(opt: str, trial_solver: str = "ddim", **hyper: Any) -> TrialSpec:
        return TrialSpec(optimizer=opt, objective="direct", parameterization="logits", start="edm",
                         solver=trial_solver, hyper=hyper)
    return [
        spec("gits"), spec("gits", "ipndm"),
        spec("dm_nonuniform", "ipndm"),                                    # its native 3rd-order Lagrange form
        spec("dm_nonuniform", "dpmpp_2m", solver="dpmpp_2m"), spec("dm_nonuniform", "ddim", solver="ddim"),
        spec("ays"),
        spec("ld3"), spec("ld3", "ipndm"),
        spec("b0_dp"),
    ]


def method_of(record: TrialRecord) -> str:
    s = record.spec
    if s.is_baseline:
        return "hand-made"
    if s.optimizer in PEER_METHOD:
        return PEER_METHOD[s.optimizer]
    if s.objective == "b0":
        return "B_0"
    return "fewstep-search"


def best_per_method(records: Sequence[TrialRecord], *, first_order: bool = False) -> dict[str, TrialRecord]:
    """Per method, its complete trial with the lowest select E (optionally among first-order trials only)."""
    out: dict[str, TrialRecord] = {}
    for r in records:
        if r.state != "COMPLETE" or (first_order and r.spec.solver != "ddim"):
            continue
        m = method_of(r)
        if m not in out or r.select_error < out[m].select_error:
            out[m] = r
    return out


def _row(record: TrialRecord, seconds: float) -> dict[str, Any]:
    assert record.schedule is not None
    return {"label": record.spec.label, "solver": record.spec.solver, "select_error": record.select_error,
            "test_error": record.test_error, "seconds": seconds, "sigmas": record.schedule.sigmas.tolist()}


def phase1_rows(kind: str, bank: Bank, nfe: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(rows per method, first-order rows per method): Phase-1 of every method on one (model, N)."""
    source = MODELS[kind]["source"]
    ours = trial_specs(SearchSpec(), budget=nfe)
    peers = peer_specs()
    for s in peers:
        s.validate(budget=nfe)
    records: list[TrialRecord] = []
    search = SearchSpec()
    n_fit = auto_fit_trajectories(source.load(), bank.fit(), nfe, seconds_per_evaluation=search.seconds_per_evaluation)
    # ours as the CLI runs it (early stopping, the auto fit subset, the time budget per trial); the peers to
    # completion on the whole fit set, with their own budgets
    ours_context = TrialContext(nfe=nfe, fit_trajectories=n_fit, trial_seconds=search.trial_seconds or None)
    for specs, pruning, context in ((ours, search.pruning, ours_context),
                                    (peers, PruningSpec(enabled=False), TrialContext(nfe=nfe))):
        executor = TieredExecutor(costly=InProcessExecutor(pruning=pruning))
        records += run_phase1(specs, bank=bank, model=source, context=context, executor=executor).records
    seconds: dict[str, float] = {}
    for r in records:
        if r.state == "COMPLETE":
            seconds[method_of(r)] = seconds.get(method_of(r), 0.0) + r.seconds
    rows = {m: _row(r, seconds[m]) for m, r in best_per_method(records).items()}
    first = {m: _row(r, seconds[m]) for m, r in best_per_method(records, first_order=True).items()}
    return rows, first


def add_quality(den: Any, rows: dict[str, Any]) -> None:
    for row in rows.values():
        q = sample_quality_of(den, Schedule(row["sigmas"]), solver=row["solver"])
        if q is not None:
            row["fd"] = q["fd"]


def phase2_rows(kind: str, bank: Bank, nfe: int, first: dict[str, Any], minutes: float,
                folder: Path) -> dict[str, Any]:
    """One Phase-2 round on ours' first-order pick and on the best peer's (picked on select E)."""
    from fewstep_search.phase2 import fine_tune

    peers = {m: r for m, r in first.items() if m not in ("fewstep-search", "hand-made")}
    best_peer = min(peers, key=lambda m: peers[m]["select_error"])
    out: dict[str, Any] = {}
    source = MODELS[kind]["source"]
    for method in ("fewstep-search", best_peer):
        row = first[method]
        sched = Schedule(row["sigmas"], name=method)
        res = fine_tune(teacher=source, student=source, schedule=sched, bank=bank,
                        spec=Phase2Spec(max_minutes=minutes), out_dir=folder / f"phase2_{kind}_n{nfe}_{method}",
                        engine="local", progress=True)
        tuned = source.with_checkpoint(res.checkpoint).load()  # the student: the base model plus its weights
        scores = score_schedule(tuned, bank, sched, parts=("test",))
        q = sample_quality_of(tuned, sched)
        out[method] = {"schedule_test_error": row["test_error"], "test_error": scores["test_error"],
                       "fd": q["fd"] if q else None, "fd_before": row.get("fd"), "seconds": res.wall_seconds,
                       "steps": res.steps}
    return out


def measure(kind: str, nfe: int, cache: Path, phase2_nfe: Sequence[int], minutes: float) -> dict[str, Any]:
    path = cache / f"peers_{kind}_n{nfe}.json"
    if path.is_file():
        return json.loads(path.read_text())
    den = MODELS[kind]["source"].load()
    bank = cached_bank(kind, den, cache)
    t = time.perf_counter()
    rows, first = phase1_rows(kind, bank, nfe)
    add_quality(den, rows)
    add_quality(den, first)
    result: dict[str, Any] = {"model": kind, "nfe": nfe, "rows": rows, "first_order": first,
                              "phase1_seconds": time.perf_counter() - t}
    if kind == "digits" and nfe in phase2_nfe:
        result["phase2"] = phase2_rows(kind, bank, nfe, first, minutes, cache)
    atomic_write_json(path, result)
    print(f"[{kind} N={nfe}] " + ", ".join(f"{m} {r['test_error']:.4f}" for m, r in rows.items()), file=sys.stderr)
    return result


def _cell(row: dict[str, Any] | None, best: float) -> str:
    if row is None:
        return "-"
    e = row["test_error"]
    text = f"{e:.4f}"
    text = f"**{text}**" if e <= best else text
    fd = f", FD {row['fd']:.1f}" if "fd" in row else ""
    solver = "" if row["solver"] == "ddim" else f" {row['solver']}"
    return f"{text}{solver}{fd}"


def tables(results: Sequence[dict[str, Any]]) -> str:
    lines = ["| model | N | " + " | ".join(METHODS) + " |", "|---|---|" + "---|" * len(METHODS)]
    wins: list[str] = []
    for res in results:
        rows = res["rows"]
        best = min(r["test_error"] for r in rows.values())
        lines.append(f"| {res['model']} | {res['nfe']} | "
                     + " | ".join(_cell(rows.get(m), best) for m in METHODS) + " |")
        o = rows["fewstep-search"]
        for m in METHODS[:-1]:
            if m in rows and rows[m]["test_error"] < o["test_error"]:
                r = rows[m]
                on_select = ("higher" if r["select_error"] > o["select_error"] else "lower")
                wins.append(f"* {res['model']} N = {res['nfe']}: {m} `{r['label']}` has test E {r['test_error']:.4f} "
                            f"against {o['test_error']:.4f} for fewstep-search `{o['label']}`; on the select "
                            f"trajectories its E is {on_select} ({r['select_error']:.4f} against "
                            f"{o['select_error']:.4f})")
    times = ["| model | N | " + " | ".join(METHODS) + " |", "|---|---|" + "---|" * len(METHODS)]
    for res in results:
        times.append(f"| {res['model']} | {res['nfe']} | " + " | ".join(
            f"{res['rows'][m]['seconds']:.1f}" if m in res["rows"] else "-" for m in METHODS) + " |")
    p2 = ["| N | schedule from | test E, Phase-1 only | test E after one Phase-2 round | cut | FD before | FD after "
          "| training s |", "|---|---|---|---|---|---|---|---|"]
    for res in results:
        for m, r in res.get("phase2", {}).items():
            fd0, fd1 = r.get("fd_before"), r.get("fd")
            p2.append(f"| {res['nfe']} | {m} | {r['schedule_test_error']:.4f} | {r['test_error']:.4f} | "
                      f"{100 * (1 - r['test_error'] / r['schedule_test_error']):.0f}% | "
                      f"{'-' if fd0 is None else f'{fd0:.1f}'} | {'-' if fd1 is None else f'{fd1:.1f}'} | "
                      f"{r['seconds']:.0f} |")
    out = ["Test E (mean ||x0_hat - x0*|| on the test trajectories; lower is better; bold: lowest in the row). "
           "Each cell is the method's best variant picked on the select trajectories; a solver other than DDIM "
           "is named; digits cells add the FD of 1000 samples.", "", *lines, ""]
    out += (["Where a peer or a hand-made schedule has the lower test error:", "", *wins, ""] if wins else
            ["fewstep-search has the lowest test error in every row.", ""])
    out += ["Wall time of Phase-1 per method (seconds, summed over its trials, in process on this machine):", "",
            *times, ""]
    if len(p2) > 2:
        out += ["After one Phase-2 round (digits, first-order DDIM picks: ours and the best peer's, same training "
                "budget):", "", *p2, ""]
    return "\n".join(out)


def plots(results: Sequence[dict[str, Any]], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({r["model"] for r in results})
    written = []
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 3.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        res = sorted((r for r in results if r["model"] == kind), key=lambda r: r["nfe"])
        for m in METHODS:
            pts = [(r["nfe"], r["rows"][m]["test_error"]) for r in res if m in r["rows"]]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=m, lw=2.5 if m == "fewstep-search" else 1.2)
        ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel("test E")
        ax.set_title(kind)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("test error vs NFE (python benchmarks/peers.py)", fontsize=9)
    fig.tight_layout()
    written.append(_save(fig, folder / "results_error.png"))
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 3.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        res = next((r for r in results if r["model"] == kind and r["nfe"] == SCHEDULES_NFE), None)
        if res is None:
            continue
        for i, m in enumerate(m for m in METHODS if m in res["rows"]):
            sig = [s for s in res["rows"][m]["sigmas"] if s > 0]
            ax.plot(sig, [i] * len(sig), "|", ms=12, mew=2)
            ax.text(max(sig) * 1.3, i, m, va="center", fontsize=7)
        ax.set_xscale("log")
        ax.set_yticks([])
        ax.set_xlabel("sigma")
        ax.set_title(f"{kind}, N = {SCHEDULES_NFE}")
    fig.suptitle("schedules on a log-sigma axis (python benchmarks/peers.py)", fontsize=9)
    fig.tight_layout()
    written.append(_save(fig, folder / "results_schedules.png"))
    plt.close("all")
    return written


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def sample_grid(results: Sequence[dict[str, Any]], folder: Path) -> Path | None:
    from fewstep_search.data import DIGITS_SHAPE
    from fewstep_search.pictures import save_sample_grid

    res = next((r for r in results if r["model"] == "digits" and r["nfe"] == SAMPLES_NFE), None)
    if res is None:
        return None
    den = MODELS["digits"]["source"].load()
    rows = {f"{m} ({res['rows'][m]['test_error']:.3f})": sample(
        den, Schedule(res["rows"][m]["sigmas"]), n=12, shape=DIGITS_SHAPE, seed=0, solver=res["rows"][m]["solver"])
        for m in METHODS if m in res["rows"]}
    return save_sample_grid(folder / "results_samples.png", rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["mixture", "digits"], choices=list(MODELS))
    ap.add_argument("--nfe", nargs="+", type=int, default=[3, 4, 5, 6, 8, 10])
    ap.add_argument("--digits-nfe", nargs="+", type=int, default=None,
                    help="budgets for digits (default: --nfe): its trials take minutes, the mixture's seconds")
    ap.add_argument("--phase2-nfe", nargs="*", type=int, default=[4])
    ap.add_argument("--phase2-minutes", type=float, default=4.0, help="training budget of each Phase-2 round")
    ap.add_argument("--cache", type=Path, default=Path("runs/benchmark_banks"), help="banks and per-(model, N) results")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/ and README.md alone")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    args.cache.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    budgets = {k: (args.digits_nfe or args.nfe) if k == "digits" else args.nfe for k in args.models}
    results = [measure(k, n, args.cache, args.phase2_nfe, args.phase2_minutes)
               for k in args.models for n in budgets[k]]
    body = tables(results)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    cmd = "python benchmarks/peers.py " + " ".join(argv if argv is not None else sys.argv[1:])
    footer = (f"Made by `{cmd.strip()}` in {time.perf_counter() - t:.0f} s (cached parts not re-run) on "
              f"{platform.machine()}, {os.cpu_count()} CPUs, load average {load:.1f} at the end, torch "
              f"{torch.__version__}. Timings are wall time on this machine; compare ratios.")
    print(body + "\n" + footer)
    if args.no_write:
        return 0
    figs = [*plots(results, ROOT / "docs"), sample_grid(results, ROOT / "docs")]
    pics = "\n".join(f"![{p.stem}]({p.name})" for p in figs if p is not None)
    replace_block(ROOT / "docs" / "results.md", "results", f"{body}\n{pics}\n\n{footer}", create=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
