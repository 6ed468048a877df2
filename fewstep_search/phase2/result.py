"""What a Phase-2 round returns: `FineTuneResult` (the EMA weights' file, the history, why it stopped).

Its own module so that the result's shape can be read without the trainer (and Ray) behind it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fewstep_search.phase2 import checkpoints as ck

__all__ = ["FineTuneResult"]


@dataclass(frozen=True)
class FineTuneResult:
    """A finished (or stopped) round: the EMA weights' file, the per-epoch history, why it stopped early."""

    checkpoint: Path
    history: list[dict[str, Any]]
    stopped_reason: str | None
    seconds: float
    initial: dict[str, float] | None = None
    teacher_calls: int = 0
    steps: int = 0
    wall_seconds: float = 0.0
    out_dir: Path | None = None
    train_from: float = 0.0
    """Round seconds spent before the first optimizer step (the end-to-end term's pool of end points)."""
    notes: list[str] = field(default_factory=list)
    """What a user should know about how the round went (a pool cut at the fill's deadline, no step taken)."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> dict[str, Any] | None:
        """The last epoch's metrics (select_error, test_error, ...), or None if no epoch finished."""
        return self.history[-1] if self.history else None

    @property
    def sigmas(self) -> tuple[float, ...] | None:
        """The schedule the round ended with when it trained it (`phase2.schedule_lr > 0`), else None."""
        final = self.final
        return tuple(final["sigmas"]) if final and "sigmas" in final else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": str(self.checkpoint), "history": self.history, "stopped_reason": self.stopped_reason,
            "seconds": self.seconds, "initial": self.initial, "teacher_calls": self.teacher_calls,
            "steps": self.steps, "wall_seconds": self.wall_seconds, "train_from": self.train_from,
            "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], out_dir: Path) -> FineTuneResult:
        return cls(
            checkpoint=out_dir / ck.MODEL_FILE, history=list(d["history"]), stopped_reason=d.get("stopped_reason"),
            seconds=float(d["seconds"]), initial=d.get("initial"), teacher_calls=int(d.get("teacher_calls", 0)),
            steps=int(d.get("steps", 0)), wall_seconds=float(d.get("wall_seconds", d["seconds"])), out_dir=out_dir,
            train_from=float(d.get("train_from") or 0.0), notes=list(d.get("notes", [])),
        )
