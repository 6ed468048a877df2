"""Probability-flow ODE solvers with one signature: `solve(denoiser, x, sigmas, *, callback=None) -> Tensor`.

ODE (DESIGN.md section 1): `dx/dsigma = (x - D(x, sigma)) / sigma`. `sigmas` is a descending 1-D tensor; a solver
returns the state at the last sigma (append 0.0 to end on a clean sample; the step into 0 is a plain denoiser
call). Arithmetic follows x's dtype; sigmas stay tensors, so every solver is differentiable with respect to the
schedule (the LD3-style true-error objective relies on that).

`callback`, when given, is called after every network evaluation with a dict `{"i", "x", "sigma", "denoised"}`
(the state the model saw, its sigma, and its output), the k-diffusion convention.

Solvers live in `SOLVERS` (name -> function); `get_solver(name)` looks one up with a clear error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor

from fewstep_search.models.base import Denoiser

__all__ = ["Solver", "SOLVERS", "get_solver", "ddim", "heun", "dpmpp_2m", "reference", "nfe_of"]

Callback = Callable[[dict[str, Any]], None] | None


class Solver(Protocol):
    def __call__(self, denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, callback: Callback = None) -> Tensor: ...


def _check_sigmas(sigmas: Tensor) -> None:
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D tensor with >= 2 values, got shape {tuple(sigmas.shape)}")
    if not bool(torch.all(sigmas[1:] < sigmas[:-1])):
        raise ValueError("sigmas must be strictly decreasing")
    if bool(torch.any(sigmas[:-1] <= 0)) or bool(sigmas[-1] < 0):
        raise ValueError("sigmas must be positive (only the last may be 0)")


def _denoise(denoiser: Denoiser, x: Tensor, sigma: Tensor, i: int, callback: Callback) -> Tensor:
    d = denoiser(x, sigma.to(x.dtype).expand(x.shape[0]))
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "denoised": d})
    return d


def ddim(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, callback: Callback = None) -> Tensor:
    """First order (DDIM = Euler in sigma): `x_{i-1} = r x_i + (1 - r) D(x_i, sigma_i)`, `r = sigma_{i-1}/sigma_i`."""
    _check_sigmas(sigmas)
    for i in range(sigmas.numel() - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = _denoise(denoiser, x, s, i, callback)
        r = (s_next / s).to(x.dtype)
        x = r * x + (1 - r) * d
    return x


def heun(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, callback: Callback = None) -> Tensor:
    """Second order Heun (EDM Algorithm 1, deterministic); Euler on a final step into sigma = 0. 2 NFE per step."""
    _check_sigmas(sigmas)
    for i in range(sigmas.numel() - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        ds = (s_next - s).to(x.dtype)
        d = _denoise(denoiser, x, s, i, callback)
        slope = (x - d) / s.to(x.dtype)
        x_euler = x + ds * slope
        if float(s_next) == 0.0:
            x = x_euler
            continue
        d2 = _denoise(denoiser, x_euler, s_next, i, callback)
        slope2 = (x_euler - d2) / s_next.to(x.dtype)
        x = x + ds * 0.5 * (slope + slope2)
    return x


def dpmpp_2m(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, callback: Callback = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), multistep second order in lambda = -log sigma; first step is DDIM."""
    _check_sigmas(sigmas)
    old_d: Tensor | None = None
    h_last: Tensor | None = None
    for i in range(sigmas.numel() - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = _denoise(denoiser, x, s, i, callback)
        if float(s_next) == 0.0:
            x = d
            break
        h = torch.log(s) - torch.log(s_next)
        r_x = (s_next / s).to(x.dtype)  # = exp(-h)
        if old_d is None or h_last is None:
            d_eff = d
        else:
            ratio = (h_last / h).to(x.dtype)
            d_eff = (1 + 1 / (2 * ratio)) * d - (1 / (2 * ratio)) * old_d
        x = r_x * x + (1 - r_x) * d_eff
        old_d, h_last = d, h
    return x


def reference(
    denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, callback: Callback = None, substeps: int = 8
) -> Tensor:
    """Accurate solve: classical RK4 in t = log sigma (`dx/dt = x - D(x, e^t)`) with `substeps` per interval.

    4 * substeps evaluations per interval; accuracy is checked by step halving in the tests (4th order).
    A final interval into sigma = 0 is a denoiser call (use a small positive sigma_min for an accurate end).
    """
    _check_sigmas(sigmas)
    if substeps < 1:
        raise ValueError(f"substeps must be >= 1, got {substeps}")

    def f(xv: Tensor, log_s: Tensor, i: int) -> Tensor:
        return xv - _denoise(denoiser, xv, torch.exp(log_s), i, callback)

    for i in range(sigmas.numel() - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        if float(s_next) == 0.0:
            x = _denoise(denoiser, x, s, i, callback)
            break
        t0, t1 = torch.log(s), torch.log(s_next)
        h = (t1 - t0) / substeps
        hx = h.to(x.dtype)
        for j in range(substeps):
            t = t0 + j * h
            k1 = f(x, t, i)
            k2 = f(x + 0.5 * hx * k1, t + 0.5 * h, i)
            k3 = f(x + 0.5 * hx * k2, t + 0.5 * h, i)
            k4 = f(x + hx * k3, t + h, i)
            x = x + hx / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


SOLVERS: dict[str, Solver] = {"ddim": ddim, "euler": ddim, "heun": heun, "dpmpp_2m": dpmpp_2m, "reference": reference}

_NFE_PER_STEP = {"ddim": 1, "euler": 1, "heun": 2, "dpmpp_2m": 1}


def get_solver(name: str) -> Solver:
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; known: {', '.join(SOLVERS)}") from None


def nfe_of(name: str, steps: int) -> int:
    """Network evaluations a solver spends on `steps` intervals (Heun's last step into 0 excluded)."""
    if name not in _NFE_PER_STEP:
        raise ValueError(f"no fixed NFE count for solver {name!r}")
    return _NFE_PER_STEP[name] * steps
