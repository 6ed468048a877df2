"""The per-worker Phase-2 training loop: the same function under Ray Train and in process (`engine="local"`).

What one worker does (docs/design.md section 1, Phase-2; docs/phase2.md):
1. obtain the frozen teacher and a private, trainable copy of the student from their `ModelSource`s;
2. resume from the newest checkpoint of the round (Ray's restored one or the round folder's), if any;
3. train: draw a batch of starting noise from the worker's fixed pool, build the per-step distillation loss
   (teacher-forced during the warm start, then along the student's own states), AdamW step with gradient
   clipping, LR schedule, EMA update;
4. after each epoch: the EMA student's true error E on the bank's select and test trajectories, a checkpoint
   (rank 0), a report; stop at the budget or at the first non-finite loss (keeping the last good checkpoint).

Engine specifics (rank, device, DDP wrapping, reporting) come through a small `WorkerContext`, so this module
never imports Ray. Writing the round's result (`model.safetensors`, `result.json`) is `finish_round`'s job.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from fewstep_search.bank import Bank
from fewstep_search.denoiser import ModelOutputError, bind_condition, is_conditional
from fewstep_search.models.source import ModelSource
from fewstep_search.phase2 import checkpoints as ck
from fewstep_search.phase2.evaluate import end_point_teacher, student_errors
from fewstep_search.phase2.learned_schedule import (
    LearnedSchedule,
    restore_schedule,
    schedule_checkpoint,
    schedule_only_over,
)
from fewstep_search.phase2.loss import (
    LossParts,
    StudentChain,
    bind_student,
    end_to_end_error,
    fixed_state_loss,
    path_error,
    student_state_targets,
    teacher_forced_loss,
)
from fewstep_search.phase2.models import load_round_models
from fewstep_search.phase2.optim import Clock, clip_gradients, make_ema, make_optimizer, make_scheduler
from fewstep_search.phase2.pool import SAVE_LIMIT_BYTES, NoisePool, draw_conditions
from fewstep_search.phase2.pool_fill import fill_deadline, fill_end_points, read_fill, timed_pool_size
from fewstep_search.phase2.targets import CountingDenoiser, IntervalTeacher
from fewstep_search.study.phase2 import Phase2Spec

__all__ = ["WorkerConfig", "WorkerContext", "LocalContext", "run_worker"]


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs (picklable: it travels as Ray Train's `train_loop_config`)."""

    teacher: ModelSource
    student: ModelSource
    sigmas: tuple[float, ...]
    weights: tuple[float, ...]
    select: Bank
    test: Bank
    shape: tuple[int, ...]
    spec: Phase2Spec
    out_dir: str
    device: str = "cpu"
    resume_from: str | None = None
    config_key: str = ""
    n_conditions: int = 0
    train_conditions: tuple[int, ...] = ()
    """The conditions trained on: the fit set's (`Bank.fit_conditions`; a prompt set's test prompts never train)."""
    solver: str = "ddim"
    node_weights: tuple[float, ...] = ()
    """phi at the schedule's interior nodes (the path term's weights; from the bank, like `weights`)."""
    start_sigmas: tuple[float, ...] = ()
    """Where a trained schedule starts (`learned_schedule.round_start`); empty: `sigmas`."""


class WorkerContext(Protocol):
    """What differs between engines: who this worker is, where it runs, how it wraps and reports."""

    rank: int
    world_size: int

    def device(self) -> torch.device: ...

    def prepare(self, module: nn.Module) -> nn.Module: ...

    def restored(self) -> Path | None: ...

    def any_flag(self, flags: Tensor) -> Tensor: ...

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None: ...


class LocalContext:
    """The in-process engine: one worker, no wrapping; reports go to a callback."""

    rank, world_size = 0, 1

    def __init__(self, device: str, on_report: Callable[[dict[str, Any]], None] | None = None) -> None:
        self._device = torch.device(device)
        self._on_report = on_report

    def device(self) -> torch.device:
        return self._device

    def prepare(self, module: nn.Module) -> nn.Module:
        return module

    def restored(self) -> Path | None:
        return None

    def any_flag(self, flags: Tensor) -> Tensor:
        return flags

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        if self._on_report is not None:
            self._on_report(metrics)


def _evaluate(den: Any, cfg: WorkerConfig, device: torch.device,
              schedule: LearnedSchedule | None = None) -> dict[str, Any]:
    """Select and test E of `den` on the round's schedule (a learned one as it is now, its sigmas logged too)."""
    sigmas = cfg.sigmas if schedule is None else schedule.values()
    out: dict[str, Any] = student_errors(den, cfg.select, cfg.test, sigmas, device=device, solver=cfg.solver,
                                         batch_size=cfg.spec.eval_batch_size)
    return out if schedule is None else {**out, "sigmas": list(sigmas)}


class _Stop(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def run_worker(cfg: WorkerConfig, ctx: WorkerContext) -> dict[str, Any]:
    """Train one round on this worker; returns rank 0's summary (state, stop reason, last checkpoint)."""
    spec, device, root = cfg.spec, ctx.device(), Path(cfg.out_dir)
    torch.manual_seed(spec.seed + 7919 * ctx.rank)
    models = load_round_models(cfg.teacher, cfg.student, device, spec)
    teacher_den, module = models.teacher, models.module
    counter = CountingDenoiser(teacher_den)
    if is_conditional(teacher_den):
        counter.conditions = teacher_den.conditions  # type: ignore[attr-defined]
    teacher = IntervalTeacher(counter, cfg.sigmas, spec.max_log_step, spec.teacher_solver,
                              first_max_log_step=spec.first_max_log_step if spec.pool_size is not None else None)
    ema = make_ema(module, decay=spec.ema_decay, share_frozen=models.lora)
    learned = LearnedSchedule(cfg.start_sigmas or cfg.sigmas).to(device) if spec.trains_schedule else None
    # the sigmas' own EMA, the one evaluated and returned: the pair is (EMA weights, EMA sigmas)
    learned_ema = None if learned is None else make_ema(learned, decay=spec.ema_decay)
    optimizer = make_optimizer(module, lr=spec.lr, weight_decay=spec.weight_decay, schedule=learned,
                               schedule_lr=spec.schedule_lr)
    state = ck.TrainState(history=[], config_key=cfg.config_key)
    resume = _pick_resume(ctx.restored(), cfg.resume_from)
    saved = ck.read_checkpoint(resume) if resume is not None else None
    if saved is not None:
        state = saved.state
        if state.config_key != cfg.config_key:
            raise ValueError(f"checkpoint {resume} belongs to another Phase-2 configuration; use a new out_dir")
    # the end-to-end term alone solves its pool's end points before training (`pool_fill`); a fill cut short by a
    # kill before the first checkpoint is read back with its clock and its pool size
    fills_first = spec.per_step_weight == 0 and spec.pool_size is not None
    fill = read_fill(root, cfg.config_key) if saved is None and fills_first and ctx.world_size == 1 else None
    if fill is not None:
        state.seconds, state.wall_seconds, state.pool_size = fill.seconds, fill.wall_seconds, fill.pool_size
    clock = Clock(budget_seconds=60.0 * spec.max_minutes, max_steps=spec.max_steps, seconds_before=state.seconds,
                  wall_before=state.wall_seconds, kind=spec.clock)
    clock.step = state.step
    if saved is None:
        state.weights_from = None if spec.weights_wait > 0 else 0
    scheduler = make_scheduler(optimizer, clock, warmup_steps=spec.warmup_steps, lr=spec.lr, lr_final=spec.lr_final,
                               weights_from=lambda: state.weights_from)
    if saved is not None:  # after the scheduler exists: its constructor rewrites the optimizer's lr
        models.restore(ema.module, saved)
        ema.n_averaged.fill_(int(saved.optimizer["ema_updates"]))
        optimizer.load_state_dict(saved.optimizer["optimizer"])
        if learned is not None and learned_ema is not None:
            restore_schedule(learned, learned_ema, saved.optimizer)
        scheduler.load_state_dict(saved.optimizer["scheduler"])
    autocast = spec.autocast and (device.type == "cuda" or (device.type == "cpu" and spec.cpu_autocast))
    chain = (StudentChain(module, cfg.sigmas, cfg.solver, autocast, states=spec.path_weight > 0, schedule=learned)
             if spec.end_to_end_weight > 0 else None)
    # the one module a step's backward runs through: the chain when it is the whole loss (per_step_weight = 0
    # implies end_to_end_weight > 0, Phase2Spec checks it), else the student
    model = ctx.prepare(chain if spec.per_step_weight == 0 else module)
    if spec.per_step_weight == 0:
        chain = model
    weights = torch.tensor(cfg.weights, dtype=torch.float32, device=device)
    node_weights = torch.tensor(cfg.node_weights, dtype=torch.float32, device=device)
    world = ctx.world_size
    batch = max(1, math.ceil(spec.batch_size / world))
    if resume is None and ctx.rank == 0:
        state.history = []
        state.initial = _evaluate(ema.module, cfg, device)
    if spec.end_to_end_weight > 0:  # before the pool is sized: "auto" steps set what a sample costs
        teacher = end_point_teacher(teacher, spec.end_to_end_teacher_steps, state.initial, cfg.select, device,
                                    ctx.any_flag)
    if state.pool_size is None:
        state.pool_size = timed_pool_size(
            spec, teacher=teacher, shape=cfg.shape, batch=batch, dtype=cfg.select.x_start.dtype, device=device,
            n_conditions=cfg.n_conditions, clock=clock, world=world,
            agree=lambda size: -float(ctx.any_flag(torch.tensor([-size], device=device))[0]))
    pool = NoisePool(
        state.pool_size, cfg.shape, cfg.sigmas[0],
        seed=spec.seed * 1009 + ctx.rank, device=device, dtype=cfg.select.x_start.dtype,
        conditions=cfg.train_conditions, keep_path=spec.path_weight > 0,
    )
    if state.pool_used is not None:  # a resumed round whose fill stopped at its deadline: the same prefix
        pool.truncate(state.pool_used)
    if saved is not None and saved.pool is not None and ctx.world_size == 1:
        pool.load_cache_state(saved.pool)
    elif fill is not None:
        pool.load_cache_state(fill.cache)
    fresh = spec.pool_size is None  # no reuse: new noise every step (the plain baseline)
    if fills_first and saved is None:
        solved = fill_end_points(pool, teacher, clock=clock, chunk=FILL_CHUNK_BATCHES * batch, root=root,
                                 config_key=cfg.config_key, report=ctx.rank == 0, save=ctx.world_size == 1,
                                 deadline=fill_deadline(spec, clock))
        state.train_from = float(ctx.any_flag(torch.tensor([clock.seconds], device=device))[0])  # the latest
        keep = int(-ctx.any_flag(torch.tensor([-float(solved)], device=device))[0])  # the fewest any worker solved
        none_solved = keep == 0
        if 0 < keep < pool.size:
            pool.keep_solved_prefix(keep)
            state.pool_used = keep
    else:
        none_solved = False
    clock.train_from = state.train_from or 0.0  # rounds checkpointed before the fill existed: the whole budget
    last_ckpt, stopped = resume, None
    try:
        if none_solved:
            raise _Stop(f"the teacher solved no pool sample in {state.train_from:.0f} s of the round's "
                        f"{clock.budget:.0f} s; raise phase2.max_minutes")
        while not clock.done:
            sums: dict[str, Any] = {"loss": 0.0, "per_step": torch.zeros(len(cfg.sigmas) - 1), "grad": 0.0, "n": 0,
                                    "schedule_grad": 0.0}
            mode = "student"
            for _ in range(spec.steps_per_epoch):
                flags = torch.tensor([0.0, float(clock.done)], device=device)
                if bool(ctx.any_flag(flags)[1]):
                    break
                mode = "forced" if clock.progress < spec.teacher_forced_fraction else "student"
                parts = _step_loss(cfg, pool, teacher, model, module, chain, weights, clock.step, batch, mode,
                                   fresh, autocast, node_weights)
                bad = not bool(torch.isfinite(parts.total))
                flags = ctx.any_flag(torch.tensor([float(bad), 0.0], device=device))
                if bool(flags[0]):
                    raise _Stop(f"non-finite loss at step {clock.step + 1}")
                optimizer.zero_grad(set_to_none=True)
                parts.total.backward()
                grad, schedule_grad = clip_gradients(module, learned, spec.grad_clip)
                optimizer.step()
                clock.step += 1
                if state.weights_from is None:  # a schedule-only start: over on any worker's word
                    due = schedule_only_over(clock.step, spec.weights_wait, clock.train_progress)
                    if bool(ctx.any_flag(torch.tensor([float(due)], device=device))[0]):
                        state.weights_from = clock.step  # before scheduler.step(): it sets the next step's rates
                scheduler.step()
                if state.weights_from is not None and clock.step > state.weights_from:  # the weights moved
                    ema.update_parameters(module)
                if learned_ema is not None:
                    learned_ema.update_parameters(learned)
                sums["loss"] += float(parts.total.detach())
                sums["per_step"] += parts.per_step.float().cpu()
                sums["grad"] += grad
                sums["schedule_grad"] += schedule_grad or 0.0
                sums["n"] += 1
            if sums["n"] == 0:
                break
            state.epoch += 1
            state.step = clock.step
            state.seconds = clock.seconds
            state.wall_seconds = clock.wall_seconds
            state.teacher_calls += counter.sample_calls
            counter.sample_calls = 0
            metrics = {
                "epoch": state.epoch, "step": state.step, "loss": sums["loss"] / sums["n"],
                "per_step_loss": (sums["per_step"] / sums["n"]).tolist(), "grad_norm": sums["grad"] / sums["n"],
                **({"schedule_grad_norm": sums["schedule_grad"] / sums["n"]} if learned is not None else {}),
                "lr": float(optimizer.param_groups[0]["lr"]), "mode": mode,
                "teacher_calls": _all_calls(ctx, state.teacher_calls, device),
                "pool_size": None if fresh else pool.size * world,
            }
            folder = None
            if ctx.rank == 0:
                metrics.update(_evaluate(ema.module, cfg, device, None if learned_ema is None else learned_ema.module))
                metrics["seconds"] = clock.seconds
                metrics["wall_seconds"] = clock.wall_seconds
                state.history = [*(state.history or []), metrics]
                folder = ck.write_checkpoint(
                    root, ema_state=models.result_state(ema.module), student_state=models.student_state(module),
                    adapters_state=models.adapters_state(ema.module),
                    optimizer_state={"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                     "ema_updates": int(ema.n_averaged),
                                     **schedule_checkpoint(learned, learned_ema)},
                    state=state, pool_state=_pool_state(pool, ctx.world_size),
                )
                ck.prune_checkpoints(root, spec.keep_checkpoints)
                _append_epoch(root, metrics)
                last_ckpt = folder
            ctx.report(metrics, folder)
    except ModelOutputError as exc:
        stopped = f"the model returned NaN/inf during training ({exc})"
    except _Stop as stop:
        stopped = stop.reason
    if stopped is not None:
        kept = f"kept the checkpoint of epoch {state.epoch}" if last_ckpt is not None else "kept the starting weights"
        stopped = f"{stopped}; {kept}"
    return {
        "state": state, "stopped_reason": stopped, "checkpoint": None if last_ckpt is None else str(last_ckpt),
        "initial": state.initial, "start_weights": None if last_ckpt else models.result_state(ema.module),
    }


FILL_CHUNK_BATCHES = 4
"""Training batches of pool samples per batched teacher solve of the up-front fill."""


def _pool_state(pool: NoisePool, world_size: int) -> dict[str, Tensor] | None:
    """The pool's caches for the checkpoint: one worker only (rank 0 writes the folder), and only if small.

    Without them a resumed round recomputes the caches with the current student, so it is no longer bitwise
    the uninterrupted run (it stays within noise of it).
    """
    if world_size != 1 or pool.cache_bytes() > SAVE_LIMIT_BYTES:
        return None
    return pool.cache_state()


def _pick_resume(restored: Path | None, resume_from: str | None) -> Path | None:
    """The newer of Ray's restored checkpoint and the round folder's newest complete one."""
    options = [Path(p) for p in (restored, resume_from) if p is not None and (Path(p) / "state.json").is_file()]
    return max(options, key=lambda p: p.name) if options else None


def _all_calls(ctx: WorkerContext, calls: int, device: torch.device) -> int:
    """Teacher sample-calls summed over workers (each worker counts its own)."""
    if ctx.world_size == 1:
        return calls
    import torch.distributed as dist

    t = torch.tensor([float(calls)], device=device)
    dist.all_reduce(t)
    return int(t.item())


def _append_epoch(root: Path, metrics: dict[str, Any]) -> None:
    import json

    with open(root / ck.EPOCHS_FILE, "a") as f:
        f.write(json.dumps(metrics) + "\n")
        f.flush()


def _step_loss(
    cfg: WorkerConfig, pool: NoisePool, teacher: IntervalTeacher, model: nn.Module, module: nn.Module,
    chain: nn.Module | None, weights: Tensor, step: int, batch: int, mode: str, fresh: bool, autocast: bool,
    node_weights: Tensor,
) -> LossParts:
    """One batch's loss (see `fewstep_search.phase2.loss`); the pool supplies noise and cached teacher work.

    Every mode ends in one batched forward of the (possibly DDP-wrapped) `model` over the N states: the states
    themselves come without gradients (the student's own DDIM chain through the bare `module`, or the
    teacher's trajectory), which is the loss's definition and what DDP needs (one forward per backward). The
    end-to-end term runs through `chain` (`loss.StudentChain`; DDP-wrapped as `model` when it is the whole loss).
    """
    spec = cfg.spec
    if fresh:
        g = torch.Generator().manual_seed(spec.seed * 100_003 + step)
        x = (cfg.sigmas[0] * torch.randn(batch, *cfg.shape, generator=g, dtype=torch.float64)).to(
            device=weights.device, dtype=cfg.select.x_start.dtype)
        cond = draw_conditions(cfg.train_conditions, batch, g)
        cond = None if cond is None else cond.to(weights.device)
        bound = teacher if cond is None else dataclasses.replace(teacher, teacher=bind_condition(teacher.teacher, cond))
        states, targets = student_state_targets(bind_student(module, cond, autocast), bound.target, x, cfg.sigmas,
                                                solver=cfg.solver)
        return fixed_state_loss(bind_student(model, cond, autocast), states, targets, cfg.sigmas, weights)
    idx = pool.indices(step, batch)
    x, cond = pool.x[idx.to(pool.x.device)], pool.conditions(idx)
    student = bind_student(model, cond, autocast)
    if spec.per_step_weight > 0:
        if mode == "forced":
            parts = teacher_forced_loss(student, pool.trajectories(teacher, idx), cfg.sigmas, weights)
        else:

            def compute(todo: Tensor) -> tuple[Tensor, Tensor]:
                first = pool.first_targets(teacher, todo) if spec.cache_first_target else None
                bare = bind_student(module, pool.conditions(todo), autocast)
                return student_state_targets(bare, pool.teacher_for(teacher, todo).target,
                                             pool.x[todo.to(pool.x.device)], cfg.sigmas, first_target=first,
                                             solver=cfg.solver)

            if spec.target_reuse > 1:
                states, targets = pool.reused_targets(idx, step, batch, spec.target_reuse, compute)
            else:
                states, targets = compute(idx)
            parts = fixed_state_loss(student, states, targets, cfg.sigmas, weights)
        parts = LossParts(total=spec.per_step_weight * parts.total, per_step=parts.per_step)
    else:  # the end-to-end term alone: no per-step targets, no student-state solves
        parts = LossParts(total=weights.new_zeros(()), per_step=torch.zeros(len(cfg.sigmas) - 1))
    if spec.end_to_end_weight > 0:
        assert chain is not None
        out = chain(x, cond)
        if spec.path_weight > 0:  # the chain returned every node's state
            goal = pool.path_points(teacher, idx)
            e2e = end_to_end_error(out[-1], goal[-1], spec.end_to_end_loss)
            total = e2e + spec.path_weight * path_error(out, goal, node_weights, spec.end_to_end_loss)
        else:
            e2e = end_to_end_error(out, pool.end_points(teacher, idx), spec.end_to_end_loss)
            total = e2e
        parts = LossParts(total=parts.total + spec.end_to_end_weight * total, per_step=parts.per_step,
                          end_to_end=e2e.detach())
    return parts
