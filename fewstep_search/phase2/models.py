"""The two models of a Phase-2 round: the frozen teacher and the student's private trainable copy.

Why a module of their own: both rules protect the caller's model object (it may be shared with the search, or
come from a user's factory): the teacher is only moved (a copy if it has to) and put in eval mode, the student is
always a deep copy whose floating-point weights are turned trainable, since a loaded model may arrive frozen.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fewstep_search.models.source import ModelSource, trainable_module
from fewstep_search.phase2.checkpoints import Checkpoint, state_dict_cpu
from fewstep_search.phase2.lora import (
    AdaptersOff,
    adapter_state,
    attach_lora,
    enable_gradient_checkpointing,
    load_adapter_state,
    merged_state,
)
from fewstep_search.study.phase2 import Phase2Spec

__all__ = ["load_teacher", "load_student", "RoundModels", "load_round_models"]


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


def _module_of(den: Any, source: ModelSource) -> nn.Module:
    """The module Phase-2 trains (`trainable_module`); ValueError naming the model when it has none."""
    module = trainable_module(den)
    if module is None:
        raise ValueError(f"model {source.model_id} has no trainable torch.nn.Module: Phase-2 cannot fine-tune it")
    return module


def load_student(source: ModelSource, device: torch.device, *, dropout: bool) -> tuple[Any, nn.Module]:
    """A private trainable copy of the student: (denoiser, the module whose state dict is the result)."""
    den = copy.deepcopy(source.on(str(device)).load())
    module = _module_of(den, source)
    module.to(device)
    for p in module.parameters():
        if p.is_floating_point():
            p.requires_grad_(True)  # a loaded model may arrive frozen (inference-only weights)
    module.train(dropout)
    return den, module


@dataclass(frozen=True)
class RoundModels:
    """A round's teacher, student and the module whose weights train, and how those weights are saved: in full, or
    (LoRA) as merged weights plus the adapters (`fewstep_search.phase2.lora`)."""

    teacher: Any
    student: Any
    module: nn.Module
    lora: bool = False

    def result_state(self, ema_module: nn.Module) -> dict[str, Tensor]:
        """The round's result format: the base model's keys (a LoRA round's adapters merged in)."""
        return merged_state(ema_module) if self.lora else state_dict_cpu(ema_module)

    def student_state(self, module: nn.Module) -> dict[str, Tensor]:
        return adapter_state(module) if self.lora else state_dict_cpu(module)

    def adapters_state(self, ema_module: nn.Module) -> dict[str, Tensor] | None:
        return adapter_state(ema_module) if self.lora else None

    def restore(self, ema_module: nn.Module, saved: Checkpoint) -> None:
        """Load a checkpoint's student and EMA weights back (a resumed round)."""
        if not self.lora:
            self.module.load_state_dict(saved.student)
            ema_module.load_state_dict(saved.ema)
            return
        if saved.adapters is None:
            raise ValueError("the checkpoint holds no adapters: it is not a LoRA round's")
        load_adapter_state(self.module, saved.student)
        load_adapter_state(ema_module, saved.adapters)


def load_round_models(teacher: ModelSource, student: ModelSource, device: torch.device, spec: Phase2Spec
                      ) -> RoundModels:
    """The round's models: a loaded teacher and a private student copy, or (LoRA) one network whose adapters train
    and whose base, with the adapters off, is the teacher (a fresh adapter on the teacher's weights each round)."""
    if spec.lora_rank is None:
        student_den, module = load_student(student, device, dropout=spec.dropout)
        teacher_den = load_teacher(teacher, device)
    else:
        student_den = teacher.on(str(device)).load(cache=False)  # loaded afresh from a spec: this process's own
        student_den = copy.deepcopy(student_den) if teacher.denoiser is not None else _move(student_den, device)
        module = _module_of(student_den, teacher)  # never a caller's model (a `denoiser` source is copied)
        attach_lora(module, rank=spec.lora_rank, alpha=spec.lora_alpha,
                    targets=tuple(spec.lora_targets) if spec.lora_targets else None)
        module.to(device).train(spec.dropout)
        teacher_den = AdaptersOff(student_den, module)
    if spec.gradient_checkpointing:
        enable_gradient_checkpointing(module)
    return RoundModels(teacher_den, student_den, module, lora=spec.lora_rank is not None)
