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
least `MIN_STEP_SHARE` of the span). It starts at the Phase-1 schedule, or with its first two steps merged into
one (`phase2.schedule_start`, `merged_first_step`).

Two things make where the sigmas land reliable (docs/phase2.md, "The schedule first, and its EMA"): the round's
first optimizer steps train the sigmas alone (`phase2.schedule_first_steps`; from step 0 the weights adapt to
Phase-1's sigmas and hold them near there), and the round evaluates and returns an EMA of the sigmas, paired
with the EMA of the weights (a batch gives a noisy gradient in N shares; the last step's sigmas swung by 50%).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from fewstep_search.schedules import logits_from_sigmas, sigmas_from_logits

__all__ = [
    "LearnedSchedule", "merged_first_step", "round_start", "start_sigmas",
    "SCHEDULE_FIRST_SHARE", "restore_schedule", "schedule_checkpoint", "schedule_only_over",
]


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


def merged_first_step(sigmas: tuple[float, ...]) -> tuple[float, ...]:
    """`sigmas` with the first two steps merged into one and the node freed put into the widest remaining step
    (in log sigma, the first step left out), at its geometric middle; unchanged below 3 steps (no other step).

    Why: at sigma_max the input is almost all noise, so an untouched denoiser's output there is close to the data
    mean and its first step must stay short to be accurate; Phase-1 sizes the schedule for that model. A student
    trained end to end learns the teacher's map from that noise, which is smooth at high noise, so it can take a
    far longer first step and spend the node lower down. Trained from Phase-1's sigmas, the top node rarely gets
    there: the untouched model is nearly indifferent to where it sits (its gradient is mostly noise), and once
    the weights adapt to it the pair is a local optimum (docs/phase2.md, "A longer first step")."""
    if len(sigmas) < 4:
        return tuple(sigmas)
    rest = [sigmas[0], *sigmas[2:]]
    logs = torch.tensor(rest[1:], dtype=torch.float64).log()
    widest = int(torch.argmax(logs[:-1] - logs[1:]))  # the step from rest[widest + 1] to rest[widest + 2]
    middle = float((logs[widest] + logs[widest + 1]).div(2).exp())
    return (*rest[: widest + 2], middle, *rest[widest + 2:])


def start_sigmas(sigmas: tuple[float, ...], start: str) -> tuple[float, ...]:
    """Where a round's learned schedule starts (`phase2.schedule_start`): Phase-1's sigmas (`"phase1"`) or those
    with the first step merged (`"merge_first"`)."""
    if start == "phase1":
        return tuple(sigmas)
    if start == "merge_first":
        return merged_first_step(sigmas)
    raise ValueError(f"unknown schedule_start {start!r}: phase1 or merge_first")


def round_start(sigmas: tuple[float, ...], start: str, fine_tuned: bool) -> tuple[float, ...]:
    """Where a round's learned schedule starts: `start_sigmas` for a model that has not been fine-tuned yet, and
    Phase-1's pick as it is for a student of an earlier round, whose own Phase-1 search already sees the long
    first step it learned (merging again would take a second step off the top each round)."""
    return tuple(sigmas) if fine_tuned else start_sigmas(sigmas, start)


SCHEDULE_FIRST_SHARE = 0.25
"""The most of a round's training (progress) a schedule-only start may take (`phase2.schedule_first_steps`)."""


def schedule_only_over(step: int, first_steps: int, train_progress: float) -> bool:
    """Whether a round's schedule-only start is over at optimizer step `step`: after `first_steps`, or at
    `SCHEDULE_FIRST_SHARE` of its training when that comes first (a short round keeps most of its steps for the
    weights)."""
    return step >= first_steps or train_progress >= SCHEDULE_FIRST_SHARE


def schedule_checkpoint(learned: LearnedSchedule | None, averaged: AveragedModel | None) -> dict[str, Any]:
    """A learned schedule's part of an optimizer checkpoint: its logits and their EMA (nothing without one)."""
    if learned is None or averaged is None:
        return {}
    return {"schedule_logits": learned.logits.detach().cpu(), "schedule_ema_updates": int(averaged.n_averaged),
            "schedule_ema_logits": averaged.module.logits.detach().cpu()}


def restore_schedule(learned: LearnedSchedule, averaged: AveragedModel, saved: dict[str, Any]) -> None:
    """Back to `schedule_checkpoint`'s state; a checkpoint from before the EMA existed starts it at the logits."""
    learned.logits.data.copy_(saved["schedule_logits"])
    averaged.module.logits.data.copy_(saved.get("schedule_ema_logits", saved["schedule_logits"]))
    averaged.n_averaged.fill_(int(saved.get("schedule_ema_updates", 0)))
