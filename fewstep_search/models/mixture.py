"""Exact Gaussian-mixture denoisers: the analytic test bed where the true posterior mean is known.

For data `x0 ~ sum_c w_c N(mu_c, diag(s_c^2))` and `x = x0 + sigma eps`, each component's marginal is
`N(mu_c, diag(s_c^2 + sigma^2))`, and
`D(x, sigma) = sum_c p(c | x) [mu_c + s_c^2 / (s_c^2 + sigma^2) (x - mu_c)]`.
Responsibilities are computed with log-sum-exp, so the denoiser is exact and stable at every sigma in float64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["GaussianMixture", "SingleGaussian", "ConditionalMixture", "builtin_mixture", "conditional_mixture"]


class GaussianMixture:
    """Exact denoiser of a diagonal-covariance Gaussian mixture in any dimension.

    Args:
        means: [C, d] component means.
        stds: [C, d] (or [C] for isotropic) component standard deviations, > 0.
        weights: [C] mixture weights (normalized here), default uniform.
        sigma_min, sigma_max: the advertised noise range (EDM defaults).
    """

    prediction_type = "x0"

    def __init__(
        self,
        means: Tensor,
        stds: Tensor,
        weights: Tensor | None = None,
        *,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
    ) -> None:
        means = torch.as_tensor(means, dtype=torch.float64, device="cpu")
        if means.ndim != 2:
            raise ValueError(f"means must be [components, dim], got shape {tuple(means.shape)}")
        stds = torch.as_tensor(stds, dtype=torch.float64, device="cpu")
        if stds.ndim == 1:
            stds = stds[:, None].expand_as(means)
        if stds.shape != means.shape or bool(torch.any(stds <= 0)):
            raise ValueError("stds must be positive and shaped like means ([C, d]) or [C]")
        c = means.shape[0]
        w = (torch.full((c,), 1.0 / c, dtype=torch.float64, device="cpu") if weights is None
             else torch.as_tensor(weights, device="cpu").double())
        if w.shape != (c,) or bool(torch.any(w <= 0)):
            raise ValueError("weights must be [C] and positive")
        self.means, self.stds, self.weights = means.contiguous(), stds.contiguous(), w / w.sum()
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.dim,)

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        mu = self.means.to(x)  # [C, d]
        var = (self.stds**2).to(x)  # [C, d]
        sig2 = sigma.to(x).reshape(-1, 1, 1) ** 2  # [B, 1, 1]
        tot = var[None] + sig2  # [B, C, d]
        diff = x[:, None, :] - mu[None]  # [B, C, d]
        logp = -0.5 * ((diff**2) / tot + torch.log(2 * math.pi * tot)).sum(-1) + torch.log(self.weights.to(x))
        resp = torch.softmax(logp, dim=1)  # [B, C]
        post = mu[None] + var[None] / tot * diff  # [B, C, d]
        return torch.einsum("bc,bcd->bd", resp, post)

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """Draw n data points x0 (float64)."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, dtype=torch.float64, generator=generator, device="cpu")
        return self.means[comp] + self.stds[comp] * eps

    @classmethod
    def random(
        cls,
        dim: int,
        *,
        n_components: int = 12,
        std_range: tuple[float, float] = (0.03, 0.12),
        mean_range: tuple[float, float] = (-0.7, 0.7),
        seed: int = 0,
        **kwargs: float,
    ) -> GaussianMixture:
        """A seeded random mixture: means uniform in `mean_range`, per-dimension stds uniform in `std_range`."""
        if dim < 1 or n_components < 1:
            raise ValueError(f"dim and n_components must be >= 1, got {dim}, {n_components}")
        g = torch.Generator().manual_seed(seed)
        lo, hi = mean_range
        means = lo + (hi - lo) * torch.rand(n_components, dim, generator=g, dtype=torch.float64, device="cpu")
        slo, shi = std_range
        stds = slo + (shi - slo) * torch.rand(n_components, dim, generator=g, dtype=torch.float64, device="cpu")
        weights = 0.5 + torch.rand(n_components, generator=g, dtype=torch.float64, device="cpu")
        return cls(means, stds, weights, **kwargs)


def builtin_mixture(dim: int = 64, seed: int = 0) -> GaussianMixture:
    """The benchmark mixture: 12 components, stds 0.03-0.12, means in [-0.7, 0.7]."""
    return GaussianMixture.random(dim, n_components=12, seed=seed)


class SingleGaussian(GaussianMixture):
    """One Gaussian `N(mu, diag(s^2))`: the ODE has a closed-form solution, for solver-order tests.

    The flow is affine per dimension: `x(sigma) = mu + (x(sigma') - mu) sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma'^2)`.
    """

    def __init__(self, mean: Tensor, std: Tensor, **kwargs: float) -> None:
        mean = torch.as_tensor(mean, dtype=torch.float64, device="cpu").reshape(1, -1)
        std = torch.as_tensor(std, dtype=torch.float64, device="cpu").reshape(1, -1).expand_as(mean)
        super().__init__(mean, std, **kwargs)

    def exact_flow(self, x: Tensor, sigma_from: float, sigma_to: float) -> Tensor:
        var = (self.stds[0] ** 2).to(x)
        mu = self.means[0].to(x)
        return mu + (x - mu) * torch.sqrt(var + sigma_to**2) / torch.sqrt(var + sigma_from**2)


class ConditionalMixture:
    """A class-conditional exact model: class c's data is its own Gaussian mixture (the conditional toy model).

    `D(x, sigma, cond)` with `cond` [B] class indices into `conditions`; with `guidance_scale` w != 1 it returns the
    classifier-free-guided denoiser `D_uncond + w (D_cond - D_uncond)` (D_uncond: the marginal over classes), as
    conditional samplers run it. Satisfies `fewstep_search.denoiser.ConditionalDenoiser`.
    """

    prediction_type = "x0"

    def __init__(self, classes: list[GaussianMixture], *, conditions: tuple[object, ...] | None = None,
                 guidance_scale: float = 1.0) -> None:
        if not classes:
            raise ValueError("a conditional mixture needs at least one class")
        dims = {c.dim for c in classes}
        if len(dims) != 1:
            raise ValueError(f"every class must have the same dimension, got {sorted(dims)}")
        self.classes = list(classes)
        self.conditions = tuple(conditions) if conditions is not None else tuple(range(len(classes)))
        if len(self.conditions) != len(classes):
            raise ValueError(f"{len(self.conditions)} conditions for {len(classes)} classes")
        self.guidance_scale = float(guidance_scale)
        self.sigma_min, self.sigma_max = classes[0].sigma_min, classes[0].sigma_max
        self.marginal = GaussianMixture(torch.cat([c.means for c in classes]), torch.cat([c.stds for c in classes]),
                                        torch.cat([c.weights / len(classes) for c in classes]),
                                        sigma_min=self.sigma_min, sigma_max=self.sigma_max)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.classes[0].shape

    def __call__(self, x: Tensor, sigma: Tensor, cond: Tensor) -> Tensor:
        cond = cond.to(x.device).long()
        out = torch.empty_like(x)
        for c in torch.unique(cond).tolist():
            rows = cond == c
            out[rows] = self.classes[c](x[rows], sigma[rows])
        if self.guidance_scale != 1.0:
            uncond = self.marginal(x, sigma)
            out = uncond + self.guidance_scale * (out - uncond)
        return out

    @classmethod
    def random(cls, dim: int, *, n_classes: int = 3, components: int = 4, seed: int = 0,
               conditions: tuple[object, ...] | None = None, guidance_scale: float = 1.0) -> ConditionalMixture:
        """Seeded classes whose means sit in separate parts of space (so the conditions really differ)."""
        classes = []
        for c in range(n_classes):
            offset = -0.6 + 1.2 * c / max(n_classes - 1, 1)
            classes.append(GaussianMixture.random(dim, n_components=components, seed=seed + 101 * c,
                                                  mean_range=(offset - 0.25, offset + 0.25)))
        return cls(classes, conditions=conditions, guidance_scale=guidance_scale)


def conditional_mixture(*, conditions: list[object] | None = None, dim: int = 8, seed: int = 0,
                        guidance_scale: float = 1.0, device: str = "cpu") -> ConditionalMixture:
    """Factory for studies: `kind = "factory"`, `factory = "fewstep_search.models.mixture:conditional_mixture"`,
    with `conditions = [...]` in the [model] table (one class per condition)."""
    conds = tuple(conditions) if conditions else (0, 1, 2)
    return ConditionalMixture.random(dim, n_classes=len(conds), seed=seed, conditions=conds,
                                     guidance_scale=guidance_scale)
