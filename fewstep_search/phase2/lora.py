"""LoRA Phase-2 (`phase2.lora_rank`): adapters through peft, and a teacher that is the same network with them off.

Why: a full fine-tune holds three copies of the weights (teacher, student, EMA) and an optimizer state twice their
size, which does not fit an SDXL or Flux on one GPU. With LoRA the round holds the base weights once:
* the student is the loaded model with peft's LoRA layers injected into its attention projections (B = 0 at the
  start, so the student starts as the teacher); only the adapters train;
* the teacher is the student with its adapters disabled (`AdaptersOff`), so no second copy is loaded;
* the EMA copy shares the frozen base tensors with the student and averages the adapters alone
  (`phase2.optim.make_ema(share_frozen=True)`).

Every round trains a fresh adapter on the base weights (the teacher), for that round's schedule.

What a round writes stays in the format every other module reads: `model.safetensors` is the merged weights (the
base plus the EMA adapters' delta, under the base model's own keys), so scoring, the loop and the diffusers-folder
export load it like any other round; `adapters.safetensors` holds the EMA adapters themselves (peft keys), which
the export writes in diffusers' LoRA format (`pipe.load_lora_weights(DIR)`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from fewstep_search.denoiser import advertise_like

__all__ = ["DEFAULT_TARGETS", "attach_lora", "AdaptersOff", "adapter_state",
           "merged_state", "load_adapter_state", "enable_gradient_checkpointing"]

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
"""The attention projections of diffusers' UNets and transformers: where diffusers' own LoRA training scripts put
adapters. A model without them gets adapters on every Linear layer."""
_ADAPTER = "default"


def _lora_layers(module: nn.Module) -> Iterator[tuple[str, Any]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, sub in module.named_modules():
        if isinstance(sub, BaseTunerLayer):
            yield name, sub


def _targets(module: nn.Module, targets: tuple[str, ...] | None) -> list[str]:
    if targets:
        return list(targets)
    names = [n for n, _ in module.named_modules()]
    found = [t for t in DEFAULT_TARGETS if any(n == t or n.endswith("." + t) for n in names)]
    if found:
        return found
    return sorted({n.rsplit(".", 1)[-1] for n, m in module.named_modules() if isinstance(m, nn.Linear)})


def attach_lora(module: nn.Module, *, rank: int, alpha: float | None = None,
                targets: tuple[str, ...] | None = None) -> int:
    """Inject LoRA adapters (peft) into `module` in place, freeze everything else; returns the trainable count."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        raise ValueError("phase2.lora_rank needs peft: pip install 'fewstep-search[pipelines]'") from e
    names = _targets(module, targets)
    if not names:
        raise ValueError(f"{type(module).__name__} has no Linear layer to put LoRA adapters on")
    module.requires_grad_(False)
    config = LoraConfig(r=int(rank), lora_alpha=float(alpha if alpha is not None else rank), target_modules=names,
                        init_lora_weights=True)
    inject_adapter_in_model(config, module, adapter_name=_ADAPTER)
    trainable = 0
    for name, p in module.named_parameters():
        p.requires_grad_(".lora_" in name)
        trainable += p.numel() if p.requires_grad else 0
    if trainable == 0:
        raise ValueError(f"no layer of {type(module).__name__} matched the LoRA targets {names}")
    return trainable


@contextlib.contextmanager
def adapters_disabled(module: nn.Module) -> Iterator[None]:
    """Run the block with every LoRA adapter of `module` off (the base network), restoring them after."""
    layers = [layer for _, layer in _lora_layers(module)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


class AdaptersOff:
    """The teacher of a LoRA round: the student's denoiser called with its adapters off, in eval mode, no grad."""

    def __init__(self, student: Any, module: nn.Module) -> None:
        self.inner, self._module = student, module
        advertise_like(self, student)

    def __call__(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        training = self._module.training
        self._module.eval()
        try:
            with torch.no_grad(), adapters_disabled(self._module):
                return self.inner(x, sigma) if cond is None else self.inner(x, sigma, cond)
        finally:
            self._module.train(training)


def adapter_state(module: nn.Module) -> dict[str, Tensor]:
    """The adapters' tensors under the module's own keys (what a LoRA checkpoint stores for the student)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items() if ".lora_" in k}


def load_adapter_state(module: nn.Module, state: dict[str, Tensor]) -> None:
    """Load `adapter_state`'s tensors back (ValueError naming a key the module lacks)."""
    own = module.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ValueError(f"the checkpoint's adapters do not fit this model (e.g. {unknown[0]})")
    module.load_state_dict(state, strict=False)


def merged_state(module: nn.Module) -> dict[str, Tensor]:
    """The module's weights with each adapter's delta merged in, under the base model's own keys (no adapter keys,
    `.base_layer.` removed): the round's result format. The module itself is not changed."""
    deltas: dict[str, Tensor] = {}
    for name, layer in _lora_layers(module):
        if _ADAPTER in getattr(layer, "lora_A", {}):
            deltas[f"{name}.base_layer.weight"] = layer.get_delta_weight(_ADAPTER).detach()
    out: dict[str, Tensor] = {}
    for key, value in module.state_dict().items():
        if ".lora_" in key:
            continue
        merged = value + deltas[key].to(value) if key in deltas else value
        out[key.replace(".base_layer.", ".")] = merged.detach().cpu().contiguous().clone()
    return out


def enable_gradient_checkpointing(module: nn.Module) -> bool:
    """Turn on the diffusers network's gradient checkpointing where it has one; whether it did."""
    done = False
    for sub in module.modules():
        if getattr(sub, "_supports_gradient_checkpointing", False) and hasattr(sub, "enable_gradient_checkpointing"):
            sub.enable_gradient_checkpointing()
            done = True
            break
    return done
