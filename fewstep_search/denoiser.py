"""The `Denoiser` contract every model adapter satisfies, and a guard that turns bad model output into clear errors.

It lives on the bottom floor, beside `noise`, because the math modules (solvers, bank, objectives) call it;
`fewstep_search.models` holds the adapters that implement it.

Convention (docs/design.md section 1, EDM / variance exploding): `x_sigma = x0 + sigma * eps` and a denoiser
`D(x, sigma) ~ E[x0 | x_sigma]`. Everything downstream (solvers, bank, bounds) only ever calls `D(x, sigma)`.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "advertised",
    "advertise_like",
    "family_of",
    "Denoiser",
    "ConditionalDenoiser",
    "ModelOutputError",
    "CheckedDenoiser",
    "sigma_range",
    "is_conditional",
    "bind_condition",
]


@runtime_checkable
class Denoiser(Protocol):
    """`D(x: Tensor[B, *shape], sigma: Tensor[B]) -> Tensor[B, *shape]`, the posterior mean of x0.

    Adapters also advertise `sigma_min` / `sigma_max` (the noise range the model was trained on) so that
    schedules and solvers clamp to what the network supports, and `prediction_type`
    naming what the wrapped network predicts ("x0" for exact models, "epsilon", "v", "sample", ...).
    """

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor: ...


@runtime_checkable
class ConditionalDenoiser(Protocol):
    """`D(x, sigma, cond) -> x0` for a model with conditions (class labels, prompt embeddings, ...).

    `conditions` is the condition set a schedule is searched over (what the study lists); `cond` is an int64
    tensor [B] of indices into it, so every downstream module handles conditions as plain integers and the
    model itself owns what an index means (an embedding table, a label, a guidance scale it applies).
    """

    conditions: tuple[object, ...]

    def __call__(self, x: Tensor, sigma: Tensor, cond: Tensor) -> Tensor: ...


class ModelOutputError(RuntimeError):
    """The model returned something unusable (NaN/inf, wrong shape). Raised with a one-line reason."""


def sigma_range(denoiser: object, default: tuple[float, float] | None = None) -> tuple[float, float]:
    """(sigma_min, sigma_max) advertised by a denoiser, or `default` where it advertises none."""
    lo = getattr(denoiser, "sigma_min", None)
    hi = getattr(denoiser, "sigma_max", None)
    if lo is None or hi is None:
        if default is None:
            raise ValueError(
                f"{type(denoiser).__name__} advertises no sigma_min/sigma_max; pass sigma_min and sigma_max"
            )
        return default
    return float(lo), float(hi)


ADVERTISED = ("sigma_min", "sigma_max", "prediction_type", "shape", "conditions", "dataset", "family", "vp", "shift",
              "scheduler_config", "split_conditions")
"""What an adapter may advertise; wrappers pass these through so code downstream sees the model's values."""


def advertise_like(wrapper: object, inner: object) -> None:
    """Copy what `inner` advertises (`ADVERTISED`) onto `wrapper`, so code downstream sees the model's values."""
    for attr in ADVERTISED:
        if hasattr(inner, attr):
            setattr(wrapper, attr, getattr(inner, attr))


def advertised(denoiser: object, attr: str) -> Any:
    """`attr` of a denoiser or of a model it wraps (`inner`: CheckedDenoiser passes on only a few attributes), or
    None where none of them advertises it."""
    obj, seen = denoiser, 0
    while obj is not None and seen < 8:
        if getattr(obj, attr, None) is not None:
            return getattr(obj, attr)
        obj, seen = getattr(obj, "inner", None), seen + 1
    return None


def family_of(denoiser: object) -> str:
    """The coordinates a denoiser's own sampler works in: "flow", "vp" or "edm" (`schedules.MODEL_FAMILIES`): the
    advertised `family`, else "vp" where it advertises a VP (DDPM) table, else "edm"."""
    family = advertised(denoiser, "family")
    if family is not None:
        return str(family)
    return "vp" if advertised(denoiser, "vp") is not None else "edm"


def is_conditional(denoiser: object) -> bool:
    """Whether a denoiser takes condition indices (advertises a non-empty `conditions`)."""
    return bool(getattr(denoiser, "conditions", None))


class _Bound:
    """A conditional denoiser with one batch's condition indices bound: a plain `Denoiser` for that batch."""

    def __init__(self, inner: ConditionalDenoiser, cond: Tensor) -> None:
        self.inner, self.cond = inner, cond
        advertise_like(self, inner)

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        if x.shape[0] != self.cond.shape[0]:
            raise ValueError(f"a batch of {x.shape[0]} samples was given {self.cond.shape[0]} condition indices")
        return self.inner(x, sigma, self.cond.to(x.device))


def bind_condition(denoiser: Denoiser | ConditionalDenoiser, cond: Tensor | None) -> Denoiser:
    """`denoiser` itself when `cond` is None, else a `Denoiser` that passes `cond` [B] on every call.

    Why: solvers, the bank and the objectives only know `D(x, sigma)`; binding the batch's conditions at the
    call site keeps conditions out of every one of them.
    """
    if cond is None:
        if is_conditional(denoiser):
            raise ValueError("this model is conditional: its calls need condition indices (the bank's `cond`)")
        return denoiser  # type: ignore[return-value]
    if not is_conditional(denoiser):
        raise ValueError("condition indices were given for a model that advertises no `conditions`")
    return _Bound(denoiser, cond)  # type: ignore[arg-type]


class CheckedDenoiser:
    """Wraps any denoiser so a NaN/inf or a wrong-shaped output fails at once with a clear message.

    Why: a model that produces NaN at one sigma would otherwise silently poison a bank or a bound, and the
    failure would surface far away (a NaN schedule from an optimizer). The check costs one reduction per call.
    """

    def __init__(self, inner: Denoiser, *, name: str | None = None) -> None:
        self.inner = inner
        self.name = name or type(inner).__name__
        advertise_like(self, inner)

    def __call__(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        out = self.inner(x, sigma) if cond is None else self.inner(x, sigma, cond)
        if not isinstance(out, Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ModelOutputError(f"model {self.name} returned shape {got} for input shape {tuple(x.shape)}")
        if not torch.isfinite(out).all():
            bad = sigma.flatten()[~torch.isfinite(out.flatten(1)).all(dim=1)] if out.ndim > 1 else sigma
            raise ModelOutputError(
                f"model {self.name} returned NaN/inf at sigma={float(bad.flatten()[0]):.4g}"
            )
        return out
