"""What a Phase-2 round measures besides its loss: the student's true error, and how accurate its targets are.

Both are scored against the bank's reference end points (the accurate solve every reported E uses), so a
round's log says at once how far the student is from the reference and how far its targets are. Nothing here
imports Ray.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from fewstep_search.bank import Bank
from fewstep_search.denoiser import bind_condition
from fewstep_search.objectives import true_error
from fewstep_search.phase2.targets import CountingDenoiser, IntervalTeacher

__all__ = ["student_errors", "teacher_error", "TEACHER_CHECK"]

TEACHER_CHECK = 32
"""Select trajectories on which a round measures the accuracy of the end-to-end term's targets."""


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
