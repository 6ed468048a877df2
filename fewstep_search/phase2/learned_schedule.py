"""The schedule as a trainable part of a Phase-2 round (`phase2.schedule_lr > 0`).

Why: Phase-1 picks the sigmas that suit the untouched model, and Phase-2 then changes the model; the sigmas that
suit the fine-tuned model are not quite the same, and the two adapt to each other when trained together. The
end-to-end term's target (the teacher's end point from the noise) does not depend on the schedule, so the chain
is differentiable in the sigmas and the same loss trains both. Measured on the digits model at N = 10
(docs/phase2.md, "Training the schedule with the model"): re-optimizing the sigmas after training gained about
3%, training them together several points more.

Parameterization: `logits` [N], the interior sigmas as shares of the log-sigma span, `softmax(logits)`, so the
ends stay where Phase-1 put them (sigma_max, and the bank's sigma_min every E is measured at) and the sigmas stay
strictly decreasing whatever the optimizer does (each step keeps at least `schedules.MIN_STEP_SHARE` of the span,
as Phase-1's schedules do). It starts exactly at the Phase-1 schedule.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fewstep_search.schedules import MIN_STEP_SHARE

__all__ = ["LearnedSchedule"]


class LearnedSchedule(nn.Module):
    """N + 1 sigmas from `sigma_max` down to `sigma_min` whose N log-sigma shares are trained."""

    def __init__(self, sigmas: tuple[float, ...]) -> None:
        super().__init__()
        if len(sigmas) < 2 or any(b >= a for a, b in zip(sigmas, sigmas[1:], strict=False)) or sigmas[-1] <= 0:
            raise ValueError("a learned schedule needs positive, strictly decreasing sigmas (no final 0)")
        self.ends = (float(sigmas[0]), float(sigmas[-1]))
        logs = torch.log(torch.tensor(sigmas, dtype=torch.float64))
        self.log_max, self.log_min = float(logs[0]), float(logs[-1])
        shares = (logs[:-1] - logs[1:]) / (self.log_max - self.log_min)
        self.logits = nn.Parameter(torch.log(shares).float())

    def forward(self) -> Tensor:
        """The sigmas [N + 1], float32, differentiable in `logits` (the ends are constants)."""
        n = self.logits.numel()
        # float64, and each step at least MIN_STEP_SHARE of the span (as Phase-1's schedules): extreme logits
        # must not round two sigmas to the same float32 value
        shares = MIN_STEP_SHARE + (1 - n * MIN_STEP_SHARE) * torch.softmax(self.logits.double(), 0)
        used = torch.cat([shares.new_zeros(1), torch.cumsum(shares, 0)])
        sig = torch.exp(self.log_max - (self.log_max - self.log_min) * used).float()
        # the ends exactly, not to float32 round-off: E is measured at the bank's sigma_min
        ends = torch.tensor(self.ends, dtype=sig.dtype, device=sig.device)
        return torch.cat([ends[:1], sig[1:-1], ends[1:]])

    def values(self) -> tuple[float, ...]:
        """The current sigmas as floats (for evaluation, the epoch log and the round's schedule)."""
        with torch.no_grad():
            inner = tuple(float(v) for v in self()[1:-1])
        return (self.ends[0], *inner, self.ends[1])
