"""Torch's own training pieces for Phase-2: AdamW, a warm-up-then-decay LambdaLR, an EMA AveragedModel, a clock.

Why a progress-driven learning rate: a round is usually bounded by wall time (`max_minutes`), so the number of
optimizer steps is not known in advance; the decay from `lr` to `lr_final` follows the round's progress (the
fraction of its time or step budget used), which is the same function of time whatever the machine's speed.
Nothing here imports Ray.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

__all__ = ["Clock", "clip_gradients", "lr_factor", "make_optimizer", "make_scheduler", "make_ema"]


class Clock:
    """Training progress in [0, 1]: steps over `max_steps` when given, else seconds over the time budget.

    `seconds` includes what earlier (resumed-from) sessions of the same round spent, so a resumed round trains
    only for what is left of its budget. `kind="cpu"` counts this process's CPU time divided by its torch
    threads instead of wall time: on a machine shared with other jobs, that is the time the same work takes on
    idle cores (slightly less, never more: threads waiting for a core cost nothing), so a budget means the same
    amount of training whatever else runs. Wall time is always recorded too (`wall_seconds`).
    """

    def __init__(
        self, *, budget_seconds: float, max_steps: int | None, seconds_before: float = 0.0,
        wall_before: float = 0.0, kind: str = "wall",
    ) -> None:
        if kind not in ("wall", "cpu"):
            raise ValueError(f"clock must be 'wall' or 'cpu', got {kind!r}")
        self.budget, self.max_steps, self.kind = budget_seconds, max_steps, kind
        self.before, self.wall_before = seconds_before, wall_before
        self.start = time.monotonic()
        self.cpu_start = time.process_time()
        self.threads = max(1, torch.get_num_threads())
        self.step = 0
        self.train_from = 0.0
        """Round seconds at which training began (after the teacher's up-front work, `phase2.pool_fill`)."""

    @property
    def wall_seconds(self) -> float:
        return self.wall_before + (time.monotonic() - self.start)

    @property
    def seconds(self) -> float:
        if self.kind == "cpu":
            return self.before + (time.process_time() - self.cpu_start) / self.threads
        return self.before + (time.monotonic() - self.start)

    @property
    def progress(self) -> float:
        if self.max_steps is not None:
            return min(1.0, self.step / self.max_steps)
        return min(1.0, self.seconds / self.budget)

    @property
    def train_progress(self) -> float:
        """Progress of the training itself: like `progress`, over the budget left after `train_from`.

        What the learning rate follows, so its warm-up and decay span the optimizer steps, not the teacher's
        up-front work."""
        if self.max_steps is not None:
            return self.progress
        span = self.budget - self.train_from
        return 1.0 if span <= 0 else min(1.0, max(0.0, (self.seconds - self.train_from) / span))

    @property
    def done(self) -> bool:
        return self.progress >= 1.0


def lr_factor(step: int, progress: float, *, warmup_steps: int, lr: float, lr_final: float) -> float:
    """Linear warm-up over `warmup_steps`, then a geometric decay from lr to lr_final along `progress`."""
    warm = min(1.0, (step + 1) / (warmup_steps + 1)) if warmup_steps > 0 else 1.0
    return warm * (lr_final / lr) ** min(1.0, max(0.0, progress))


def make_optimizer(module: nn.Module, *, lr: float, weight_decay: float, schedule: nn.Module | None = None,
                   schedule_lr: float = 0.0) -> torch.optim.AdamW:
    """AdamW on the student's trainable weights; with a learned `schedule`, its parameters as a second group at
    `schedule_lr` without weight decay (the scheduler's warm-up and decay scale both groups alike)."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the student has no trainable parameters")
    groups: list[dict[str, object]] = [{"params": params}]
    if schedule is not None:
        groups.append({"params": list(schedule.parameters()), "lr": schedule_lr, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def clip_gradients(module: nn.Module, schedule: nn.Module | None, cap: float) -> tuple[float, float | None]:
    """Cap the weights' gradient norm and, on its own, the learned schedule's; returns both norms before the cap.

    Why apart: the weights' norm is 5-17 on the digits model (so every step is capped at 1), the sigmas' 0.1-0.3;
    capped together the sigmas' share would vanish, and uncapped a spike (a batch near a mode boundary: the weights'
    norm topped 300 in one step) moved the sigmas for tens of steps and raised test E (docs/phase2.md)."""
    weights = float(torch.nn.utils.clip_grad_norm_(module.parameters(), cap))
    sigmas = None if schedule is None else float(torch.nn.utils.clip_grad_norm_(schedule.parameters(), cap))
    return weights, sigmas


def make_scheduler(
    optimizer: torch.optim.Optimizer, clock: Clock, *, warmup_steps: int, lr: float, lr_final: float,
    weights_from: Callable[[], int | None] = lambda: 0,
) -> LambdaLR:
    """LambdaLR whose factor reads the clock's training progress (see the module docstring).

    With a second group (a learned schedule, `make_optimizer`), the weights' rate is 0 until the step
    `weights_from()` returns (None: not yet) and their warm-up starts there, while the schedule's group trains
    from step 0 (`phase2.schedule_first_steps`: the sigmas settle before the weights adapt to them)."""

    def factor(step: int) -> float:
        return lr_factor(step, clock.train_progress, warmup_steps=warmup_steps, lr=lr, lr_final=lr_final)

    def weights_factor(step: int) -> float:
        start = weights_from()
        return 0.0 if start is None or step < start else factor(step - start)

    return LambdaLR(optimizer, factor if len(optimizer.param_groups) == 1 else [weights_factor, factor])


def _ema_with_warmup(decay: float) -> Callable[..., None]:
    """torch's EMA update with the decay ramped up as min(decay, (1 + n) / (10 + n)) over the first updates.

    Why: a round may run only ~100 optimizer steps; a fixed 0.99 would leave the average dominated by the
    untouched starting weights for most of it.
    """

    def update(ema_params: list[torch.Tensor], params: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
        n = float(n_averaged)
        get_ema_multi_avg_fn(min(decay, (1.0 + n) / (10.0 + n)))(ema_params, params, n_averaged)

    return update


def _skip_shared(update: Callable[..., None]) -> Callable[..., None]:
    """`update` over the pairs whose tensors differ (a tensor the copy shares with the student averages to itself)."""

    def skip(ema_params: list[torch.Tensor], params: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
        pairs = [(e, p) for e, p in zip(ema_params, params, strict=True) if e.data_ptr() != p.data_ptr()]
        if pairs:
            update([e for e, _ in pairs], [p for _, p in pairs], n_averaged)

    return skip


def make_ema(module: nn.Module, *, decay: float, share_frozen: bool = False) -> AveragedModel:
    """An EMA of the student (`AveragedModel`, buffers averaged too, so its module's state dict is complete).

    `share_frozen`: the copy shares the student's frozen parameters instead of copying them (a LoRA round: only the
    adapters train, so the average of the base weights is the base weights; `fewstep_search.phase2.lora`)."""
    if not share_frozen:
        ema = AveragedModel(module, multi_avg_fn=_ema_with_warmup(decay), use_buffers=True)
    else:
        memo: dict[int, object] = {id(p): p for p in module.parameters() if not p.requires_grad}
        ema = AveragedModel(nn.Identity(), multi_avg_fn=_skip_shared(_ema_with_warmup(decay)), use_buffers=True)
        ema.module = copy.deepcopy(module, memo)
    ema.eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema
