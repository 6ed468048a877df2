"""The `[phase2]` table of a study file: how a round fine-tunes the model on the selected steps."""

from __future__ import annotations

from pydantic import Field

from fewstep_search.study._base import Strict

__all__ = ["Phase2Spec"]


class Phase2Spec(Strict):
    """Phase-2 settings (fine-tuning on exactly the N selected sigmas; DESIGN.md section 1, Phase-2)."""

    max_minutes: float = Field(default=4.0, gt=0, description="wall-time budget of one round's training")
    max_steps: int | None = Field(default=None, ge=1, description="optimizer steps (overrides the time budget)")
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=1e-4, gt=0)
    lr_final: float = Field(default=1e-5, gt=0)
    warmup_steps: int = Field(default=10, ge=0)
    ema_decay: float = Field(default=0.99, ge=0, lt=1)
    grad_clip: float = Field(default=1.0, gt=0)
    max_log_step: float = Field(default=0.25, gt=0, description="teacher RK4 sub-step bound in log sigma")
    end_to_end_weight: float = Field(default=0.0, ge=0)
    steps_per_epoch: int = Field(default=10, ge=1, description="a checkpoint is written after each epoch")
    workers: int = Field(default=1, ge=1, description="Ray Train workers (one GPU each on a GPU cluster)")
    seed: int = 0
