"""A bank built as shards by Ray workers: one GPU (or one CPU process) per shard, resumable, the same bank.

Why shards: the reference solve is the expensive part of Phase-1 (thousands of model calls per trajectory), and
every trajectory is independent (its start noise and probes are drawn from generators seeded by (seed, stream,
index), `fewstep_search.bank.build`), so trajectories lo..hi-1 solved anywhere are exactly the rows lo..hi-1 of
the single-process `build_bank` (to float round-off of the worker's thread count).

On disk a build is one folder of safetensors files `shard-<lo>-<hi>.safetensors`, each written atomically
(`fewstep_search.atomic.atomic_path`) with the plan's metadata and its (lo, hi). So:

* a killed build restarts from its finished shards (`build_shards` skips them; half-written temp files of the
  killed run are removed);
* a shard whose metadata does not match the plan (another model, seed, grid, ...) is refused with one line
  naming it (`ShardMismatchError`), never silently mixed in;
* a worker that dies (OOM, SIGKILL, a lost node) is retried by Ray (`max_retries`) and its shard rebuilt;
  an exception raised by the model is not retried (it would fail again) and reaches the caller;
* `assemble_from_shards` fills one preallocated bank shard by shard (peak: the bank plus one shard, never
  every shard twice), and can leave the full-size trajectory states on disk (`states=False`), where
  `ShardedStates` reads the rows a caller asks for (memory-mapped, without loading the rest).

Ray lives here and in `ray_runtime` only; `fewstep_search.bank` stays plain math. The model reaches the workers
as a `ModelSource` (a registry spec each worker loads and caches, or a picklable denoiser object put in Ray's
object store once).

Example:
    >>> plan = BankPlan(shape=(8,), sigma_min=0.002, sigma_max=80.0, n_trajectories=64, keep_states=False)
    >>> build_shards(ModelSource.of(builtin_mixture(dim=8)), plan, "bank_shards", workers=2)  # doctest: +SKIP
    >>> bank = assemble_from_shards(plan, "bank_shards")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewstep_search.atomic import atomic_path
from fewstep_search.bank import Bank, BankMismatchError, BankPlan
from fewstep_search.bank.build import BankAssembler, ChunkResult, solve_chunk
from fewstep_search.bank.container import check_meta
from fewstep_search.bank.memory import default_chunk
from fewstep_search.denoiser import CheckedDenoiser, Denoiser
from fewstep_search.models.source import ModelSource
from fewstep_search.progress import task_progress

__all__ = [
    "SHARD_FORMAT_VERSION",
    "ShardMismatchError",
    "ShardedStates",
    "assemble_from_shards",
    "build_bank_sharded",
    "build_shards",
    "finished_shards",
    "read_shard",
    "shard_path",
    "shard_ranges",
    "solve_shard",
    "write_shard",
]

SHARD_FORMAT_VERSION = 1
_META_KEY = "fewstep_bank_shard"
_GLOB = "shard-*.safetensors"
_TENSORS = ("x_end", "denoised", "phi", "states")


class ShardMismatchError(BankMismatchError):
    """A shard in the folder was built for another plan (or another range): refused, named in one line."""


def shard_ranges(n_trajectories: int, shard_size: int) -> list[tuple[int, int]]:
    """[(lo, hi)] covering 0..K-1 in shards of `shard_size` (the last one shorter)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [(lo, min(n_trajectories, lo + shard_size)) for lo in range(0, n_trajectories, shard_size)]


def default_shard_size(plan: BankPlan, workers: int) -> int:
    """About four shards per worker (load balance; a killed build loses at most one shard per worker),
    never more than 64 trajectories (a shard is also the unit a retry rebuilds)."""
    return max(1, min(64, math.ceil(plan.n_trajectories / (4 * max(1, workers)))))


def shard_path(folder: str | Path, lo: int, hi: int) -> Path:
    return Path(folder) / f"shard-{lo:07d}-{hi:07d}.safetensors"


def _shard_meta(plan: BankPlan, lo: int, hi: int) -> dict[str, Any]:
    return {**plan.meta(), "keep_states": plan.keep_states, "lo": lo, "hi": hi,
            "format_version": SHARD_FORMAT_VERSION}


def write_shard(plan: BankPlan, chunk: ChunkResult, folder: str | Path) -> Path:
    """Write one solved shard atomically (a crash never leaves a half shard under a finished name)."""
    from safetensors.torch import save_file

    tensors = {name: getattr(chunk, name).contiguous() for name in _TENSORS if getattr(chunk, name) is not None}
    path = shard_path(folder, chunk.lo, chunk.hi)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(_shard_meta(plan, chunk.lo, chunk.hi))})
    return path


def _read_meta(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise ShardMismatchError(f"bank shard {path} could not be read as safetensors: {exc}") from None
    if _META_KEY not in raw:
        raise ShardMismatchError(f"{path} is not a fewstep-search bank shard (no '{_META_KEY}' metadata)")
    return json.loads(raw[_META_KEY])


def _check_shard(path: Path, plan: BankPlan, *, need_states: bool) -> tuple[int, int]:
    """(lo, hi) of a shard that belongs to `plan`; ShardMismatchError (one line naming it) otherwise."""
    meta = _read_meta(path)
    if meta.get("format_version") != SHARD_FORMAT_VERSION:
        raise ShardMismatchError(f"bank shard {path} has format {meta.get('format_version')}, this version "
                                 f"reads {SHARD_FORMAT_VERSION}")
    try:
        check_meta(meta, plan.meta(), source=f"shard {path}")
    except BankMismatchError as exc:
        raise ShardMismatchError(str(exc)) from None
    lo, hi = int(meta["lo"]), int(meta["hi"])
    if not 0 <= lo < hi <= plan.n_trajectories or path.name != shard_path(path.parent, lo, hi).name:
        raise ShardMismatchError(f"bank shard {path} claims trajectories {lo}..{hi}, which its name or the "
                                 f"plan (K={plan.n_trajectories}) does not allow")
    if need_states and not meta.get("keep_states"):
        raise ShardMismatchError(f"bank shard {path} was built without states, but the plan keeps them")
    return lo, hi


def finished_shards(plan: BankPlan, folder: str | Path, *, need_states: bool | None = None) -> list[
        tuple[int, int, Path]]:
    """The folder's finished shards [(lo, hi, path)] sorted by lo, each checked against `plan`.

    Raises `ShardMismatchError` for a shard of another plan, or for two shards that overlap.
    """
    need = plan.keep_states if need_states is None else need_states
    found = sorted((*_check_shard(p, plan, need_states=need), p) for p in Path(folder).glob(_GLOB))
    for (_, hi_a, a), (lo_b, _, b) in zip(found, found[1:], strict=False):
        if lo_b < hi_a:
            raise ShardMismatchError(f"bank shards {a.name} and {b.name} overlap; remove one of them")
    return found


def _missing(plan: BankPlan, done: Sequence[tuple[int, int, Path]], shard_size: int) -> list[tuple[int, int]]:
    """The ranges no finished shard covers, cut into shards of at most `shard_size`."""
    todo: list[tuple[int, int]] = []
    expect = 0
    for lo, hi in [(lo, hi) for lo, hi, _ in done] + [(plan.n_trajectories, plan.n_trajectories)]:
        if lo > expect:
            todo += [(expect + a, expect + b) for a, b in shard_ranges(lo - expect, shard_size)]
        expect = max(expect, hi)
    return todo


def read_shard(path: str | Path, plan: BankPlan, *, states: bool = True) -> ChunkResult:
    """One shard as a `ChunkResult` (checked against `plan`); `states=False` leaves its states on disk."""
    from safetensors import safe_open

    path = Path(path)
    lo, hi = _check_shard(path, plan, need_states=states and plan.keep_states)
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())  # noqa: SIM118 (safe_open is not a dict)
        got = {n: f.get_tensor(n) for n in _TENSORS if n in names and (states or n != "states")}
    return ChunkResult(lo, hi, got["x_end"], got["denoised"], got["phi"], got.get("states"))


@functools.lru_cache(maxsize=2)
def _projection(plan: BankPlan) -> Tensor | None:
    """The plan's projection, drawn once per worker process (a d x r draw per shard would add up)."""
    return plan.projection()


def solve_shard(model: ModelSource, plan: BankPlan, lo: int, hi: int, folder: str, *, device: str = "cpu",
                threads: int | None = 1, batch_size: int | None = None) -> str:
    """Solve trajectories lo..hi-1 in chunks of `batch_size` and write them as one shard; returns its path.

    Plain Python (what a Ray task runs; tests call it directly). `threads`: torch's intra-op threads in this
    process (one per worker by default, so N workers on N cores do not oversubscribe them).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    den: Denoiser = model.on(device).load()
    if model.denoiser is not None and isinstance(den, torch.nn.Module):
        den = den.to(device)
    den = den if isinstance(den, CheckedDenoiser) else CheckedDenoiser(den)
    chunk = batch_size or default_chunk(plan)
    parts = [solve_chunk(den, plan, a, min(hi, a + chunk), device=device, projection=_projection(plan))
             for a in range(lo, hi, chunk)]
    merged = ChunkResult(lo, hi, torch.cat([p.x_end for p in parts]), torch.cat([p.denoised for p in parts]),
                         torch.cat([p.phi for p in parts]),
                         torch.cat([p.states for p in parts]) if plan.keep_states else None)  # type: ignore[misc]
    return str(write_shard(plan, merged, folder))


def _remove_stale_temps(folder: Path) -> None:
    """Temp files of a killed build (atomic writes that never finished): one build owns its folder."""
    for tmp in folder.glob(".shard-*.tmp"):
        tmp.unlink(missing_ok=True)


def _get(ray: Any, ref: Any, span: tuple[int, int], max_retries: int) -> None:
    """The result of one shard's task, its failure as a one-line error naming the shard."""
    try:
        ray.get(ref)
    except ray.exceptions.RayTaskError as exc:  # the model (or the shard's write) raised: not retried
        cause = exc.cause if isinstance(exc.cause, Exception) else RuntimeError(str(exc).splitlines()[0])
        msg = f"bank shard {span[0]}..{span[1]}: {str(cause).splitlines()[0] if str(cause) else type(cause).__name__}"
        try:
            err = type(cause)(msg)
        except Exception:  # an exception type whose constructor takes other arguments
            err = RuntimeError(msg)
        raise err from None
    except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as exc:
        raise RuntimeError(f"bank shard {span[0]}..{span[1]}: its worker died {max_retries + 1} times "
                           f"({type(exc).__name__}); finished shards are kept, run again to resume") from None


def build_shards(
    model: ModelSource | Denoiser,
    plan: BankPlan,
    folder: str | Path,
    *,
    workers: int | None = None,
    address: str | None = None,
    shard_size: int | None = None,
    device: str = "cpu",
    threads: int = 1,
    batch_size: int | None = None,
    max_retries: int = 3,
    progress: bool = False,
) -> list[Path]:
    """Solve the plan's missing shards as Ray tasks (one GPU each on cuda) and return every shard's path.

    Args:
        model: a `ModelSource` (or a picklable denoiser, wrapped by `ModelSource.of`).
        workers: CPUs of a local Ray started here (default: all); ignored inside a running Ray or with `address`.
        shard_size: trajectories per shard (default `default_shard_size`); finished shards of another size
            are reused as they are.
        device: where each shard is solved; "cuda" reserves `num_gpus=1` per task.
        threads: torch threads (and Ray CPUs) per task.
        batch_size: trajectories per chunk inside a shard (memory; default `default_chunk`).
        max_retries: how often Ray reruns a shard whose worker died.
    """
    from fewstep_search.ray_runtime import ray_session

    if threads < 1 or max_retries < 0:
        raise ValueError(f"need threads >= 1 and max_retries >= 0, got {threads}, {max_retries}")
    source = model if isinstance(model, ModelSource) else ModelSource.of(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(folder)
    done = finished_shards(plan, folder)
    with ray_session(workers=workers, address=address):
        import ray

        size = shard_size or default_shard_size(plan, int(ray.cluster_resources().get("CPU", 1)) // threads)
        todo = _missing(plan, done, size)
        if todo:
            gpus = 1 if device.startswith("cuda") else 0
            task = ray.remote(num_cpus=threads, num_gpus=gpus, max_retries=max_retries)(solve_shard)
            ref = ray.put(source)
            pending = {task.remote(ref, plan, lo, hi, str(folder), device=device, threads=threads,
                                   batch_size=batch_size): (lo, hi) for lo, hi in todo}
            with task_progress("building bank shards", total=len(pending), enabled=progress) as tick:
                try:
                    while pending:
                        ready, _ = ray.wait(list(pending), num_returns=1)
                        _get(ray, ready[0], pending.pop(ready[0]), max_retries)
                        tick()
                finally:
                    for left in pending:  # after a failure: stop the rest (finished shards stay on disk)
                        ray.cancel(left)
    return [p for _, _, p in finished_shards(plan, folder)]


def assemble_from_shards(plan: BankPlan, folder: str | Path, *, states: bool | None = None) -> Bank:
    """The bank of a finished shard folder, filled shard by shard (peak: the bank plus one shard).

    `states=False` (default: the plan's `keep_states`) leaves the full-size states on disk (read them with
    `ShardedStates`): what a search needs is x_start, x_end, denoised and phi, O(K (d + M r)).
    """
    keep = plan.keep_states if states is None else states
    if keep and not plan.keep_states:
        raise ValueError("states=True needs a plan that keeps states (keep_states=True)")
    done = finished_shards(plan, folder, need_states=keep)
    covered = sum(hi - lo for lo, hi, _ in done)
    if covered != plan.n_trajectories:
        raise ValueError(f"the shards in {folder} cover {covered} of {plan.n_trajectories} trajectories; "
                         "run build_shards to finish them")
    target = dataclasses.replace(plan, keep_states=keep)
    out = BankAssembler(target)
    for _, _, path in done:
        out.add(read_shard(path, plan, states=keep))
    return out.bank()


def build_bank_sharded(model: ModelSource | Denoiser, plan: BankPlan, folder: str | Path, *,
                       states: bool | None = None, **options: Any) -> Bank:
    """`build_shards` then `assemble_from_shards`: the sharded equivalent of `build_bank` for one plan."""
    build_shards(model, plan, folder, **options)
    return assemble_from_shards(plan, folder, states=states)


class ShardedStates:
    """The trajectory states of a shard folder, read on demand: `states[idx]` -> [len(idx), M, *shape].

    Only the requested rows are read (safetensors slices of memory-mapped files), so a caller that recomputes
    a sub-sample of trajectories (a student's grid outputs) never loads K x M x d.
    """

    def __init__(self, plan: BankPlan, folder: str | Path) -> None:
        if not plan.keep_states:
            raise ValueError("the plan keeps no states (keep_states=False): its shards hold none")
        self.plan = plan
        self._shards = finished_shards(plan, folder, need_states=True)
        covered = sum(hi - lo for lo, hi, _ in self._shards)
        if covered != plan.n_trajectories:
            raise ValueError(f"the shards in {folder} cover {covered} of {plan.n_trajectories} trajectories")

    def __len__(self) -> int:
        return self.plan.n_trajectories

    def __getitem__(self, idx: Sequence[int] | Tensor) -> Tensor:
        from safetensors import safe_open

        rows = [int(i) for i in (idx.tolist() if isinstance(idx, Tensor) else idx)]
        if any(not 0 <= i < len(self) for i in rows):
            raise IndexError(f"trajectory index out of 0..{len(self) - 1}")
        out = torch.empty((len(rows), self.plan.grid_size, *self.plan.shape), dtype=self.plan.torch_dtype)
        for lo, hi, path in self._shards:
            mine = [(j, i - lo) for j, i in enumerate(rows) if lo <= i < hi]
            if not mine:
                continue
            with safe_open(str(path), framework="pt") as f:
                sl = f.get_slice("states")
                for j, r in mine:
                    out[j] = sl[r : r + 1][0]
        return out
