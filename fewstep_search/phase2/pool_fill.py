"""The end-to-end term's teacher work, done before the student trains: the pool's size and its end points.

Why up front rather than as the batches reach each sample: the learning rate follows the round's progress
(`optim.Clock`), and with lazily solved end points the first pass over the pool is mostly teacher work (on the
digits model at N = 10, 40% of a round went to the teacher in its first ~80 optimizer steps), so the learning
rate had decayed to 40% of its peak before training really began. Solved first, the warm-up and the decay span
the training itself (`Clock.train_from`, recorded in the checkpoints' `state.json`).

Resumable: a one-worker round saves the solved end points and the clock to `pool_fill.safetensors` in the round
folder every `SAVE_EVERY` seconds, so a SIGKILL in the middle of the fill loses at most that much teacher work;
rank 0 writes `pool_fill.json` (`{"solved", "size"}`) after every chunk for the driver's progress line. Nothing
here imports Ray.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewstep_search.atomic import atomic_path, atomic_write_json
from fewstep_search.denoiser import bind_condition
from fewstep_search.phase2.optim import Clock
from fewstep_search.phase2.pool import SAVE_LIMIT_BYTES, NoisePool, auto_pool_size, untimed_pool_size
from fewstep_search.phase2.targets import IntervalTeacher
from fewstep_search.study.phase2 import Phase2Spec

__all__ = ["FILL_FILE", "FILL_PROGRESS", "SAVE_EVERY", "FILL_SLACK", "SavedFill", "timed_pool_size",
           "fill_deadline", "fill_end_points", "read_fill", "read_fill_progress"]

FILL_FILE = "pool_fill.safetensors"
FILL_PROGRESS = "pool_fill.json"
SAVE_EVERY = 30.0
"""Wall seconds between saves of the fill (what a SIGKILL mid-fill can cost)."""
FILL_SLACK = 1.5
"""The fill may run this many times its planned share of the budget (`teacher_share`) before it stops."""
TIMED_CALLS = 5
"""Teacher calls timed to size the pool (their median): one call's time on a 2-core machine was once 3.4x the
fill's actual rate (the pool then took 141 s of a planned 480), another time right on it."""


def timed_pool_size(spec: Phase2Spec, *, teacher: IntervalTeacher, shape: tuple[int, ...], batch: int,
                    dtype: torch.dtype, device: torch.device, n_conditions: int, clock: Clock, world: int,
                    agree: Callable[[float], float]) -> int:
    """One worker's pool: `pool_size` split across workers, or, for `"auto"` with the end-to-end term alone on a
    timed budget, what the teacher solves in `teacher_share` of it (`pool.auto_pool_size`), timed on batched
    teacher calls on the round's clock (the median of `TIMED_CALLS`) and agreed across workers (`agree`: the
    smallest).
    """
    if spec.pool_size is None:
        return 1  # fresh noise every step; the pool is unused
    if (fixed := untimed_pool_size(spec)) is not None:
        return max(1, fixed // world)
    g = torch.Generator().manual_seed(spec.seed * 7 + 1)
    x = (teacher.sigmas[0] * torch.randn(batch, *shape, generator=g, dtype=torch.float64)).to(device=device,
                                                                                                 dtype=dtype)
    sig = torch.full((batch,), teacher.sigmas[0], dtype=x.dtype, device=device)
    den: Callable[..., Tensor] = teacher.teacher
    if n_conditions:
        den = bind_condition(den, torch.zeros(batch, dtype=torch.long, device=device))
    with torch.no_grad():
        den(x, sig)  # warm-up (first-call allocations)
        times = []
        for _ in range(TIMED_CALLS):
            t0 = clock.seconds
            den(x, sig)
            times.append(clock.seconds - t0)
        per_call = max(statistics.median(times), 1e-6) / batch
    # cached per sample: the end point, and with the path term every node's state (N + 1 in all)
    states = len(teacher.sigmas) if spec.path_weight > 0 else 1
    calls = teacher.path_calls_per_sample() if spec.path_weight > 0 else teacher.end_calls_per_sample()
    size = auto_pool_size(budget_seconds=60.0 * spec.max_minutes, seconds_per_sample=per_call * calls,
                          share=spec.teacher_share, batch=batch, sample_bytes=states * x[0].numel() * x.element_size())
    return int(agree(float(size)))


def fill_deadline(spec: Phase2Spec, clock: Clock) -> float | None:
    """Round seconds at which the fill stops, whatever it has solved; None for rounds budgeted in steps.

    Why: the pool is sized from a few timed teacher calls at the start of the round; on a machine that gets busier
    afterwards (a laptop, a shared node) the fill can run past the whole budget and leave no time to train (a
    `make demo` beside another job reached its first step 265 s into a 240 s round: none taken). Stopping at
    `FILL_SLACK` times the planned share (at most 90% of the budget) keeps at least a tenth of it for training,
    on the samples solved by then.
    """
    if clock.max_steps is not None:
        return None
    return clock.budget * min(0.9, FILL_SLACK * spec.teacher_share)


@dataclass(frozen=True)
class SavedFill:
    """A fill interrupted by a kill: the pool size it was for, the round's clock then, the solved end points."""

    pool_size: int
    seconds: float
    wall_seconds: float
    cache: dict[str, Tensor]


def read_fill(root: Path, config_key: str) -> SavedFill | None:
    """The round folder's saved fill, or None (none, or one of another round's settings)."""
    path = Path(root) / FILL_FILE
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("config_key") != config_key:
            return None
        cache = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    return SavedFill(pool_size=int(meta["pool_size"]), seconds=float(meta["seconds"]),
                     wall_seconds=float(meta["wall_seconds"]), cache=cache)


def _save_fill(root: Path, pool: NoisePool, clock: Clock, config_key: str) -> None:
    from safetensors.torch import save_file

    meta = {"config_key": config_key, "pool_size": str(pool.size), "seconds": repr(clock.seconds),
            "wall_seconds": repr(clock.wall_seconds)}
    with atomic_path(Path(root) / FILL_FILE) as tmp:
        save_file(pool.cache_state(), str(tmp), metadata=meta)


def read_fill_progress(root: Path) -> dict[str, Any] | None:
    """`{"solved": k, "size": n}` of a fill in progress (rank 0's pool), or None."""
    import json

    path = Path(root) / FILL_PROGRESS
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def fill_end_points(pool: NoisePool, teacher: IntervalTeacher, *, clock: Clock, chunk: int, root: Path,
                    config_key: str, report: bool, save: bool, deadline: float | None = None) -> int:
    """Solve the end points of every pool sample not solved yet, `chunk` samples per batched teacher solve, in
    ascending order; returns how many samples are solved (a prefix of the pool).

    Stops early when the round's budget runs out or the clock passes `deadline` (`fill_deadline`). `report`:
    write `pool_fill.json` after each chunk; `save`: save the fill every `SAVE_EVERY` seconds (only while it is
    small: `pool.SAVE_LIMIT_BYTES`).
    """
    todo = pool.unsolved_end_points()
    last_save = time.monotonic()
    solved = pool.size - todo.numel()
    for lo in range(0, todo.numel(), chunk):
        if clock.done or (deadline is not None and clock.seconds >= deadline):
            break
        idx = todo[lo : lo + chunk]
        pool.end_points(teacher, idx)
        solved += idx.numel()
        if report:
            atomic_write_json(Path(root) / FILL_PROGRESS, {"solved": solved, "size": pool.size})
        if save and time.monotonic() - last_save > SAVE_EVERY and pool.cache_bytes() <= SAVE_LIMIT_BYTES:
            _save_fill(root, pool, clock, config_key)
            last_save = time.monotonic()
    return solved
