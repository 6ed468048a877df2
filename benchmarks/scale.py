"""Cost at scale: peak memory and wall time of the bank build, the Phase-1 search and one Phase-2 step, vs d and K.

Memory: the PSS (shared pages counted once, split among the processes that map them) summed over a process and
all its descendants (Ray's own processes and workers included), from /proc/<pid>/smaps_rollup, sampled every
0.1 s by a background thread. Each stage of a case runs in a fresh interpreter and reports the peak of its tree
from its start (imports and the bank it loads included): `build` (shards by 2 Ray workers, one torch thread
each, then `assemble_from_shards`), `search` (the library call `search_schedules(bank=...)` in process),
`search_tune` (`run_phase1` with `RayTuneExecutor(workers=2)`: the bank goes through Ray's object store once)
and `phase2_step` (one AdamW step of the student-state loss, batch 16, skipped when `fewstep_search.phase2` is
not importable). The bank's shards are kept in `--cache`, so the later stages (and a rerun) reuse them.

Model: `IsoMixture`, the exact denoiser of an isotropic Gaussian mixture (two skinny matmuls per call), so the
framework, not the model, sets the memory. Bank: float32, `project_dim` 256, `store_float16`,
`keep_states=False`, M = 256, 1 RK4 sub-step per cell, 1 probe. Search: the library portfolio (heuristics, B_w /
B_0 DP, DP -> Adam and Adam on the true error, `--refine-steps` steps) at N = 6.

`--speedup` times the sharded build with 1 and 2 Ray workers (one torch thread each) on `MLPDenoiser`, a fixed
random residual MLP (d = 64, width 512, 4 layers) whose evaluation dominates; Ray's start and the workers' first
import are excluded (a tiny warm-up build); the sizes alternate, `--repeats` times.

Results accumulate in `--out`/scale.json; every run rewrites the generated sections of docs/scale.md and the plot.

Usage:
    python benchmarks/scale.py --speedup                    # every case of CASES, and the speed-up
    python benchmarks/scale.py --cases 16384:1024           # the target only
    python benchmarks/scale.py --cases 4096:256 --stages build search --out /tmp/scale   # quick
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewstep_search.bank import BankPlan

os.environ.setdefault("RAY_worker_niceness", "0")
"""Ray starts its workers at nice 15; on a machine shared with other work that starves them against the
in-process driver and makes 1- vs 2-worker timings meaningless. Equal priority for a fair comparison."""

GIB = 2.0**30
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
GRID = 256
CASES = ((1024, 256), (4096, 256), (16384, 256), (4096, 1024), (16384, 1024))
"""(d, K) of the table; M = 256 throughout; the target is d = 16384, K = 1024."""
SHAPES = {16384: (4, 64, 64), 12288: (3, 64, 64), 4096: (4, 32, 32), 1024: (4, 16, 16)}
TARGET_GIB = 4.0


# ----------------------------------------------------------------------------------------- memory of a tree

def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def _label(pid: int, root: int) -> str:
    """A short name for a process of the tree: "driver", Ray's process title, or the program's name."""
    if pid == root:
        return "driver"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return "?"
    first = argv[0].decode(errors="replace")
    return first.split()[0] if first.startswith("ray::") else Path(first).name


def tree_pss(root: int, *, by_process: bool = False) -> int | dict[str, int]:
    """Bytes: PSS summed over `root` and all its descendants, or per process label (vanished processes: 0)."""
    kids, todo, parts = _children(), [root], {}
    while todo:
        pid = todo.pop()
        todo.extend(kids.get(pid, ()))
        try:
            with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
                pss = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("Pss:"))
        except (OSError, StopIteration, ValueError):
            continue
        key = f"{_label(pid, root)}[{pid}]" if by_process else ""
        parts[key] = parts.get(key, 0) + pss
    return parts if by_process else sum(parts.values())


class TreeMemory:
    """Samples the PSS of this process's tree in a background thread; `overall` is the peak, `at_peak` the
    per-process PSS at that moment (where the memory was); `stage(name)` times a block."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval, self.overall, self.at_peak = interval, 0, {}
        self.stages: dict[str, dict[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            parts = tree_pss(os.getpid(), by_process=True)
            assert isinstance(parts, dict)
            if sum(parts.values()) > self.overall:
                self.overall, self.at_peak = sum(parts.values()), parts
            self._stop.wait(self.interval)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.stages[name] = {"seconds": time.perf_counter() - t0}

    def close(self) -> dict[str, float]:
        """Stop sampling; returns the per-process MiB at the peak, largest first."""
        time.sleep(2 * self.interval)
        self._stop.set()
        self._thread.join()
        top = sorted(self.at_peak.items(), key=lambda kv: -kv[1])
        return {k: round(v / 2**20) for k, v in top}


# ----------------------------------------------------------------------------------------- synthetic models

class IsoMixture(nn.Module):
    """Exact denoiser of `x0 ~ (1/C) sum_c N(mu_c, s^2 I)`: `D = a x + (1 - a) sum_c p(c|x) mu_c`.

    `a = s^2 / (s^2 + sigma^2)`.
    With a shared isotropic variance the responsibilities need only x . mu_c (the ||x||^2 term cancels in the
    softmax): two [B, d] x [d, C] matmuls per call. `means` is a parameter (frozen unless a Phase-2 step trains it).
    """

    prediction_type = "x0"

    def __init__(self, shape: tuple[int, ...], *, components: int = 8, std: float = 0.1, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        d = math.prod(shape)
        self.shape, self.std, self.sigma_min, self.sigma_max = tuple(shape), std, SIGMA_MIN, SIGMA_MAX
        self.means = nn.Parameter(torch.rand(components, d, generator=g) * 1.4 - 0.7, requires_grad=False)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        mu = self.means.to(x.dtype)
        flat = x.reshape(x.shape[0], -1)
        tot = self.std**2 + sigma.to(x.dtype).reshape(-1, 1) ** 2
        resp = torch.softmax((flat @ mu.T - 0.5 * (mu * mu).sum(1)) / tot, dim=1)
        a = self.std**2 / tot
        return (a * flat + (1 - a) * (resp @ mu)).reshape(x.shape)


def iso_mixture(*, d: int = 16384, device: str = "cpu") -> IsoMixture:
    """Factory for study files (`benchmarks/commands.py`): the IsoMixture of a table's d, on `device`."""
    return IsoMixture(SHAPES[int(d)]).to(device)


class MLPDenoiser(nn.Module):
    """A fixed random residual MLP with EDM preconditioning: a model whose evaluation dominates the build."""

    sigma_min, sigma_max = SIGMA_MIN, SIGMA_MAX

    def __init__(self, dim: int = 64, width: int = 512, depth: int = 4, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp, self.out = nn.Linear(dim + 1, width), nn.Linear(width, dim)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(depth - 1))
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.to(x.dtype).reshape(-1, 1)
        c_in, c_skip = 1 / torch.sqrt(1 + s**2), 1 / (1 + s**2)
        h = torch.tanh(self.inp(torch.cat([x * c_in, torch.log(s) / 4], 1)))
        for layer in self.hidden:
            h = h + torch.tanh(layer(h))
        return c_skip * x + s * c_in * self.out(h)


# ----------------------------------------------------------------------------------------- one case

def case_plan(d: int, k: int, *, m: int = GRID, seed: int = 0) -> BankPlan:
    return BankPlan(shape=SHAPES.get(d, (d,)), sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, n_trajectories=k,
                    grid_size=m, substeps=1, probes=1, gain_substeps=1, seed=seed, dtype="float32",
                    project_dim=256, store_float16=True, keep_states=False, model_id=f"iso{d}")


def _search_specs(refine_steps: int) -> list[Any]:
    from fewstep_search.phase1.portfolio import library_specs

    return library_specs(refine_steps=refine_steps, lr=0.05)


def _phase2_step(den: IsoMixture, bank: Any, sigmas: torch.Tensor, batch: int) -> str:
    """One AdamW step of the student-state loss; returns "" or why it was skipped."""
    try:
        from fewstep_search.phase2.loss import step_weights, student_state_loss
        from fewstep_search.phase2.targets import IntervalTeacher
    except Exception as exc:  # the package is being written: report, do not fail the benchmark
        return f"skipped ({type(exc).__name__}: {exc})"
    import copy

    student = copy.deepcopy(den)
    student.means.requires_grad_(True)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    s = tuple(float(v) for v in sigmas)
    teacher = IntervalTeacher(den, s, max_log_step=0.25)
    loss = student_state_loss(student, teacher.target, bank.x_start[:batch], s, step_weights(bank, sigmas))
    loss.total.backward()
    opt.step()
    return ""


STAGES = ("build", "search", "search_tune", "phase2_step")


def _bank_mib(bank: Any) -> float:
    return sum(t.numel() * t.element_size() for t in (bank.x_start, bank.x_end, bank.denoised, bank.phi)) / 2**20


def run_stage(d: int, k: int, stage: str, *, cache: Path, workers: int, refine_steps: int, nfe: int,
              fresh: bool = False) -> dict[str, Any]:
    """One stage of one case in this process (and, for build and search_tune, its own Ray session).

    The bank lives as shards in `cache` (resumable; a later stage assembles it); each stage runs in a fresh
    process, so a stage's peak is the whole tree of that process from its start (imports and the bank included).
    """
    import shutil

    from fewstep_search.bank_shards import assemble_from_shards, build_shards
    from fewstep_search.models.source import ModelSource
    from fewstep_search.ray_runtime import ray_session

    torch.set_num_threads(1)
    plan, folder = case_plan(d, k), cache / f"d{d}_K{k}"
    den, shards, record = IsoMixture(plan.shape), folder / "shards", folder / f"{stage}.json"
    if record.exists() and not fresh:  # a stage measured before (e.g. a later stage after a failure)
        return {**json.loads(record.read_text()), "cached": True}
    if stage == "build":  # a measured build is a whole build (its shards are resumable, its timing would not be)
        shutil.rmtree(shards, ignore_errors=True)
    mem = TreeMemory()
    row: dict[str, Any] = {}
    if stage == "build":
        with mem.stage(stage), ray_session(workers=workers):
            build_shards(ModelSource.of(den), plan, shards, threads=1, batch_size=8)
            row["bank_mib"] = _bank_mib(assemble_from_shards(plan, shards))
    else:
        bank = assemble_from_shards(plan, shards)
        specs = _search_specs(refine_steps)
        if stage == "search":
            from fewstep_search.phase1.optimize import search_schedules

            with mem.stage(stage):
                _, results = search_schedules(den, nfe=nfe, shape=plan.shape, sigma_min=SIGMA_MIN,
                                              sigma_max=SIGMA_MAX, bank=bank, specs=specs, batch_size=64)
            win = results[nfe].winner
            row.update(winner=win.spec.label, winner_test_E=win.test_error,
                       winner_sigmas=[float(v) for v in win.schedule.sigmas])  # type: ignore[union-attr]
        elif stage == "search_tune":
            from fewstep_search.phase1.engine import TrialContext, run_phase1
            from fewstep_search.phase1.ray_tune import RayTuneExecutor

            with mem.stage(stage), ray_session(workers=workers):
                run_phase1(specs, bank=bank, model=ModelSource.of(den), context=TrialContext(nfe=nfe, batch_size=64),
                           executor=RayTuneExecutor(workers=workers, storage_path=folder / "tune", name="scale"))
        elif stage == "phase2_step":
            from fewstep_search.schedules import make_schedule

            found = folder / "search.json"
            sig = (torch.tensor(json.loads(found.read_text())["winner_sigmas"]) if found.exists()
                   else make_schedule("edm", nfe, SIGMA_MIN, SIGMA_MAX).tensor())
            with mem.stage(stage):
                row["phase2"] = _phase2_step(den, bank, sig.double(), batch=16)
        else:
            raise ValueError(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")
    row[f"{stage}_at_peak_mib"] = mem.close()
    row.update({f"{stage}_s": mem.stages[stage]["seconds"], f"{stage}_gib": mem.overall / GIB})
    from fewstep_search.atomic import atomic_write_json

    atomic_write_json(record, row)
    return row


def run_case(d: int, k: int, *, stages: tuple[str, ...], timeout: float, extra: list[str]) -> dict[str, Any]:
    """Every stage of one case, each in a fresh interpreter; one table row."""
    plan = case_plan(d, k)
    row: dict[str, Any] = {"d": d, "K": k, "M": plan.grid_size, "r": plan.stored_dim,
                           "raw_outputs_gib": k * plan.grid_size * d * 4 / GIB}
    for stage in stages:
        got = _child(["--one", f"{d}:{k}", "--stage", stage, *extra], timeout)
        if "error" in got:
            row[f"{stage}_error"] = got["error"]
            if stage == "build":
                break
        row.update({key: v for key, v in got.items() if key != "error"})
    gibs = [v for key, v in row.items() if key.endswith("_gib") and key != "raw_outputs_gib"]
    row["peak_gib"] = max(gibs) if gibs else math.nan
    return row


# ----------------------------------------------------------------------------------------- speed-up

def _timed_build(workers: int, plan: BankPlan, model: nn.Module) -> float:
    from fewstep_search.bank_shards import build_shards
    from fewstep_search.ray_runtime import ray_session

    with ray_session(workers=workers), tempfile.TemporaryDirectory(prefix="fewstep_speedup_") as tmp:
        warm = dataclasses.replace(plan, n_trajectories=3 * workers, grid_size=4)
        build_shards(model, warm, Path(tmp) / "warm", shard_size=3, threads=1)  # workers imported and warm
        t0 = time.perf_counter()
        size = max(1, plan.n_trajectories // 8)  # 4 shards per worker at 2 workers; one chunk per shard
        build_shards(model, plan, Path(tmp) / "shards", threads=1, shard_size=size, batch_size=size)
        return time.perf_counter() - t0


def run_speedup(repeats: int, k: int) -> dict[str, Any]:
    """Wall time of the same sharded build with 1 and 2 workers (alternating), and the in-process build."""
    from fewstep_search.bank import build_bank

    torch.set_num_threads(1)
    model = MLPDenoiser()
    plan = BankPlan(shape=(64,), sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, n_trajectories=k, grid_size=64,
                    substeps=1, probes=1, dtype="float32", keep_states=False, model_id="mlp64")
    t0 = time.perf_counter()
    build_bank(model, shape=(64,), sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, n_trajectories=k, grid_size=64,
               substeps=1, probes=1, dtype="float32", keep_states=False, batch_size=max(1, k // 8))
    single = time.perf_counter() - t0
    times: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(repeats):
        for w in (1, 2):
            times[w].append(_timed_build(w, plan, model))
    best = {w: min(v) for w, v in times.items()}
    return {"K": k, "M": 64, "in_process_s": single, "times": times, "best": best,
            "speedup_best": best[1] / best[2],
            "speedup_median": sorted(times[1])[repeats // 2] / sorted(times[2])[repeats // 2],
            "load_avg": os.getloadavg()}


# ----------------------------------------------------------------------------------------- cost model

MODELS = {"ImageNet-64 EDM (ADM, d = 12288)": 9e-3, "SD-class latent UNet (4x64x64), CFG": 14e-3}
"""Seconds per sample evaluation (forward) on one A100-class GPU; docs/scale.md says where they come from."""
VJP_COST = 3.0
"""A vector-Jacobian evaluation (forward + backward) in forward equivalents."""


def model_evaluations(*, k: int, m: int, nfe: int = 6, adam_steps: int = 150, p2_steps: int = 1000,
                      p2_batch: int = 32) -> dict[str, float]:
    """Forward-equivalent sample evaluations of each phase (bank: 1 RK4 sub-step, 1 probe, 1 gain sub-step).

    bank: per trajectory 4 (M - 1) + 1 forward calls down the grid and 4 (M - 1) VJP calls for the gains;
    search: the library portfolio (4 heuristics, 2 DPs, DP -> Adam, Adam), each trial scored on all K at N
    calls, the two Adam trials `adam_steps` forward + backward passes over the K / 2 fit trajectories (no
    pruning: an upper bound); Phase-2: `p2_steps` steps of `p2_batch` samples, each N student calls forward +
    backward and the RK4 teacher over the EDM rho = 7 schedule with sub-steps <= 0.25 in log sigma.
    """
    from fewstep_search.schedules import make_schedule

    bank = k * ((4 * (m - 1) + 1) + VJP_COST * 4 * (m - 1))
    search = 8 * k * nfe + 2 * adam_steps * (k // 2) * nfe * VJP_COST
    s = make_schedule("edm", nfe, SIGMA_MIN, SIGMA_MAX).sigmas
    teacher = sum(4 * math.ceil(math.log(s[i] / s[i + 1]) / 0.25) for i in range(nfe))
    return {"bank": bank, "search": search, "phase2": p2_steps * p2_batch * (teacher + VJP_COST * nfe),
            "teacher_calls_per_sample": teacher}


COST_CONFIGS = ((1024, 256, 150), (256, 128, 150), (128, 64, 50))
"""(K, M, Adam steps) of the predicted-cost table: the scale target, a GPU default, a lean LD3-sized run."""


def cost_text() -> str:
    """The predicted cost table (no measurement: evaluations x seconds per evaluation)."""
    out = ["| model | K, M, Adam steps | bank evals | search evals | Phase-1 GPU-h | Phase-1 wall h, 8 GPUs "
           "| Phase-2 evals | Phase-2 GPU-h | Phase-2 wall h, 8 GPUs |", "|---|---|---|---|---|---|---|---|---|"]
    for name, sec in MODELS.items():
        for k, m, steps in COST_CONFIGS:
            e = model_evaluations(k=k, m=m, adam_steps=steps)
            h = {key: e[key] * sec / 3600 for key in ("bank", "search", "phase2")}
            # 8 GPUs: shards split the bank 8 ways; the search's two costly trials run side by side (2x);
            # Phase-2 is data parallel (8x at the same global batch).
            out.append(f"| {name} | {k}, {m}, {steps} | {e['bank'] / 1e6:.2f} M | {e['search'] / 1e6:.2f} M | "
                       f"{h['bank'] + h['search']:.2f} | {h['bank'] / 8 + h['search'] / 2:.2f} | "
                       f"{e['phase2'] / 1e6:.2f} M | {h['phase2']:.1f} | {h['phase2'] / 8:.2f} |")
    e = model_evaluations(k=1024, m=256)
    out.append(f"\nTeacher calls per Phase-2 sample at N = 6 (EDM rho = 7 nodes, sub-steps <= 0.25): "
               f"{e['teacher_calls_per_sample']:.0f}; Phase-2 = 1000 steps at batch 32.")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------- the report

def _child(args: list[str], timeout: float) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; its last stdout line is the JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def _fmt(row: dict[str, Any], key: str, spec: str = ".1f") -> str:
    v = row.get(key)
    return "-" if v is None else format(v, spec)


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| d | K | M | raw K x M x d f32 (GiB) | stored bank (MiB) | build, 2 workers (s) | build peak (GiB) "
            "| search (s) | search peak (GiB) | Tune search, 2 workers (s) | Tune peak (GiB) | Phase-2 step (s) "
            "| Phase-2 peak (GiB) | peak of all stages (GiB) |")
    out, notes = [head, "|" + "---|" * (head.count("|") - 1)], []
    for r in rows:
        cells = [str(r["d"]), str(r["K"]), str(r["M"]), f"{r['raw_outputs_gib']:.2f}", _fmt(r, "bank_mib", ".0f")]
        for stage in STAGES:
            cells += [_fmt(r, f"{stage}_s"), _fmt(r, f"{stage}_gib", ".2f")]
            if f"{stage}_error" in r:
                notes.append(f"d = {r['d']}, K = {r['K']}, {stage}: {r[f'{stage}_error']}")
        if r.get("phase2"):
            notes.append(f"d = {r['d']}, K = {r['K']}, Phase-2 step: {r['phase2']}")
        out.append("| " + " | ".join(cells) + f" | **{r['peak_gib']:.2f}** |")
    return "\n".join(out + [""] + [f"* {n}" for n in notes])


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for k in sorted({r["K"] for r in rows}):
        sel = sorted((r for r in rows if r["K"] == k and "error" not in r), key=lambda r: r["d"])
        ds = [r["d"] for r in sel]
        for stage, style in (("build", "-o"), ("search", "--s"), ("search_tune", ":^")):
            if all(f"{stage}_gib" in r for r in sel):
                axes[0].plot(ds, [r[f"{stage}_gib"] for r in sel], style, label=f"{stage}, K={k}")
                axes[1].plot(ds, [r[f"{stage}_s"] for r in sel], style, label=f"{stage}, K={k}")
    axes[0].axhline(TARGET_GIB, color="k", lw=0.8)
    axes[0].set(xscale="log", xlabel="d", ylabel="peak PSS of the process tree (GiB)", title="memory (M = 256)")
    axes[1].set(xscale="log", yscale="log", xlabel="d", ylabel="wall time (s)", title="time (2 workers)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_doc(doc: Path, body: str, *, section: str = "measured") -> None:
    """Replace one generated section of `doc` (between its markers), keeping the hand-written rest."""
    from fewstep_search.atomic import atomic_write_text

    start, end = f"<!-- scale.py: {section} -->", f"<!-- scale.py: end {section} -->"
    text = doc.read_text() if doc.exists() else "# Cost at scale\n"
    if start not in text or end not in text:
        text += f"\n{start}\n{end}\n"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    atomic_write_text(doc, f"{head}{start}\n{body}\n{end}{tail}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="*", default=[f"{d}:{k}" for d, k in CASES], help="d:K pairs (none: skip)")
    ap.add_argument("--stages", nargs="*", default=list(STAGES), choices=STAGES)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--refine-steps", type=int, default=20)
    ap.add_argument("--nfe", type=int, default=6)
    ap.add_argument("--speedup", action="store_true", help="also time the 1- vs 2-worker build")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--speedup-k", type=int, default=128)
    ap.add_argument("--fresh", action="store_true", help="rebuild banks even where a measured build is cached")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "fewstep_scale_cache")
    ap.add_argument("--timeout", type=float, default=5400.0, help="seconds per stage")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--one-speedup", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        d, k = (int(v) for v in a.one.split(":"))
        print(json.dumps(run_stage(d, k, a.stage, cache=a.cache, workers=a.workers, refine_steps=a.refine_steps,
                                   nfe=a.nfe, fresh=a.fresh)))
        return 0
    if a.one_speedup:
        print(json.dumps(run_speedup(a.repeats, a.speedup_k)))
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    write_doc(a.out / "scale.md", cost_text(), section="cost model")
    store = a.out / "scale.json"
    data = json.loads(store.read_text()) if store.exists() else {"rows": [], "speedup": None, "commands": []}
    extra = ["--workers", str(a.workers), "--refine-steps", str(a.refine_steps), "--nfe", str(a.nfe),
             "--cache", str(a.cache), *(["--fresh"] if a.fresh else [])]
    for case in a.cases:
        d, k = (int(v) for v in case.split(":"))
        t0 = time.perf_counter()
        row = run_case(d, k, stages=tuple(a.stages), timeout=a.timeout, extra=extra)
        print(f"d={d} K={k}: {time.perf_counter() - t0:.0f} s  {json.dumps(row)}", flush=True)
        data["rows"] = [r for r in data["rows"] if (r["d"], r["K"]) != (d, k)] + [row]
    if a.speedup:
        data["speedup"] = _child(["--one-speedup", "--repeats", str(a.repeats), "--speedup-k", str(a.speedup_k)],
                                 a.timeout)
        print(f"speed-up: {json.dumps(data['speedup'])}", flush=True)
    cmd = " ".join(["python benchmarks/scale.py", *(argv if argv is not None else sys.argv[1:])])
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    data["commands"] = [c for c in data["commands"] if c["cmd"] != cmd] + [{"cmd": cmd, "load": load}]
    from fewstep_search.atomic import atomic_write_json

    atomic_write_json(store, data)
    rows = sorted(data["rows"], key=lambda r: (r["K"], r["d"]))
    plot(rows, a.out / "scale.png")
    body = [table(rows)]
    if data["speedup"]:
        body.append(speedup_text(data["speedup"]))
    body.append(f"\nMade on {os.cpu_count()} cores shared with other work (load average at the end of each "
                "command given), by:\n")
    body += [f"    {c['cmd']}    # load {c['load']}" for c in data["commands"]]
    write_doc(a.out / "scale.md", "\n".join(body))
    return 0


def speedup_text(sp: dict[str, Any]) -> str:
    if "error" in sp:
        return f"\nSharded build speed-up: not measured ({sp['error']})."
    t1, t2 = sp["times"]["1"], sp["times"]["2"]
    return (f"\nSharded build, `MLPDenoiser` (d = 64, K = {sp['K']}, M = {sp['M']}), one torch thread per worker, "
            f"{len(t1)} alternating repeats: 1 worker {', '.join(f'{v:.1f}' for v in t1)} s; 2 workers "
            f"{', '.join(f'{v:.1f}' for v in t2)} s; **speed-up {sp['speedup_best']:.2f}x** (best of each), "
            f"{sp['speedup_median']:.2f}x (medians); the in-process `build_bank` took {sp['in_process_s']:.1f} s.")


if __name__ == "__main__":
    sys.exit(main())
