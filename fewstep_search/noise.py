"""Noise-schedule coordinates: sigma (EDM/VE) <-> half log-SNR lambda <-> variance-preserving time t.

A VP model `x_t = alpha_t x0 + sigma_t eps` maps exactly onto the EDM convention with `sigma = sigma_t / alpha_t`
and `lambda = -log sigma` (docs/design.md section 1). Two VP families are supported:

* `ContinuousVP`: the VP-SDE of Song et al. (2021), `beta(t) = beta_min + t (beta_max - beta_min)`, t in [0, 1],
  `log alpha_t = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2`; closed-form inverse.
* `DiscreteVP`: a DDPM `alphas_cumprod` table (index n = 0..T-1). sigma -> timestep is piecewise linear
  interpolation in log sigma between neighbouring trained timesteps (as k-diffusion's `sigma_to_t`), or nearest.

Every function works on float64 numpy arrays or torch tensors alike; the math is done in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "sigma_to_lambda",
    "lambda_to_sigma",
    "ContinuousVP",
    "DiscreteVP",
    "ddpm_alphas_cumprod",
    "cosine_alpha_bar",
]


def sigma_to_lambda(sigma: np.ndarray | float) -> np.ndarray:
    """Half log-SNR `lambda = -log sigma` (sigma in the EDM convention)."""
    return -np.log(np.asarray(sigma, dtype=np.float64))


def lambda_to_sigma(lam: np.ndarray | float) -> np.ndarray:
    """Inverse of `sigma_to_lambda`."""
    return np.exp(-np.asarray(lam, dtype=np.float64))


@dataclass(frozen=True)
class ContinuousVP:
    """The continuous VP-SDE (defaults beta_min 0.1, beta_max 20, as in score-SDE and EDM's VP)."""

    beta_min: float = 0.1
    beta_max: float = 20.0

    def log_alpha(self, t: np.ndarray | float) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def sigma(self, t: np.ndarray | float) -> np.ndarray:
        """EDM sigma at VP time t: `sqrt(exp(-2 log alpha_t) - 1)`."""
        return np.sqrt(np.expm1(-2.0 * self.log_alpha(t)))

    def t(self, sigma: np.ndarray | float) -> np.ndarray:
        """VP time of an EDM sigma (closed-form root of the quadratic in t)."""
        s = np.log1p(np.asarray(sigma, dtype=np.float64) ** 2)  # = -2 log alpha
        d = self.beta_max - self.beta_min
        return (-self.beta_min + np.sqrt(self.beta_min**2 + 2.0 * d * s)) / d


def ddpm_alphas_cumprod(
    num_train_timesteps: int = 1000,
    *,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
) -> np.ndarray:
    """The `alphas_cumprod` table of a DDPM, for the beta schedules diffusers names the same way.

    `linear` (Ho et al. 2020), `scaled_linear` (Stable Diffusion: linear in sqrt(beta)), `squaredcos_cap_v2`
    (Nichol & Dhariwal 2021 cosine, betas capped at 0.999).
    """
    n = int(num_train_timesteps)
    if n < 2:
        raise ValueError(f"num_train_timesteps must be >= 2, got {n}")
    if beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, n, dtype=np.float64)
    elif beta_schedule == "scaled_linear":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        t = np.arange(n + 1, dtype=np.float64) / n
        ab = cosine_alpha_bar(t)
        betas = np.minimum(1.0 - ab[1:] / ab[:-1], 0.999)
    else:
        raise ValueError(
            f"unknown beta_schedule {beta_schedule!r}; expected linear, scaled_linear or squaredcos_cap_v2"
        )
    return np.cumprod(1.0 - betas)


def cosine_alpha_bar(t: np.ndarray | float, s: float = 0.008) -> np.ndarray:
    """iDDPM cosine `alpha_bar(t) = cos^2(pi/2 (t + s)/(1 + s))`, t in [0, 1] (unnormalized, as in diffusers)."""
    t = np.asarray(t, dtype=np.float64)
    return np.cos((t + s) / (1 + s) * math.pi / 2) ** 2


@dataclass(frozen=True)
class DiscreteVP:
    """A discrete-time VP model given by its `alphas_cumprod` table (index 0 = least noise).

    `sigmas[n] = sqrt((1 - alphas_cumprod[n]) / alphas_cumprod[n])`, increasing in n.
    """

    alphas_cumprod: np.ndarray
    log_sigmas: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        ac = np.asarray(self.alphas_cumprod, dtype=np.float64)
        if ac.ndim != 1 or ac.size < 2 or not np.all((ac > 0) & (ac < 1)) or np.any(np.diff(ac) >= 0):
            raise ValueError("alphas_cumprod must be a 1-D, strictly decreasing table with values in (0, 1)")
        object.__setattr__(self, "alphas_cumprod", ac)
        object.__setattr__(self, "log_sigmas", 0.5 * np.log((1.0 - ac) / ac))

    @property
    def sigmas(self) -> np.ndarray:
        return np.exp(self.log_sigmas)

    @property
    def sigma_min(self) -> float:
        return float(np.exp(self.log_sigmas[0]))

    @property
    def sigma_max(self) -> float:
        return float(np.exp(self.log_sigmas[-1]))

    def sigma(self, t: np.ndarray | float) -> np.ndarray:
        """EDM sigma at a (possibly fractional) timestep: linear interpolation of log sigma."""
        t = np.asarray(t, dtype=np.float64)
        idx = np.arange(self.log_sigmas.size, dtype=np.float64)
        return np.exp(np.interp(t, idx, self.log_sigmas))

    def t(self, sigma: np.ndarray | float, *, nearest: bool = False) -> np.ndarray:
        """Fractional (or nearest) timestep of an EDM sigma; sigmas outside the table are clamped to it."""
        ls = np.log(np.asarray(sigma, dtype=np.float64))
        idx = np.arange(self.log_sigmas.size, dtype=np.float64)
        t = np.interp(ls, self.log_sigmas, idx)
        return np.rint(t) if nearest else t

    def t_torch(self, sigma: Tensor) -> Tensor:
        """Differentiable torch twin of `t(sigma)` (interpolated), float64, on `sigma`'s device.

        Same map (piecewise linear in log sigma between trained timesteps, clamped to the table), but autograd
        flows from the timestep back to sigma, so an objective differentiated through a solver (the direct error)
        sees how a discrete-time model's output moves with its timestep embedding. Outside the table the
        timestep is constant and the gradient is 0 (the clamp happens in sigma, so sigma = 0 gives no NaN).
        """
        import torch

        table = torch.as_tensor(self.log_sigmas, dtype=torch.float64, device=sigma.device)
        ls = sigma.to(torch.float64).clamp(self.sigma_min, self.sigma_max).log()
        hi = torch.searchsorted(table, ls.detach()).clamp(1, table.numel() - 1)
        lo = hi - 1
        return lo.to(torch.float64) + (ls - table[lo]) / (table[hi] - table[lo])
