"""What a bank build costs in memory, predicted before any work: the build refuses in one line when it cannot fit.

A build keeps x_start, x_end, the reduced outputs and the gains of all K trajectories, plus one chunk's
full-size working set (its states on the grid dominate); `default_chunk` caps that working set so a large model
streams in small chunks instead of running out of memory half-way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fewstep_search.bank.build import BankPlan

__all__ = ["chunk_bytes", "default_chunk", "estimate_bank_bytes", "refuse_if_too_big"]

_CHUNK_BYTES = 512 * 2**20
"""Default chunk size: at most this much working memory per chunk (its full-size states dominate)."""


def estimate_bank_bytes(plan: BankPlan, *, chunk: int) -> dict[str, int]:
    """Predicted memory of a build, by part: what is kept for all K trajectories and one chunk's working set."""
    k, m, d, r = plan.n_trajectories, plan.grid_size, plan.dim, plan.stored_dim
    item = 4 if plan.dtype == "float32" else 8
    kept = 2 * k * d * item + k * m * r * (2 if plan.store_float16 else item) + k * m * 8
    if plan.keep_states:
        kept += k * m * d * item
    projection = d * r * 4 if r < d else 0
    return {"kept": kept, "projection": projection, "chunk": chunk_bytes(plan, chunk),
            "total": kept + projection + chunk_bytes(plan, chunk)}


def chunk_bytes(plan: BankPlan, chunk: int) -> int:
    """One chunk's working set: its states on the grid, its reduced outputs, and the gain sweep (probes, RK4)."""
    m, d, r = plan.grid_size, plan.dim, plan.stored_dim
    item = 4 if plan.dtype == "float32" else 8
    return chunk * m * d * item + chunk * m * r * 8 + chunk * plan.probes * d * item * 12


def default_chunk(plan: BankPlan, *, budget: int = _CHUNK_BYTES) -> int:
    """Trajectories per chunk: min(K, 64), fewer when one chunk's working set would exceed `budget` bytes."""
    chunk = min(plan.n_trajectories, 64)
    while chunk > 1 and chunk_bytes(plan, chunk) > budget:
        chunk //= 2
    return chunk


def _available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), or None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def refuse_if_too_big(plan: BankPlan, *, chunk: int, available: int | None = None) -> None:
    """MemoryError before any work when the predicted peak exceeds the memory this machine has available."""
    avail = _available_bytes() if available is None else available
    need = estimate_bank_bytes(plan, chunk=chunk)
    if avail is None or need["total"] <= avail:
        return
    gib = 2.0**30
    raise MemoryError(
        f"this bank needs about {need['total'] / gib:.1f} GiB (K={plan.n_trajectories}, M={plan.grid_size}, "
        f"d={plan.dim}, r={plan.stored_dim}, states {'kept' if plan.keep_states else 'dropped'}) but "
        f"{avail / gib:.1f} GiB are available; lower n_trajectories or grid_size, set project_dim / "
        "store_float16, keep_states = false, or a smaller batch_size"
    )
