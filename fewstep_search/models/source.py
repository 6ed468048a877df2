"""`ModelSource`: how any process (the driver, a Ray Tune trial, a Ray Train worker) obtains the same model.

Either a registry spec (`kind`, `path`, `factory`, `options`, `device`, `base_dir` for relative paths; see
`fewstep_search.models.loading`), optionally with a `checkpoint`: a safetensors state dict of the module that spec
loads (a Phase-2 student is "the base architecture plus a checkpoint"). Or a picklable `denoiser` object, shipped
as is (the library path, `optimize_schedule`, and custom models in tests).

Workers cache loaded models per process by a key that includes the checkpoint's content hash, so a round-2 trial
on a reused actor never scores round 1's (or the teacher's) weights by mistake.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewstep_search.denoiser import CheckedDenoiser, Denoiser

__all__ = ["ModelSource", "file_sha256", "trainable_module", "frozen_weights", "load_checkpoint_into"]

_CACHE: dict[str, Denoiser] = {}
_CACHE_LIMIT = 4
"""Models kept per worker process (teacher, current student, a previous round's): bounded memory on reuse."""


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (what identifies a checkpoint, whatever its name)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def trainable_module(denoiser: object) -> nn.Module | None:
    """The `torch.nn.Module` behind a denoiser (through `CheckedDenoiser`), or None for a plain function.

    This is "the module the study's loader returns": its state dict is what a Phase-2 checkpoint holds.
    A module without floating-point parameters (nothing to fine-tune) also gives None.
    """
    inner = denoiser.inner if isinstance(denoiser, CheckedDenoiser) else denoiser
    if not isinstance(inner, nn.Module):
        return None
    if not any(p.is_floating_point() for p in inner.parameters()):
        return None
    return inner


@contextlib.contextmanager
def frozen_weights(denoiser: object) -> Iterator[None]:
    """Turn off `requires_grad` on the model's parameters for the block, restoring each flag after.

    Why: a schedule search differentiates through the solver with respect to sigma only; gradients for every
    network weight cost 1.5-2x the time and memory for nothing.
    """
    module = trainable_module(denoiser)
    if module is None:
        yield
        return
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def load_checkpoint_into(module: nn.Module, path: str | Path) -> None:
    """Load a safetensors state dict (keys exactly the module's) into `module`; ValueError naming the file."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises several types for missing / corrupt files
        raise ValueError(f"checkpoint {path} could not be read as safetensors: {exc}") from None
    own = module.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise ValueError(
            f"checkpoint {path} does not fit the model: {len(missing)} missing keys (e.g. {missing[:2]}), "
            f"{len(extra)} unexpected (e.g. {extra[:2]})"
        )
    with torch.no_grad():
        for k, v in state.items():
            if own[k].shape != v.shape:
                raise ValueError(f"checkpoint {path}: {k} has shape {tuple(v.shape)}, the model {tuple(own[k].shape)}")
            own[k].copy_(v.to(own[k].dtype))


@dataclass(frozen=True)
class ModelSource:
    """How a process obtains the denoiser (see the module docstring)."""

    kind: str | None = None
    path: str | None = None
    factory: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    base_dir: str | None = None
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    denoiser: Denoiser | None = None

    def __post_init__(self) -> None:
        if (self.kind is None) == (self.denoiser is None):
            raise ValueError("a ModelSource needs exactly one of a model kind (spec) or a denoiser object")
        if self.checkpoint is not None and self.kind is None:
            raise ValueError("a checkpoint needs a model spec (kind) to load it into")

    @classmethod
    def of(cls, denoiser: Denoiser) -> ModelSource:
        return cls(denoiser=denoiser)

    def with_checkpoint(self, path: str | Path) -> ModelSource:
        """The same base model with the weights of a safetensors checkpoint (a Phase-2 student)."""
        p = Path(path).resolve()
        return replace(self, checkpoint=str(p), checkpoint_sha256=file_sha256(p))

    def on(self, device: str) -> ModelSource:
        return replace(self, device=device)

    @property
    def model_id(self) -> str:
        """A stable identity of the weights: the spec, plus the checkpoint's hash for a student."""
        if self.denoiser is not None:
            return f"object:{type(self.denoiser).__name__}"
        ref = self.path or self.factory or ""
        opts = json.dumps(dict(self.options), sort_keys=True) if self.options else ""
        base = ":".join(p for p in (self.kind, ref, opts) if p)
        return f"{base}@{self.checkpoint_sha256[:16]}" if self.checkpoint_sha256 else base

    def _key(self) -> str:
        return json.dumps(
            [self.kind, self.path, self.factory, dict(self.options), self.device, self.base_dir,
             self.checkpoint_sha256],
            sort_keys=True,
        )

    def load(self, *, cache: bool = True) -> Denoiser:
        """The denoiser (loaded on first use in this process, then cached by spec and checkpoint hash)."""
        if self.denoiser is not None:
            return self.denoiser
        key = self._key()
        if cache and key in _CACHE:
            return _CACHE[key]
        from fewstep_search.models.loading import load_model

        model = load_model(
            self.kind or "", path=self.path, factory=self.factory, options=dict(self.options),
            device=self.device, base_dir=self.base_dir,
        )
        if self.checkpoint is not None:
            module = trainable_module(model)
            if module is None:
                raise ValueError(f"model kind {self.kind!r} has no trainable weights to load {self.checkpoint} into")
            if self.checkpoint_sha256 is not None and file_sha256(self.checkpoint) != self.checkpoint_sha256:
                raise ValueError(f"checkpoint {self.checkpoint} changed since it was recorded (hash mismatch)")
            load_checkpoint_into(module, self.checkpoint)
        if cache:
            if len(_CACHE) >= _CACHE_LIMIT:
                _CACHE.pop(next(iter(_CACHE)))
            _CACHE[key] = model
        return model
