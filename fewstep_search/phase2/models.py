"""The two models of a Phase-2 round: the frozen teacher and the student's private trainable copy.

Why a module of their own: both rules protect the caller's model object (it may be shared with the search, or
come from a user's factory): the teacher is only moved (a copy if it has to) and put in eval mode, the student is
always a deep copy whose floating-point weights are turned trainable, since a loaded model may arrive frozen.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from fewstep_search.models.source import ModelSource, trainable_module

__all__ = ["load_teacher", "load_student"]


def _move(den: Any, device: torch.device) -> Any:
    """`den` with its module on `device` (a private copy if it had to move: never mutate a caller's model)."""
    module = trainable_module(den)
    if module is None:
        return den
    p = next(module.parameters())
    if p.device != device:
        den = copy.deepcopy(den)
        trainable_module(den).to(device)  # type: ignore[union-attr]
    return den


def load_teacher(source: ModelSource, device: torch.device) -> Any:
    """The frozen teacher: eval mode, called only under no_grad (its flags are left as loaded: it may be shared)."""
    den = _move(source.on(str(device)).load(), device)
    module = trainable_module(den)
    if module is not None:
        module.eval()
    return den


def load_student(source: ModelSource, device: torch.device, *, dropout: bool) -> tuple[Any, nn.Module]:
    """A private trainable copy of the student: (denoiser, the module whose state dict is the result)."""
    den = copy.deepcopy(source.on(str(device)).load())
    module = trainable_module(den)
    if module is None:
        raise ValueError(f"model {source.model_id} has no trainable torch.nn.Module: Phase-2 cannot fine-tune it")
    module.to(device)
    for p in module.parameters():
        if p.is_floating_point():
            p.requires_grad_(True)  # a loaded model may arrive frozen (inference-only weights)
    module.train(dropout)
    return den, module
