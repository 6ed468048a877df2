"""The `Denoiser` contract every model adapter satisfies, and a guard that turns bad model output into clear errors.

Convention (DESIGN.md section 1, EDM / variance exploding): `x_sigma = x0 + sigma * eps` and a denoiser
`D(x, sigma) ~ E[x0 | x_sigma]`. Everything downstream (solvers, bank, bounds) only ever calls `D(x, sigma)`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["Denoiser", "ModelOutputError", "CheckedDenoiser", "sigma_range"]


@runtime_checkable
class Denoiser(Protocol):
    """`D(x: Tensor[B, *shape], sigma: Tensor[B]) -> Tensor[B, *shape]`, the posterior mean of x0.

    Adapters also advertise `sigma_min` / `sigma_max` (the noise range the model was trained on) so that
    schedules and solvers clamp to what the network supports (STYLE.md lesson 4), and `prediction_type`
    naming what the wrapped network predicts ("x0" for exact models, "epsilon", "v", "sample", ...).
    """

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor: ...


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


class CheckedDenoiser:
    """Wraps any denoiser so a NaN/inf or a wrong-shaped output fails at once with a clear message.

    Why: a model that produces NaN at one sigma would otherwise silently poison a bank or a bound, and the
    failure would surface far away (a NaN schedule from an optimizer). The check costs one reduction per call.
    """

    def __init__(self, inner: Denoiser, *, name: str | None = None) -> None:
        self.inner = inner
        self.name = name or type(inner).__name__
        for attr in ("sigma_min", "sigma_max", "prediction_type", "shape"):
            if hasattr(inner, attr):
                setattr(self, attr, getattr(inner, attr))

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        out = self.inner(x, sigma)
        if not isinstance(out, Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ModelOutputError(f"model {self.name} returned shape {got} for input shape {tuple(x.shape)}")
        if not torch.isfinite(out).all():
            bad = sigma.flatten()[~torch.isfinite(out.flatten(1)).all(dim=1)] if out.ndim > 1 else sigma
            raise ModelOutputError(
                f"model {self.name} returned NaN/inf at sigma={float(bad.flatten()[0]):.4g}"
            )
        return out
