"""Phase-2 checkpoints: one folder per finished epoch, written atomically, loaded without unpickling code.

Layout of a round's `out_dir`:

    checkpoints/epoch_000012/   model.safetensors    EMA weights (the round's result format: the state dict of
                                                     exactly the module `trainable_module` returns, keys unchanged)
                                student.safetensors  the raw (non-averaged) student weights
                                optimizer.pt         AdamW + LR-scheduler state (torch.load(weights_only=True))
                                pool.safetensors     the noise pool's cached teacher / student work (if small)
                                adapters.safetensors a LoRA round's EMA adapters (model.safetensors: merged)
                                state.json           step, epoch, seconds, teacher calls, history, config key
    epochs.jsonl                one line per finished epoch (what the driver shows while training runs)
    model.safetensors           the result, copied from the last good checkpoint when the round ends
    result.json                 the round's summary; its presence means "finished, do not train again"

Why a folder per epoch, renamed into place: a SIGKILL at any moment leaves either the previous complete epoch or
the new complete one, never a half-written checkpoint, so `latest_checkpoint` is always safe to resume from.
The same folder is what is reported to Ray Train as a `ray.train.Checkpoint` (it lives inside Ray's run folder,
so nothing is copied). Nothing here imports Ray.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fewstep_search.atomic import atomic_path, atomic_write_json

__all__ = [
    "CHECKPOINTS",
    "MODEL_FILE",
    "ADAPTERS_FILE",
    "RESULT_FILE",
    "EPOCHS_FILE",
    "TrainState",
    "Checkpoint",
    "state_dict_cpu",
    "save_state_dict",
    "load_state_dict_file",
    "write_checkpoint",
    "read_checkpoint",
    "latest_checkpoint",
    "prune_checkpoints",
    "publish_model",
    "read_epochs",
]

CHECKPOINTS = "checkpoints"
MODEL_FILE = "model.safetensors"
ADAPTERS_FILE = "adapters.safetensors"
STUDENT_FILE = "student.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
POOL_FILE = "pool.safetensors"
STATE_FILE = "state.json"
RESULT_FILE = "result.json"
EPOCHS_FILE = "epochs.jsonl"
_EPOCH_DIR = re.compile(r"^epoch_(\d{6})$")


@dataclass
class TrainState:
    """What a resumed worker needs besides the weights: counters, the clock, and the history so far."""

    epoch: int = 0
    step: int = 0
    seconds: float = 0.0
    wall_seconds: float = 0.0
    teacher_calls: int = 0
    history: list[dict[str, Any]] | None = None
    config_key: str = ""
    initial: dict[str, float] | None = None
    pool_size: int | None = None  # one worker's pool as resolved (pool_size = "auto" is timed once per round)
    train_from: float | None = None  # round seconds when training began (after the up-front teacher work)
    pool_used: int | None = None  # the solved prefix of the pool a fill cut at its deadline trains on
    weights_from: int | None = None  # the step the weights began to train (after a schedule-only start)

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "step": self.step, "seconds": self.seconds, "wall_seconds": self.wall_seconds,
            "teacher_calls": self.teacher_calls,
            "history": self.history or [], "config_key": self.config_key, "initial": self.initial,
            "pool_size": self.pool_size, "train_from": self.train_from, "pool_used": self.pool_used,
            "weights_from": self.weights_from,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        return cls(
            epoch=int(d["epoch"]), step=int(d["step"]), seconds=float(d["seconds"]),
            wall_seconds=float(d.get("wall_seconds", d["seconds"])),
            teacher_calls=int(d.get("teacher_calls", 0)), history=list(d.get("history", [])),
            config_key=str(d.get("config_key", "")), initial=d.get("initial"), pool_size=d.get("pool_size"),
            train_from=d.get("train_from"), pool_used=d.get("pool_used"),
            weights_from=d.get("weights_from", 0),  # checkpoints from before the option trained from step 0
        )


def state_dict_cpu(module: nn.Module) -> dict[str, Tensor]:
    """The module's state dict as independent contiguous CPU tensors (safetensors refuses shared storage)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def save_state_dict(state: dict[str, Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(state, str(tmp))


def load_state_dict_file(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(
    root: Path,
    *,
    ema_state: dict[str, Tensor],
    student_state: dict[str, Tensor],
    optimizer_state: dict[str, Any],
    state: TrainState,
    pool_state: dict[str, Tensor] | None = None,
    adapters_state: dict[str, Tensor] | None = None,
) -> Path:
    """Write `root/checkpoints/epoch_XXXXXX` atomically (temp folder + rename); returns the folder."""
    base = root / CHECKPOINTS
    base.mkdir(parents=True, exist_ok=True)
    final = base / f"epoch_{state.epoch:06d}"
    tmp = Path(tempfile.mkdtemp(dir=base, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        save_state_dict(ema_state, tmp / MODEL_FILE)
        save_state_dict(student_state, tmp / STUDENT_FILE)
        with atomic_path(tmp / OPTIMIZER_FILE) as p:
            torch.save(optimizer_state, p)
        if pool_state:
            save_state_dict(pool_state, tmp / POOL_FILE)
        if adapters_state:
            save_state_dict(adapters_state, tmp / ADAPTERS_FILE)
        atomic_write_json(tmp / STATE_FILE, state.to_dict())  # written last: a folder with it is complete
        os.chmod(tmp, 0o755)
        if final.exists():  # the same epoch redone after a crash between its write and the next
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(base)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


@dataclass
class Checkpoint:
    """A loaded epoch folder: tensors on CPU, nothing unpickled but plain containers and tensors."""

    ema: dict[str, Tensor]
    student: dict[str, Tensor]
    optimizer: dict[str, Any]
    state: TrainState
    pool: dict[str, Tensor] | None
    adapters: dict[str, Tensor] | None = None
    """A LoRA round's EMA adapters (`ema` then holds the merged weights)."""


def read_checkpoint(folder: Path) -> Checkpoint:
    """Load an epoch folder written by `write_checkpoint` (safetensors + torch.load(weights_only=True))."""
    folder = Path(folder)
    pool = folder / POOL_FILE
    return Checkpoint(
        ema=load_state_dict_file(folder / MODEL_FILE),
        student=load_state_dict_file(folder / STUDENT_FILE),
        optimizer=torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True),
        state=TrainState.from_dict(json.loads((folder / STATE_FILE).read_text())),
        pool=load_state_dict_file(pool) if pool.is_file() else None,
        adapters=load_state_dict_file(folder / ADAPTERS_FILE) if (folder / ADAPTERS_FILE).is_file() else None,
    )


def _epoch_dirs(root: Path) -> list[tuple[int, Path]]:
    base = Path(root) / CHECKPOINTS
    if not base.is_dir():
        return []
    found = []
    for p in base.iterdir():
        m = _EPOCH_DIR.match(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete epoch folder under `root/checkpoints`, or None."""
    dirs = _epoch_dirs(root)
    return dirs[-1][1] if dirs else None


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` epoch folders (and stale temp folders of a killed writer)."""
    dirs = _epoch_dirs(root)
    for _, p in dirs[: max(0, len(dirs) - keep)]:
        shutil.rmtree(p, ignore_errors=True)
    base = Path(root) / CHECKPOINTS
    if base.is_dir():
        for p in base.glob(".epoch_*.tmp"):
            shutil.rmtree(p, ignore_errors=True)


def publish_model(root: Path, state: dict[str, Tensor]) -> Path:
    """Write the round's result `root/model.safetensors` (atomically)."""
    path = Path(root) / MODEL_FILE
    save_state_dict(state, path)
    return path


def read_epochs(root: Path) -> list[dict[str, Any]]:
    """The per-epoch lines written so far (skipping a torn last line of a killed writer)."""
    path = Path(root) / EPOCHS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
