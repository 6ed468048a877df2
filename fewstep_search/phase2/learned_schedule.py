"""The schedule as a trainable part of a Phase-2 round (`phase2.schedule_lr > 0`).

Why: Phase-1 picks the sigmas that suit the untouched model, and Phase-2 then changes the model; the sigmas that
suit the fine-tuned model are not quite the same, and the two adapt to each other when trained together. The
end-to-end term's target (the teacher's end point from the noise) does not depend on the schedule, so the chain
is differentiable in the sigmas and the same loss trains both. Measured on the digits model at N = 10
(docs/phase2.md, "Training the schedule with the model"): re-optimizing the sigmas after training gained about
3%, training them together several points more.

Parameterization: `logits` [N], the interior sigmas as shares of the log-sigma span, `softmax(logits)`, so the
ends stay where Phase-1 put them (sigma_max, and the bank's sigma_min every E is measured at) and the sigmas stay
strictly decreasing whatever the optimizer does (Phase-1's own `schedules.sigmas_from_logits`, each step at
least `MIN_STEP_SHARE` of the span). It starts exactly at the Phase-1 schedule.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fewstep_search.schedules import logits_from_sigmas, sigmas_from_logits

__all__ = ["LearnedSchedule"]


class LearnedSchedule(nn.Module):
    """N + 1 sigmas from `sigma_max` down to `sigma_min` whose N log-sigma shares are trained."""

    def __init__(self, sigmas: tuple[float, ...]) -> None:
        super().__init__()
        if len(sigmas) < 2 or sigmas[-1] <= 0:
            raise ValueError("a learned schedule needs positive, strictly decreasing sigmas (no final 0)")
        self.ends = (float(sigmas[0]), float(sigmas[-1]))
        # Phase-1's own inverse map (refuses sigmas that are not strictly decreasing)
        self.logits = nn.Parameter(logits_from_sigmas(sigmas).float())

    def forward(self) -> Tensor:
        """The sigmas [N + 1], float32, differentiable in `logits` (the ends are constants).

        Computed in float64 by Phase-1's map (each step keeps `MIN_STEP_SHARE` of the span), so extreme logits
        cannot round two sigmas to the same float32 value."""
        return sigmas_from_logits(self.logits.double(), self.ends[1], self.ends[0]).float()

    def values(self) -> tuple[float, ...]:
        """The current sigmas as floats (for evaluation, the epoch log and the round's schedule); the ends exactly,
        not to float32 round-off: E is measured at the bank's sigma_min."""
        with torch.no_grad():
            inner = tuple(float(v) for v in self()[1:-1])
        return (self.ends[0], *inner, self.ends[1])
