"""Phase-2: fine-tune the model on exactly the N sigmas of a fixed schedule (docs/design.md section 1, Phase-2).

`train_pair(candidate, ...)` runs one round for a pair and returns the round's pair (`fine_tune(...)` below it
returns the round's `FineTuneResult`); the pieces are
`targets` (the teacher's accurate interval solves), `steps` (the sampler trained for, as steps affine in their
output), `loss` (the per-step distillation loss and its weights), `pool` (fixed starting noise with cached
teacher work), `optim` (AdamW, LR schedule, EMA), `checkpoints` (atomic epoch folders), `worker` (the
per-worker loop) and `trainer` (the public entry point; the only module that imports Ray, lazily). See docs/phase2.md.
"""

from fewstep_search.phase2.loss import rms_gain, step_weights
from fewstep_search.phase2.targets import TEACHER_SOLVERS, ideal_output, solve_interval
from fewstep_search.phase2.trainer import FineTuneResult, fine_tune, train_pair

__all__ = ["FineTuneResult", "fine_tune", "train_pair", "step_weights", "rms_gain", "solve_interval", "ideal_output",
           "TEACHER_SOLVERS"]
