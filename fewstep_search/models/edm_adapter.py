"""Any EDM-convention function `(x, sigma) -> x0` as a `Denoiser` that advertises its noise range.

Use it for a network that is already preconditioned the EDM way (NVlabs/edm `EDMPrecond`, k-diffusion
models, your own code): `D(x, sigma) = E[x0 | x0 + sigma eps]` needs no conversion, only `sigma_min` /
`sigma_max` so that schedules clamp to what the network was trained on. A function that predicts the EDM
noise instead (`prediction_type="epsilon"`, `x = x0 + sigma eps`) is turned into `D = x - sigma eps`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor

__all__ = ["CallableDenoiser", "CALLABLE_PREDICTION_TYPES"]

CALLABLE_PREDICTION_TYPES = ("x0", "epsilon")


class CallableDenoiser:
    """Wraps `fn(x: Tensor[B, *shape], sigma: Tensor[B]) -> Tensor[B, *shape]` in the EDM convention.

    Example:
        >>> import torch
        >>> den = CallableDenoiser(lambda x, s: x / (1 + s.view(-1, 1) ** 2), sigma_min=0.002, sigma_max=80.0)
        >>> den(torch.ones(2, 3), torch.tensor([1.0, 1.0]))[0, 0].item()
        0.5
    """

    def __init__(
        self,
        fn: Callable[[Tensor, Tensor], Tensor],
        *,
        sigma_min: float,
        sigma_max: float,
        prediction_type: str = "x0",
    ) -> None:
        if not callable(fn):
            raise ValueError(f"CallableDenoiser needs a callable (x, sigma) -> x0, got {type(fn).__name__}")
        lo, hi = float(sigma_min), float(sigma_max)
        if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 < lo < hi):
            raise ValueError(f"need 0 < sigma_min < sigma_max (finite), got sigma_min={lo}, sigma_max={hi}")
        if prediction_type not in CALLABLE_PREDICTION_TYPES:
            raise ValueError(
                f"unsupported prediction_type {prediction_type!r} for a callable; "
                f"expected one of {', '.join(CALLABLE_PREDICTION_TYPES)}"
            )
        self.fn = fn
        self.sigma_min, self.sigma_max = lo, hi
        self.prediction_type = prediction_type

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        out = self.fn(x, sigma)
        if self.prediction_type == "epsilon":
            return x - sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x) * out
        return out
