"""`fine_tune`: one Phase-2 round, on Ray Train (`engine="ray"`) or in process (`engine="local"`).

The driver's side: validate (a model without trainable weights is refused with one line), compute the per-step
loss weights from the bank's gains, ship the worker config, resume from the round folder, show progress, and
collect the result. The per-worker loop is `fewstep_search.phase2.worker.run_worker`, the same function for both
engines. Ray is imported lazily and only here.

Ray Train specifics: `TorchTrainer` with `ScalingConfig(num_workers=W, use_gpu=device is CUDA)` (gloo on CPU,
NCCL on GPUs, `prepare_model` wraps DDP where W > 1); each epoch's checkpoint folder is written by rank 0 inside
Ray's run folder (`out_dir/checkpoints`) and reported as a `ray.train.Checkpoint` without a copy; a restart
resumes from the newest complete one. If Ray is not running, a local one is started and stopped after.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

from fewstep_search.atomic import atomic_path, atomic_write_json
from fewstep_search.bank import Bank
from fewstep_search.candidate import Candidate
from fewstep_search.denoiser import is_conditional
from fewstep_search.models.source import ModelSource, trainable_module
from fewstep_search.objectives import check_endpoints
from fewstep_search.phase2 import checkpoints as ck
from fewstep_search.phase2.learned_schedule import round_start
from fewstep_search.phase2.loss import rms_gain, step_weights
from fewstep_search.phase2.pool import untimed_pool_size
from fewstep_search.phase2.pool_fill import FILL_FILE, FILL_PROGRESS, read_fill_progress
from fewstep_search.phase2.result import FineTuneResult
from fewstep_search.phase2.steps import FIRST_ORDER_SOLVERS, check_phase2_solver
from fewstep_search.phase2.worker import LocalContext, WorkerConfig, run_worker
from fewstep_search.schedules import Schedule
from fewstep_search.study.phase2 import Phase2Spec

__all__ = ["FineTuneResult", "fine_tune", "eval_bank", "scaling_kwargs"]

Engine = Literal["ray", "local"]


def eval_bank(part: Bank) -> Bank:
    """A trajectory set reduced to what the true error needs (x_start, x_end, cond, grid): small to ship."""
    slim = part.lean()
    return dataclasses.replace(slim, denoised=slim.denoised[:, :0], phi=slim.phi[:, :0])


CONFIG_KEY_VERSION = 2
"""Raised when what a round computes for the same settings changes, so a round of an older version is trained
again instead of being reused (2: the sampler's last step goes into 0)."""


def _config_key(teacher: ModelSource, student: ModelSource, sigmas: tuple[float, ...], spec: Phase2Spec,
                solver: str) -> str:
    """What makes two calls the same round: the key's version, the models, the schedule, the solver, and the
    settings that change the weights (a budget only stops the round earlier; settings a round does not use are
    left out, so changing them does not start it again)."""
    settings = spec.model_dump(exclude={"max_minutes", "max_steps", "clock", "keep_checkpoints", "eval_batch_size",
                                        "train_for"})  # train_for: the loop's choice of solver, keyed below
    if spec.pool_size == "auto" and (fixed := untimed_pool_size(spec)) is not None:
        settings["pool_size"] = fixed  # what "auto" is there
    if settings["pool_size"] != "auto":
        del settings["teacher_share"]  # it sizes an "auto" pool only
    if spec.end_to_end_weight == 0:
        del settings["end_to_end_teacher_steps"], settings["end_to_end_loss"]  # no end-to-end term
    if not spec.trains_schedule:
        for unused in ("schedule_lr", "schedule_start", "schedule_first_steps"):
            del settings[unused]  # a fixed schedule
    parts: list[Any] = [CONFIG_KEY_VERSION, teacher.model_id, student.model_id, list(sigmas), solver, settings]
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _check_trainable(student: ModelSource) -> Any:
    den = student.load()
    if trainable_module(den) is None:
        raise ValueError(
            f"model {student.model_id} has no trainable weights (not a torch.nn.Module): Phase-2 cannot fine-tune it"
        )
    return den


def fine_tune(
    *,
    teacher: ModelSource,
    student: ModelSource,
    schedule: Schedule,
    bank: Bank,
    spec: Phase2Spec,
    out_dir: str | Path,
    device: str = "cpu",
    engine: Engine = "ray",
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = False,
) -> FineTuneResult:
    """Fine-tune `student` on the N sigmas of `schedule` against the frozen `teacher` (one Phase-2 round).

    The schedule's solver is the sampler the student is trained for and scored with: DDIM (Euler), or iPNDM,
    whose multistep updates the per-step targets account for (`fewstep_search.phase2.steps`).

    Writes checkpoints under `out_dir` and the result `out_dir/model.safetensors` (the EMA weights of exactly the
    module `trainable_module` returns); calling it again with the same `out_dir` resumes an interrupted round or
    returns a finished one. Raises ValueError (one line) for a model without trainable weights, a schedule that
    does not match the bank, or an `out_dir` that holds another round.
    """
    if engine not in ("ray", "local"):
        raise ValueError(f"engine must be 'ray' or 'local', got {engine!r}")
    solver = schedule.solver
    check_phase2_solver(solver)
    if solver not in FIRST_ORDER_SOLVERS and spec.teacher_forced_fraction > 0:
        raise ValueError(f"teacher_forced_fraction follows DDIM steps; the round trains {solver}")
    den = _check_trainable(student)
    sig = schedule.tensor()
    check_endpoints(bank, sig)
    root = Path(out_dir).resolve()  # Ray Train refuses relative checkpoint paths (make demo: --out runs/demo)
    sigmas = tuple(float(s) for s in schedule.sigmas)
    key = _config_key(teacher, student, sigmas, spec, solver)
    done = root / ck.RESULT_FILE
    if done.is_file():
        data = json.loads(done.read_text())
        if data.get("config_key") != key:
            raise ValueError(f"{root} holds a Phase-2 round of another model, schedule or settings; use a new out_dir")
        return FineTuneResult.from_dict(data, root)
    latest = ck.latest_checkpoint(root)
    cfg = WorkerConfig(
        teacher=teacher, student=student, sigmas=sigmas, weights=tuple(step_weights(bank, sig, solver).tolist()),
        node_weights=tuple(rms_gain(bank, sig[1:-1]).tolist()),
        select=eval_bank(bank.select()), test=eval_bank(bank.test()), shape=bank.shape, spec=spec,
        out_dir=str(root), device=device, resume_from=None if latest is None else str(latest), config_key=key,
        n_conditions=len(den.conditions) if is_conditional(den) else 0, solver=solver,
        train_conditions=bank.fit_conditions(),
        start_sigmas=round_start(sigmas, spec.schedule_start, fine_tuned=student.model_id != teacher.model_id),
    )
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with _Progress(root, spec, on_epoch, enabled=progress, watch_files=engine == "ray") as watch:
        if engine == "local":
            summary = run_worker(cfg, LocalContext(device, on_report=watch.local_report))
        else:
            summary = _run_ray(cfg, spec, device)
    return _finish(root, summary, key, time.monotonic() - started)


def train_pair(pair: Candidate, *, teacher: ModelSource, student: ModelSource, bank: Bank, spec: Phase2Spec,
               out_dir: str | Path, round: int, **options: Any) -> tuple[Candidate, FineTuneResult]:
    """Phase-2 on a pair: fine-tune `student` for `pair`'s schedule and solver (`fine_tune`; `options` are its
    device, engine, on_epoch, progress). Returns round `round`'s pair, its weights the round's EMA weights and its
    schedule the one the round ended with (its own sigmas when it trained them), unscored, and the round's record.
    """
    result = fine_tune(teacher=teacher, student=student, schedule=pair.schedule, bank=bank, spec=spec,
                       out_dir=out_dir, **options)
    schedule = pair.schedule if result.sigmas is None else dataclasses.replace(pair.schedule, sigmas=result.sigmas)
    return pair.fine_tuned(round=round, weights=Path(result.checkpoint), schedule=schedule), result


def _finish(root: Path, summary: dict[str, Any], key: str, seconds: float) -> FineTuneResult:
    """Publish the last good EMA weights as `model.safetensors` and record the round in `result.json`."""
    state: ck.TrainState = summary["state"]
    if summary["checkpoint"] is not None:
        weights = ck.load_state_dict_file(Path(summary["checkpoint"]) / ck.MODEL_FILE)
    else:
        weights = summary["start_weights"]
    path = ck.publish_model(root, weights)
    adapters = None if summary["checkpoint"] is None else Path(summary["checkpoint"]) / ck.ADAPTERS_FILE
    if adapters is not None and adapters.is_file():  # a LoRA round: its adapters go beside its merged weights
        with atomic_path(root / ck.ADAPTERS_FILE) as tmp:
            shutil.copyfile(adapters, tmp)
    result = FineTuneResult(
        checkpoint=path, history=list(state.history or []), stopped_reason=summary["stopped_reason"],
        seconds=state.seconds if state.history else seconds, initial=summary.get("initial") or state.initial,
        teacher_calls=state.teacher_calls, steps=state.step, wall_seconds=state.wall_seconds or seconds, out_dir=root,
        train_from=state.train_from or 0.0, notes=_round_notes(state, summary["stopped_reason"]),
    )
    atomic_write_json(root / ck.RESULT_FILE, {**result.to_dict(), "config_key": key})
    for name in (FILL_FILE, FILL_PROGRESS):  # the checkpoints hold the pool from the first epoch on
        (root / name).unlink(missing_ok=True)
    return result


def _round_notes(state: ck.TrainState, stopped: str | None) -> list[str]:
    """One line each for a pool cut at the fill's deadline and for a round that took no optimizer step."""
    notes = []
    if state.pool_used is not None and state.pool_size is not None:
        notes.append(f"the teacher solved {state.pool_used} of {state.pool_size} pool samples (per worker) by the "
                     f"fill's deadline, {state.train_from or 0:.0f} s into the round (the machine ran slower than "
                     "when the pool was sized); the round trained on those")
    if state.step == 0 and stopped is None:
        notes.append("no optimizer step fitted in the budget: the round's weights are its starting ones (raise "
                     "phase2.max_minutes)")
    return notes


# ------------------------------------------------------------------ Ray Train


def _ray_loop(config: dict[str, Any]) -> None:
    """Ray Train's `train_loop_per_worker`: `run_worker` with a Ray context; rank 0 leaves its summary on disk."""
    cfg: WorkerConfig = config["cfg"]
    threads = config.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    ctx = _RayContext(cfg.device)
    summary = run_worker(cfg, ctx)
    if ctx.rank == 0:
        _save_summary(Path(cfg.out_dir), summary)


class _RayContext:
    """The Ray Train side of `WorkerContext`: rank and device from Ray, DDP via `prepare_model`, reports."""

    def __init__(self, device: str) -> None:
        import ray.train

        tc = ray.train.get_context()
        self.rank, self.world_size = tc.get_world_rank(), tc.get_world_size()
        self._cuda = torch.device(device).type == "cuda"

    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device() if self._cuda else torch.device("cpu")

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        if self.world_size == 1:
            return module
        return ray.train.torch.prepare_model(module, move_to_device=False)

    def restored(self) -> Path | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        return None if ckpt is None else Path(ckpt.path)

    def any_flag(self, flags: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return flags
        import torch.distributed as dist

        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return flags

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        import ray.train

        ckpt = None if checkpoint is None else ray.train.Checkpoint.from_directory(str(checkpoint))
        ray.train.report(
            {k: v for k, v in metrics.items() if not isinstance(v, list)}, checkpoint=ckpt,
            checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD,
        )


_SUMMARY = "summary.pt"


def _save_summary(root: Path, summary: dict[str, Any]) -> None:
    from fewstep_search.atomic import atomic_path

    data = {**summary, "state": summary["state"].to_dict()}
    with atomic_path(root / _SUMMARY) as tmp:
        torch.save(data, tmp)


def _load_summary(root: Path) -> dict[str, Any]:
    data = torch.load(root / _SUMMARY, map_location="cpu", weights_only=True)
    (root / _SUMMARY).unlink()
    return {**data, "state": ck.TrainState.from_dict(data["state"])}


def scaling_kwargs(device: str, *, workers: int, cpus: int) -> dict[str, Any]:
    """`ScalingConfig` arguments: whole GPUs per worker on CUDA, else `cpus` CPUs (torch threads) per worker."""
    if torch.device(device).type == "cuda":
        return {"num_workers": workers, "use_gpu": True}
    return {"num_workers": workers, "use_gpu": False, "resources_per_worker": {"CPU": cpus}}


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
"""Ray Train's checkpoint record in the run folder (Ray 2.x, `ray.train.v2`)."""


def _run_ray(cfg: WorkerConfig, spec: Phase2Spec, device: str) -> dict[str, Any]:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from fewstep_search.ray_runtime import ray_session

    use_gpu = torch.device(device).type == "cuda"
    with ray_session(workers=max(spec.workers, os.cpu_count() or 1)):
        cpus = spec.cpus_per_worker or max(1, int(ray.available_resources().get("CPU", 1)) // spec.workers)
        trainer = TorchTrainer(
            _ray_loop,
            train_loop_config={"cfg": cfg, "threads": None if use_gpu else cpus},
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(**scaling_kwargs(device, workers=spec.workers, cpus=cpus)),
            run_config=RunConfig(
                name=ck.CHECKPOINTS, storage_path=str(Path(cfg.out_dir).resolve()),
                checkpoint_config=CheckpointConfig(num_to_keep=None), failure_config=FailureConfig(max_failures=0),
            ),
        )
        # Ray Train's own record of the run lists every epoch it saw, including those `prune_checkpoints` has
        # deleted, and refuses to restart from it ("corrupted run directory"); the round resumes from its own
        # newest checkpoint (`cfg.resume_from`), so Ray's record is not needed.
        (Path(cfg.out_dir).resolve() / ck.CHECKPOINTS / RAY_SNAPSHOT).unlink(missing_ok=True)
        trainer.fit()
        return _load_summary(Path(cfg.out_dir))


# ------------------------------------------------------------------ progress


class _Progress:
    """Calls `on_epoch` once per finished epoch and keeps a rich progress line (loss, E) when enabled.

    Local engine: the worker reports in process. Ray engine: the workers run elsewhere, so a thread watches the
    round folder's `epochs.jsonl` (one line per epoch, written by rank 0).
    """

    def __init__(self, root: Path, spec: Phase2Spec, on_epoch: Callable[[dict[str, Any]], None] | None,
                 *, enabled: bool, watch_files: bool) -> None:
        self.root, self.spec, self.on_epoch, self.enabled = root, spec, on_epoch, enabled
        self.watch_files = watch_files
        self.seen = {int(r["epoch"]) for r in ck.read_epochs(root)}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar: Any = None
        self._task: Any = None
        self._lock = threading.Lock()

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), transient=True)
            self._bar.start()
            total = self.spec.max_steps or 60.0 * self.spec.max_minutes
            self._task = self._bar.add_task("phase-2: starting", total=total)
        if self.watch_files or self.enabled:
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._poll()
        if self._bar is not None:
            self._bar.stop()

    def local_report(self, metrics: dict[str, Any]) -> None:
        self._deliver(metrics)

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            self._poll()

    def _poll(self) -> None:
        if self.watch_files:
            for row in ck.read_epochs(self.root):
                self._deliver(row)
        if self._bar is not None and not self.seen and (fill := read_fill_progress(self.root)) is not None:
            with self._lock:
                self._bar.update(self._task, description=f"phase-2: the teacher solves the noise pool's end "
                                                         f"points ({fill['solved']}/{fill['size']})")

    def _deliver(self, metrics: dict[str, Any]) -> None:
        with self._lock:
            epoch = int(metrics["epoch"])
            if epoch in self.seen:
                return
            self.seen.add(epoch)
            if self._bar is not None:
                done = metrics["step"] if self.spec.max_steps else metrics.get("seconds", 0.0)
                desc = (f"phase-2 epoch {epoch}: loss {metrics['loss']:.4g}, "
                        f"test E {metrics.get('test_error', float('nan')):.4f}")
                self._bar.update(self._task, completed=done, description=desc)
            if self.on_epoch is not None:
                self.on_epoch(dict(metrics))
