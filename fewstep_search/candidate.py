"""`Candidate`: the value the phases hand each other, a (schedule, weights) pair with its origin and its scores.

Phase-1 ends in candidates (its trials' schedules on the untouched model), Phase-2 takes one and returns one (the
same schedule, or the one it trained, with fine-tuned weights), the best-pair rule compares them, and an export
reads one. The schedule carries the solver it was searched and trained for and the model's family, so a pair is
never separated from the sampler it works with. Rows of the run folder's JSON become candidates in one place
(`Candidate.from_row`), which is also the one place a row's missing solver means DDIM.

    >>> from fewstep_search.schedules import karras
    >>> c = Candidate(karras(4, 0.002, 80.0), origin="edm", scores=Scores(select=0.3, test=0.31))
    >>> c.solver, c.round, c.scores.select
    ('ddim', 0, 0.3)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fewstep_search.schedules import Schedule

__all__ = ["Candidate", "Scores", "SCORE_SETS"]

SCORE_SETS = ("fit", "select", "test", "keep")
"""The trajectory sets a pair is scored on: fit (optimizers saw it), select (the search picked on it), test
(reported, never decided on), keep (the loop decides which pair to keep on it)."""


@dataclass(frozen=True)
class Scores:
    """A pair's mean error on each trajectory set (None where it was not scored), its FD where there is data, and
    for a conditional model the test error of each condition."""

    fit: float | None = None
    select: float | None = None
    test: float | None = None
    keep: float | None = None
    fd: float | None = None
    test_by_condition: dict[str, float] | None = None

    def on(self, name: str) -> float:
        """The error on set `name` (ValueError when the pair was not scored there)."""
        if name not in SCORE_SETS:
            raise ValueError(f"unknown trajectory set {name!r}; known: {', '.join(SCORE_SETS)}")
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"this pair has no {name} error")
        return float(value)

    def as_row(self) -> dict[str, float]:
        """`{"select_error": ..., "fd": ...}` for the sets that were scored (the run folder's keys)."""
        out: dict[str, Any] = {f"{name}_error": getattr(self, name) for name in SCORE_SETS
                               if getattr(self, name) is not None}
        if self.fd is not None:
            out["fd"] = self.fd
        if self.test_by_condition is not None:
            out["test_error_by_condition"] = dict(self.test_by_condition)
        return out

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Scores:
        by_cond = row.get("test_error_by_condition")
        return cls(**{name: _number(row.get(f"{name}_error")) for name in SCORE_SETS}, fd=_number(row.get("fd")),
                   test_by_condition=None if by_cond is None else {str(k): float(v) for k, v in by_cond.items()})


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True)
class Candidate:
    """A pair: `schedule` (with its solver and family) and `weights` (None: the untouched model's), found by
    `origin` (a trial's label, or a round's), in `round` (0 for Phase-1's pairs), scored in `scores`."""

    schedule: Schedule
    origin: str = ""
    round: int = 0
    weights: Path | None = None
    scores: Scores = field(default_factory=Scores)

    @property
    def solver(self) -> str:
        return self.schedule.solver

    @property
    def name(self) -> str:
        return self.schedule.name

    def fine_tuned(self, *, round: int, weights: Path, schedule: Schedule | None = None) -> Candidate:
        """This pair after round `round`'s Phase-2: its weights, and its schedule (the trained one when the round
        trained the sigmas), unscored."""
        return Candidate(schedule=schedule or self.schedule, origin=f"round {round}: {self.origin}", round=round,
                         weights=weights)

    def with_scores(self, **scores: float | None) -> Candidate:
        """A copy with some scores replaced (the others kept)."""
        return dataclasses.replace(self, scores=dataclasses.replace(self.scores, **scores))

    @classmethod
    def from_row(cls, row: Mapping[str, Any], *, round: int = 0, weights: Path | None = None,
                 family: str | None = None) -> Candidate:
        """A candidate from a run-folder row (`{"name", "sigmas", "solver", "select_error", ...}`); a row without a
        solver is a DDIM schedule (runs from before the solver was recorded). `family` overrides the row's."""
        data = {**row, **({"family": family} if family is not None else {})}
        schedule = Schedule.from_dict({k: data[k] for k in ("sigmas", "name", "solver", "family") if k in data})
        return cls(schedule=schedule, origin=str(row.get("origin", row.get("name", ""))), round=round,
                   weights=weights, scores=Scores.from_row(row))

    def to_row(self) -> dict[str, Any]:
        """The run folder's row: the schedule's fields, the round, the origin, the weights' file and the scores."""
        return {**self.schedule.to_dict(), "origin": self.origin, "round": self.round,
                "model": None if self.weights is None else str(self.weights), **self.scores.as_row()}
