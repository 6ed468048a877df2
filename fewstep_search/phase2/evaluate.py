"""What a Phase-2 round measures besides its loss: the student's true error, and how accurate its targets are.

Both are scored against the bank's reference end points (the accurate solve every reported E uses), so a
round's log says at once how far the student is from the reference and how far its targets are. Nothing here
imports Ray.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from fewstep_search.bank import Bank
from fewstep_search.denoiser import bind_condition
from fewstep_search.objectives import true_error
from fewstep_search.phase2.targets import CountingDenoiser, IntervalTeacher

__all__ = ["student_errors", "teacher_error", "end_point_teacher", "TEACHER_CHECK", "END_STEP_LADDER",
           "TARGET_TOLERANCE"]

TEACHER_CHECK = 64
"""Select trajectories on which a round measures the accuracy of the end-to-end term's targets."""

END_STEP_LADDER = (25, 40, 60, 100, 150, 200)
"""The teacher's end-point step counts `end_to_end_teacher_steps = "auto"` tries, cheapest first (about x1.5
apart); 200 was the fixed default before the rule."""

TARGET_TOLERANCE = 0.1
"""`"auto"` takes the cheapest rung whose end points are off by at most this share of the student's select E at
the round's start. Why 0.1: a student that halves its error is then at most ~2% above where exact targets would
put it (the two errors add about in quadrature), while each rung down the ladder buys a pool ~1.5x larger; at
N = 10 on the digits model the 200-step pool was learned beyond what carried over to fresh noise
(docs/phase2.md, "A cheaper teacher, a larger pool")."""


def student_errors(den: Any, select: Bank, test: Bank, sigmas: tuple[float, ...], *, device: torch.device,
                   solver: str = "ddim", batch_size: int | None = None) -> dict[str, float]:
    """`select_error` / `test_error`: E of the student's N-step sampler on the select and test trajectories."""
    sig = torch.tensor(sigmas, dtype=torch.float64)
    with torch.no_grad():
        return {
            "select_error": float(true_error(den, select.to(device), sig, solver=solver, batch_size=batch_size)),
            "test_error": float(true_error(den, test.to(device), sig, solver=solver, batch_size=batch_size)),
        }


def teacher_error(teacher: IntervalTeacher, select: Bank, device: torch.device) -> dict[str, float]:
    """`teacher_error`: E of the teacher's end points (the end-to-end term's targets) against the bank's
    reference on the first `TEACHER_CHECK` select trajectories.

    Why: the student cannot get closer to the reference than its targets are, and how fine a solve that takes
    depends on the model (how fast its output varies in sigma), so each round measures it beside the student's
    select E instead of trusting a fixed step count. The check's teacher calls are not counted as training work.
    """
    part = select.subset(torch.arange(min(TEACHER_CHECK, select.n_trajectories)))
    x0 = part.x_start.to(device)
    bare = teacher.teacher.inner if isinstance(teacher.teacher, CountingDenoiser) else teacher.teacher
    cond = None if part.cond is None else part.cond.to(device)
    bound = dataclasses.replace(teacher, teacher=bind_condition(bare, cond))
    err = (bound.end_point(x0) - part.x_end.to(device, x0.dtype)).flatten(1).norm(dim=1).mean()
    return {"teacher_error": float(err)}


def end_point_teacher(teacher: IntervalTeacher, spec_steps: int | str | None, initial: dict[str, Any] | None,
                      select: Bank, device: torch.device, agree: Callable[[torch.Tensor], torch.Tensor],
                      ) -> IntervalTeacher:
    """The teacher whose end points a round trains on, its step count fixed by the study or chosen by `"auto"`.

    `initial` is rank 0's record of the round's start (the student's `select_error`; None on other ranks); the
    choice and the targets' error are added to it (`teacher_steps`, `teacher_error`), so a resumed round reads
    its step count back instead of choosing again. `agree` is the workers' all-reduce max: every rank ends with
    rank 0's choice. Like the check, the probe's calls (a few thousand) are not counted as training work; its
    time is on the round's clock.
    """
    if spec_steps == "auto":
        known = (initial or {}).get("teacher_steps")
        if known is None and initial is not None:
            start = float(initial["select_error"])
            for steps in END_STEP_LADDER:  # cheapest first; the top rung when none is accurate enough
                err = teacher_error(dataclasses.replace(teacher, end_steps=steps), select, device)["teacher_error"]
                if err <= TARGET_TOLERANCE * start:
                    break
            known = steps
            initial.update(teacher_steps=steps, teacher_error=err)
        # no rank knows (a checkpoint without its start record): the finest rung, never a 0-step solve
        spec_steps = int(agree(torch.tensor([float(known or 0)], device=device))[0]) or END_STEP_LADDER[-1]
    chosen = dataclasses.replace(teacher, end_steps=spec_steps)  # type: ignore[arg-type]
    if initial is not None and "teacher_error" not in initial:
        initial.update(teacher_error(chosen, select, device))
    return chosen
