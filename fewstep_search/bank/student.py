"""A Phase-2 student's view of the teacher's bank: the same trajectories, with the student's outputs on the grid.

Why: from round 2 on, the bound trials (B_w, B_0, the DP) must score the current student, whose outputs differ
from the teacher's; the trajectories, their accurate end points and the gains stay the teacher's (docs/design.md
section 3). Recomputing costs one student call per kept grid point, so only what the search needs is recomputed:

* the fit set, capped at `max_fit` trajectories (a seeded sub-sample): the bounds are means over fit trajectories
  and their Monte-Carlo error falls as 1/sqrt(K), so a few hundred suffice where the teacher's bank is larger;
  `tests/test_bank.py` measures what the cap does to the B_w-DP schedule on the mixture;
* all select and test trajectories (the winner is picked and reported on them, with the true error; their
  bounds are reported too);
* in calls of at most `samples_per_call` inputs, whatever K x M is (65,536 inputs at K = 256, M = 256 would be
  4 GiB at d = 16384).
"""

from __future__ import annotations

import torch

from fewstep_search.bank.container import Bank
from fewstep_search.denoiser import Denoiser, bind_condition

__all__ = ["student_bank", "STUDENT_MAX_FIT"]

STUDENT_MAX_FIT = 256
"""Fit trajectories a round recomputes the student's grid outputs on (all of them when the fit set is smaller)."""


def student_bank(bank: Bank, student: Denoiser, *, model_id: str, max_fit: int = STUDENT_MAX_FIT,
                 samples_per_call: int = 1024, seed: int = 0) -> Bank | None:
    """The trajectories the search needs, with `student`'s outputs at the teacher's states; None without states.

    The fit set is cut to `max_fit` trajectories (drawn with `seed`, in their bank order); select and test are
    kept whole. `result.sizes()` says what was kept.
    """
    if bank.states is None:
        return None
    fit = bank.indices("fit")
    if fit.numel() > max_fit:
        g = torch.Generator().manual_seed(seed)
        fit = fit[torch.randperm(fit.numel(), generator=g)[:max_fit]]
        keep = torch.cat([fit, bank.indices("select"), bank.indices("test")]).sort().values
        bank = bank.subset(keep)
    assert bank.states is not None
    k, m = bank.states.shape[:2]
    flat = bank.states.reshape(k * m, *bank.shape)
    sigma = bank.grid.to(device=flat.device, dtype=flat.dtype).repeat(k)
    cond = None if bank.cond is None else bank.cond.repeat_interleave(m)
    outs = []
    with torch.no_grad():
        for lo in range(0, k * m, samples_per_call):
            den = bind_condition(student, None if cond is None else cond[lo : lo + samples_per_call])
            outs.append(bank.project(den(flat[lo : lo + samples_per_call], sigma[lo : lo + samples_per_call])))
    return bank.with_outputs(torch.cat(outs).reshape(k, m, -1), model_id=model_id)
