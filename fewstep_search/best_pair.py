"""Which (schedule, model) pair the loop keeps, and when it stops: decided on the keep set.

Why not on select: Phase-1's winner was picked on the select trajectories among every trial, so its select E is
biased low, while a round's select E is not (Phase-2 picks nothing on it); and 64 select trajectories are few
when a student now and then sends one to another mode. On the default digits run a round 29% better on 1024
fresh trajectories lost on select (0.1664 against Phase-1's 0.1567), mostly through one trajectory that went from
E 0.55 to 3.71, and the loop kept the untouched pair. The keep set (`fewstep_search.bank.keep`) is fresh
reference trajectories no earlier choice looked at, 256 by default; the test set stays for reporting only. With
`bank.keep_trajectories = 0` there is no keep set and the decisions fall back to select E.
"""

from __future__ import annotations

import torch

from fewstep_search.bank import Bank
from fewstep_search.candidate import Candidate
from fewstep_search.denoiser import Denoiser
from fewstep_search.objectives import true_error
from fewstep_search.schedules import Schedule

__all__ = ["IMPROVEMENT", "BestPair", "keep_error"]

IMPROVEMENT = 0.01
"""A round must lower the deciding error (keep E) by at least this fraction against the previous pair, or the loop
stops."""


def keep_error(model: Denoiser, schedule: Schedule, keep: Bank | None, *,
               batch_size: int | None = None) -> dict[str, float]:
    """`{"keep_error": E}` of a pair (the model with the schedule's own solver) on the keep set (empty without one)."""
    if keep is None:
        return {}
    with torch.no_grad():
        e = true_error(model, keep, schedule.tensor(device=keep.device), solver=schedule.solver,
                       batch_size=batch_size)
    return {"keep_error": float(e)}


class BestPair:
    """The best pair so far and the previous round's error, on one deciding set (keep, or select without one).

    Starts at Phase-1's pair (round 0, the untouched model); `offer` each round's pair in order."""

    def __init__(self, first: Candidate, *, on_keep_set: bool) -> None:
        self.decide = "keep" if on_keep_set else "select"
        self.best = first
        self.previous = first.scores.on(self.decide)

    @property
    def set_name(self) -> str:
        """The set the decisions are taken on ("keep" or "select"), for notes."""
        return self.decide

    def offer(self, pair: Candidate) -> bool:
        """Keep `pair` when it beats the best on the deciding set; True when kept."""
        if pair.scores.on(self.decide) >= self.best.scores.on(self.decide):
            return False
        self.best = pair
        return True

    def stalled(self, pair: Candidate) -> bool:
        """Whether this round's pair lowered the deciding error by less than `IMPROVEMENT` against the previous
        pair's (the one it started from); moves `previous` on."""
        value = pair.scores.on(self.decide)
        stalled = value > self.previous * (1 - IMPROVEMENT)
        self.previous = value
        return stalled
