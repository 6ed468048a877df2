"""The `[phase2]` table of a study file: how a round fine-tunes the model on the selected steps.

Plain data (no import from `fewstep_search.phase2`). What each setting does and what it costs is measured in
docs/phase2.md; the defaults are the settings that did best there on the built-in digits model.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from fewstep_search.study._base import Strict

__all__ = ["Phase2Spec"]


class Phase2Spec(Strict):
    """Phase-2 settings (fine-tuning on exactly the N selected sigmas; docs/design.md section 1, Phase-2)."""

    max_minutes: float = Field(default=4.0, gt=0, description="wall-time budget of one round (training + evals)")
    max_steps: int | None = Field(default=None, ge=1, description="optimizer steps (overrides the time budget)")
    clock: Literal["wall", "cpu"] = Field(
        default="wall", description="what max_minutes counts: wall time, or CPU time per torch thread (shared hosts)"
    )
    # 32 since 2026-12-06 (was 64): with the larger pool of "auto" end points, twice the steps of half the size cut
    # 43.8% against 41.7% at N = 10 on fresh trajectories in one run each; a repeat cut 35.3%, so the runs' spread
    # is as large as the gain (docs/phase2.md, "A cheaper teacher, a larger pool")
    batch_size: int = Field(default=32, ge=1, description="samples per optimizer step (split across workers)")
    # measured side by side at N = 10 (docs/phase2.md, "Which learning rate"): 2e-5 beat 4e-5 on select E, and a
    # peak of 1e-4 (the default until the end points were solved first) made the error rise for ~100 steps
    lr: float = Field(default=2e-5, gt=0)
    lr_final: float = Field(default=5e-6, gt=0, description="the LR decays geometrically to this along the training")
    warmup_steps: int = Field(default=10, ge=0)
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW decoupled weight decay (0: stay near teacher)")
    ema_decay: float = Field(default=0.99, ge=0, lt=1, description="EMA decay (ramped up over the first updates)")
    grad_clip: float = Field(default=1.0, gt=0, description="cap on the gradient norm of the weights, and on the "
                             "learned schedule's on its own")
    max_log_step: float = Field(default=0.5, gt=0, description="teacher RK4 sub-step bound in log sigma")
    first_max_log_step: float = Field(
        default=0.25, gt=0, description="sub-step bound of the first interval (cached per pool sample: cheap)"
    )
    teacher_solver: Literal["rk4", "rk4_exp", "auto"] = Field(
        default="auto", description="rk4: RK4 in log sigma; rk4_exp: on the exponential-integrator form; auto: "
        "rk4_exp above sigma 1, rk4 below"
    )
    # "auto" since 2026-12-06: 60 steps instead of 200 at N = 10 on the digits model grew the pool 3.4x and cut
    # 41.7% instead of 36.7% on fresh trajectories, single runs with a spread of up to 8 points (docs/phase2.md,
    # "A cheaper teacher, a larger pool")
    end_to_end_teacher_steps: Annotated[int, Field(ge=2)] | Literal["auto"] | None = Field(
        default="auto", description="x0* of the end-to-end term: iPNDM on a Karras grid of this many teacher "
        "calls per sample (each round logs its error against the bank's reference); auto: the cheapest of 25, "
        "40, 60, 100, 150, 200 whose end points are off by at most a tenth of the student's select E at the "
        "round's start (checked on the select trajectories); None: RK4 at max_log_step through the schedule's nodes"
    )
    pool_size: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        default="auto", description="fixed pool of starting noise (teacher work cached per sample); None: fresh "
        "noise; auto: 1024 for the per-step loss, sized by teacher_share for the end-to-end term alone"
    )
    teacher_share: float = Field(
        default=0.4, gt=0, lt=1, description="with pool_size = auto and the end-to-end term alone: the share of "
        "a timed round's budget the teacher's solves of the pool may take"
    )
    cache_first_target: bool = Field(default=True, description="reuse the first interval's target per pool sample")
    target_reuse: int = Field(
        default=4, ge=1, description="passes over the pool a sample's student-state targets serve before a refresh"
    )
    teacher_forced_fraction: float = Field(
        default=0.0, ge=0, le=1, description="share of the budget trained on the teacher's own trajectory first"
    )
    end_to_end_weight: float = Field(
        default=1.0, ge=0, description="weight of the end-to-end term (end_to_end_loss: the student's whole "
        "chain against the teacher's end point; alone by default, which needs the teacher once per pool sample)"
    )
    # norm by default: it is the quantity the round is judged on (E), and it led the squared loss on select E in
    # every side-by-side pair (docs/phase2.md); the squared loss lets a few large-error samples steer the update.
    end_to_end_loss: Literal["squared", "norm"] = Field(
        default="norm", description="the end-to-end term: squared: mean ||x0_hat - x0*||^2; norm: mean "
        "||x0_hat - x0*||, the true error E itself"
    )
    path_weight: float = Field(
        default=0.0, ge=0, description="weight of the path term beside the end-to-end term: the student's chain "
        "states against the teacher's at the schedule's interior nodes, each times the flow's gain from there"
    )
    # on by default since 2026-12-06: at N = 10 on the digits model it beat the fixed schedule in every pair on
    # fresh trajectories no choice looked at (3-13 points), at N = 4 it changed nothing; with the schedule-only
    # start and the sigmas' EMA (below, 3e-2) the N = 10 round cut 68.5% against 49.4% (docs/phase2.md)
    schedule_lr: float = Field(
        default=3e-2, ge=0, description="AdamW learning rate of the schedule's interior sigmas, trained with the "
        "weights through the end-to-end term alone (their shares of the log-sigma span; the ends stay; the round "
        "keeps their EMA, like the weights'); 0: the Phase-1 schedule stays fixed, as it does beside the per-step "
        "loss or the path term"
    )
    # 2026-12-06: from step 0 the weights adapt to Phase-1's sigmas first and hold them near there in most runs;
    # 120 schedule-only steps on the untouched model alone cut E on fresh trajectories by a third at N = 10
    schedule_first_steps: int = Field(
        default=80, ge=0, description="with a trained schedule (schedule_lr > 0): the round's first optimizer steps "
        "train only the sigmas (the weights' rate is 0 and their warm-up starts after them; at most a quarter of "
        "the round's training), so the schedule settles where it suits the model before the weights adapt to it"
    )
    # 2026-12-06: at N = 10 on the digits model, from the strongest Phase-1 pick, starting the sigmas with a long
    # first step cut 50.5-51.6% on fresh trajectories in three runs against 39.3% from Phase-1's (same pool);
    # at N = 4 the sigmas moved back up and the cut held (58.3% against 57.0%; docs/phase2.md)
    schedule_start: Literal["phase1", "merge_first"] = Field(
        default="merge_first", description="with a trained schedule: where its sigmas start; merge_first: "
        "Phase-1's pick with its first two steps merged into one and the node freed put into the widest other "
        "step (a student learns a long first step from the noise, which the untouched model cannot take; round 1 "
        "only: a later round's student already takes it); phase1: Phase-1's pick as it is"
    )
    per_step_weight: float = Field(
        default=0.0, ge=0, description="weight of the per-step loss (1 with end_to_end_weight = 0: the per-step "
        "loss alone, the default before the end-to-end term measured better; docs/phase2.md)"
    )
    train_for: Literal["first_order", "winner"] = Field(
        default="winner", description="the sampler a round trains for: first_order (DDIM: the winner when "
        "it is first order, else the best first-order candidate) or winner (the search winner's solver when "
        "Phase-2 can train it: DDIM, Euler, iPNDM; docs/phase2.md measures both)"
    )
    dropout: bool = Field(default=False, description="student in train mode (dropout on) while fine-tuning")
    lora_rank: int | None = Field(default=None, ge=1, description="train LoRA adapters of this rank (peft) instead "
                                  "of every weight; the teacher is the same network with them off (big models)")
    lora_alpha: float | None = Field(default=None, gt=0, description="LoRA alpha (default: the rank, scale 1)")
    lora_targets: list[str] | None = Field(default=None, min_length=1, description="module names that get "
                                           "adapters (default: the attention projections to_q, to_k, to_v, to_out.0)")
    gradient_checkpointing: bool = Field(default=False, description="recompute the network's activations in the "
                                         "backward pass (diffusers networks): less memory, about 30% more time")
    autocast: bool = Field(default=True, description="bfloat16 autocast for the student on CUDA (CPU: cpu_autocast)")
    cpu_autocast: bool = Field(
        default=False, description="bfloat16 autocast for the student's training calls on CPU as well: more steps "
        "per minute on a CPU with native bf16 (AVX512-BF16, AMX), fewer on one without; evaluation stays float32"
    )
    steps_per_epoch: int = Field(default=10, ge=1, description="a checkpoint and an evaluation after each epoch")
    eval_batch_size: int | None = Field(default=None, ge=1, description="trajectories per batch when scoring E")
    keep_checkpoints: int = Field(default=2, ge=1, description="epoch checkpoints kept in the round folder")
    workers: int = Field(default=1, ge=1, description="Ray Train workers (one GPU each on a GPU cluster)")
    cpus_per_worker: int | None = Field(default=None, ge=1, description="torch threads per worker (None: share)")
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> Phase2Spec:
        if self.lr_final > self.lr:
            raise ValueError(f"lr_final ({self.lr_final}) must not exceed lr ({self.lr})")
        if self.pool_size is None and (
            self.teacher_forced_fraction > 0 or self.end_to_end_weight > 0 or self.target_reuse > 1
        ):
            raise ValueError("teacher_forced_fraction, end_to_end_weight (the default loss) and target_reuse need a "
                             "pool (pool_size); fresh noise: per_step_weight = 1, end_to_end_weight = 0, "
                             "target_reuse = 1")
        if self.per_step_weight == 0 and self.end_to_end_weight == 0:
            raise ValueError("per_step_weight and end_to_end_weight are both 0: the round would train on nothing")
        if self.per_step_weight == 0 and self.teacher_forced_fraction > 0:
            raise ValueError("teacher_forced_fraction warms up the per-step loss, which per_step_weight = 0 (the "
                             "default) turns off; set per_step_weight = 1 and end_to_end_weight = 0 for it")
        if self.path_weight > 0 and self.end_to_end_weight == 0:
            raise ValueError("path_weight adds the path term to the end-to-end term's chain; it needs "
                             "end_to_end_weight > 0")
        if "schedule_lr" in self.model_fields_set and self.schedule_lr > 0 and not self.trains_schedule:
            raise ValueError("schedule_lr trains the schedule through the end-to-end term alone: the per-step "
                             "loss's and the path term's targets sit at the schedule's nodes; set per_step_weight "
                             "and path_weight to 0")
        if "schedule_first_steps" in self.model_fields_set and self.schedule_first_steps > 0 and (
            not self.trains_schedule
        ):
            raise ValueError("schedule_first_steps trains the schedule alone first; it needs a trained schedule "
                             "(schedule_lr > 0 with the end-to-end term alone)")
        if "schedule_start" in self.model_fields_set and self.schedule_start != "phase1" and (
            not self.trains_schedule
        ):
            raise ValueError(f"schedule_start = {self.schedule_start!r} starts a trained schedule; it needs "
                             "schedule_lr > 0 with the end-to-end term alone")
        if self.workers > 1 and self.end_to_end_weight > 0 and self.per_step_weight > 0:
            raise ValueError("end_to_end_weight beside the per-step loss needs workers = 1 (DDP allows one forward "
                             "per backward; per_step_weight = 0, the end-to-end term alone, runs on several)")
        return self

    @property
    def trains_schedule(self) -> bool:
        """Whether a round trains the sigmas too: `schedule_lr > 0` with the end-to-end term alone (the per-step
        loss's and the path term's targets sit at the nodes, so beside them the schedule stays fixed)."""
        return self.schedule_lr > 0 and self.per_step_weight == 0 and self.path_weight == 0

    @property
    def weights_wait(self) -> int:
        """Optimizer steps at the round's start in which only the schedule trains (0 without a trained one)."""
        return self.schedule_first_steps if self.trains_schedule else 0
