"""Schedule parameterizations: the coordinates an optimizer moves, mapped differentiably to a valid schedule.

Every parameterization maps a real vector `theta [P]` to `nfe + 1` descending sigmas with the exact endpoints
`sigma_max` and `sigma_min` (docs/design.md section 2). Interior nodes are described by their position in log
sigma, `p = log(sigma_max / sigma) / log(sigma_max / sigma_min)` in (0, 1) (0 at sigma_max, 1 at sigma_min),
so each family below is a monotone map from `t = i / nfe` to `p`:

| name      | P     | theta                                           | default                           |
|-----------|-------|-------------------------------------------------|-----------------------------------|
| logits    | N     | softmax logits of the N log-sigma decrements    | zeros: uniform in log sigma       |
| nodes     | N - 1 | the interior positions p_i themselves           | with monotone linear constraints  |
| edm_rho   | 3     | (rho, p_hi, p_lo): EDM rho-ramp, free endpoints | (7, 0, 1): Karras et al. rho = 7  |
| beta_warp | 2     | (log a, log b): p = BetaCDF(t; a, b)            | (0, 0): uniform in log sigma      |
| spline    | knots | softmax increments of a monotone cubic (PCHIP)  | zeros: uniform in log sigma       |
| grid      | N - 1 | interior indices on the bank's grid (discrete)  | for the exact DP only             |

Call order (one instance per trial, no state between calls):
`p = make_parameterization(name, nfe=N, sigma_min=lo, sigma_max=hi)`; `theta0 = p.encode(start)`; then any
number of `p.decode(theta)`. `bounds()` are the feasible box (infinite where free); `search_box()` is a finite
box for samplers (Optuna); `linear_constraints()` is `(A, lb, ub)` with `lb <= A theta <= ub` where
feasibility needs more than a box.

Example:
    >>> import torch
    >>> p = make_parameterization("edm_rho", nfe=4, sigma_min=0.002, sigma_max=80.0)
    >>> [round(float(s), 3) for s in p.decode(torch.tensor(p.default()))]
    [80.0, 17.149, 2.53, 0.211, 0.002]
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from fewstep_search.schedules import Schedule, logits_from_sigmas, sigmas_from_logits

__all__ = [
    "Parameterization",
    "Logits",
    "Nodes",
    "EdmRho",
    "BetaWarp",
    "MonotoneSpline",
    "GridIndices",
    "PARAMETERIZATIONS",
    "make_parameterization",
    "beta_cdf",
]

MIN_GAP = 1e-4
"""Smallest gap between neighbouring positions (units of the log-sigma span) that `nodes` allows."""


class Parameterization(ABC):
    """A differentiable map theta -> schedule for one budget and noise range (see the module docstring)."""

    name: ClassVar[str]
    differentiable: ClassVar[bool] = True

    def __init__(self, *, nfe: int, sigma_min: float, sigma_max: float) -> None:
        if nfe < 1:
            raise ValueError(f"nfe must be >= 1, got {nfe}")
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.nfe, self.sigma_min, self.sigma_max = int(nfe), float(sigma_min), float(sigma_max)
        self.span = math.log(self.sigma_max / self.sigma_min)

    @property
    @abstractmethod
    def dim(self) -> int:
        """P, the number of coordinates."""

    @abstractmethod
    def default(self) -> np.ndarray:
        """A canonical feasible theta (the family's best-known member)."""

    @abstractmethod
    def decode(self, theta: Tensor) -> Tensor:
        """theta [P] (float64) -> sigmas [nfe + 1], descending, exact endpoints; differentiable in theta."""

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Feasible box (lower, upper), +-inf where a coordinate is free."""
        return np.full(self.dim, -np.inf), np.full(self.dim, np.inf)

    def search_box(self) -> tuple[np.ndarray, np.ndarray]:
        """A finite box for samplers; the feasible box by default."""
        return self.bounds()

    def linear_constraints(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(A, lb, ub) with `lb <= A theta <= ub`, or None when the box alone is feasible."""
        return None

    def encode(self, start: Schedule) -> np.ndarray:
        """The theta whose schedule is closest to `start` (least squares in log sigma, inside the box).

        Exact for the free parameterizations (they override this); a fit for the low-dimensional families.
        """
        self._check_start(start)
        from scipy.optimize import minimize

        target = torch.tensor(np.log(start.sigmas), dtype=torch.float64, device="cpu")

        def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
            th = torch.tensor(x, dtype=torch.float64, device="cpu", requires_grad=True)
            loss = (torch.log(self.decode(th)) - target).pow(2).sum()
            loss.backward()
            return float(loss.detach()), th.grad.numpy().copy()  # type: ignore[union-attr]

        lo, hi = self.bounds()
        box = [(None if np.isinf(a) else a, None if np.isinf(b) else b) for a, b in zip(lo, hi, strict=True)]
        res = minimize(fun, self.default(), jac=True, method="L-BFGS-B", bounds=box, options={"maxiter": 200})
        return self.clip(np.asarray(res.x, dtype=np.float64))

    # ------------------------------------------------------------ helpers shared by the families

    def clip(self, theta: np.ndarray) -> np.ndarray:
        lo, hi = self.bounds()
        return np.clip(np.asarray(theta, dtype=np.float64), lo, hi)

    def schedule(self, theta: np.ndarray | Tensor, *, name: str | None = None) -> Schedule:
        """The (detached) schedule of theta."""
        th = torch.as_tensor(np.asarray(theta, dtype=np.float64) if not isinstance(theta, Tensor) else theta,
                             device="cpu")
        with torch.no_grad():
            return Schedule(self.decode(th.double()).numpy(), name=name or self.name)

    def _from_positions(self, p: Tensor) -> Tensor:
        """Interior positions p [N-1] in (0, 1) -> sigmas [N+1] with exact endpoints."""
        log_s = math.log(self.sigma_max) - self.span * p
        ends = p.new_tensor([self.sigma_max]), p.new_tensor([self.sigma_min])
        return torch.cat([ends[0], torch.exp(log_s), ends[1]])

    def _ramp(self) -> Tensor:
        """t_i = i / N for the interior nodes i = 1..N-1."""
        return torch.arange(1, self.nfe, dtype=torch.float64, device="cpu") / self.nfe

    def _check_start(self, start: Schedule) -> None:
        if start.nfe != self.nfe:
            raise ValueError(f"start schedule has nfe={start.nfe}, the parameterization nfe={self.nfe}")
        if not (
            math.isclose(start.sigma_max, self.sigma_max, rel_tol=1e-9)
            and math.isclose(start.sigma_min, self.sigma_min, rel_tol=1e-9)
        ):
            raise ValueError(
                f"start schedule spans [{start.sigma_min:g}, {start.sigma_max:g}], "
                f"the parameterization [{self.sigma_min:g}, {self.sigma_max:g}]"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(nfe={self.nfe}, dim={self.dim})"


class Logits(Parameterization):
    """Free log-sigma decrements: the shared softmax-logit form of `fewstep_search.schedules`."""

    name = "logits"
    SAMPLE_RANGE = 4.0
    """Samplers draw logits in [-4, 4]: decrement ratios up to e^8, beyond any useful schedule."""

    @property
    def dim(self) -> int:
        return self.nfe

    def default(self) -> np.ndarray:
        return np.zeros(self.nfe)

    def decode(self, theta: Tensor) -> Tensor:
        return sigmas_from_logits(theta, self.sigma_min, self.sigma_max)

    def encode(self, start: Schedule) -> np.ndarray:
        self._check_start(start)
        return logits_from_sigmas(start).numpy()

    def search_box(self) -> tuple[np.ndarray, np.ndarray]:
        return np.full(self.dim, -self.SAMPLE_RANGE), np.full(self.dim, self.SAMPLE_RANGE)


class Nodes(Parameterization):
    """The interior positions themselves, ordered by linear constraints (DM-NonUniform's trust-constr form).

    `decode` also repairs an unordered theta (each position pushed to at least MIN_GAP above the previous
    one), which is the identity on feasible points: optimizers that do not honour the constraints
    (or, like trust-constr, visit infeasible points on the way) still get a valid schedule.
    """

    name = "nodes"

    @property
    def dim(self) -> int:
        return self.nfe - 1

    def default(self) -> np.ndarray:
        return self._ramp().numpy()

    def decode(self, theta: Tensor) -> Tensor:
        lo, hi = (torch.tensor(b, device="cpu") for b in self.bounds())
        steps = torch.arange(theta.numel(), dtype=theta.dtype, device="cpu") * MIN_GAP
        # cummax of (p_i - i gap) makes every gap >= MIN_GAP; the per-node upper bounds keep the last below 1.
        return self._from_positions(torch.cummax(torch.clamp(theta, lo, hi) - steps, 0).values + steps)

    def encode(self, start: Schedule) -> np.ndarray:
        self._check_start(start)
        return np.log(self.sigma_max / start.sigmas[1:-1]) / self.span

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        i = np.arange(self.dim)
        return (i + 1) * MIN_GAP, 1.0 - (self.dim - i) * MIN_GAP

    def linear_constraints(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        if self.dim < 2:
            return None
        a = np.zeros((self.dim - 1, self.dim))
        idx = np.arange(self.dim - 1)
        a[idx, idx], a[idx, idx + 1] = -1.0, 1.0  # p_{i+1} - p_i >= MIN_GAP
        return a, np.full(self.dim - 1, MIN_GAP), np.full(self.dim - 1, np.inf)


class EdmRho(Parameterization):
    """EDM's rho-ramp (Karras et al. 2022, eq. 5) between free endpoints inside the model's range.

    theta = (rho, p_hi, p_lo): the ramp runs from `s_hi = sigma_max e^{-span p_hi}` to `s_lo = sigma_max
    e^{-span p_lo}` and the interior nodes are `(s_hi^{1/rho} + t_i (s_lo^{1/rho} - s_hi^{1/rho}))^rho`; the
    outer nodes stay at sigma_max and sigma_min (the trajectories start and end there). (7, 0, 1) is the EDM
    default.
    """

    name = "edm_rho"
    RHO_RANGE = (1.0, 15.0)
    HI_RANGE = (0.0, 0.4)
    LO_RANGE = (0.6, 1.0)

    @property
    def dim(self) -> int:
        return 3

    def default(self) -> np.ndarray:
        return np.array([7.0, 0.0, 1.0])

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = zip(self.RHO_RANGE, self.HI_RANGE, self.LO_RANGE, strict=True)
        return np.array(lo), np.array(hi)

    def decode(self, theta: Tensor) -> Tensor:
        rho, p_hi, p_lo = theta[0], theta[1], theta[2]
        log_hi = math.log(self.sigma_max) - self.span * p_hi
        log_lo = math.log(self.sigma_max) - self.span * p_lo
        a, b = torch.exp(log_hi / rho), torch.exp(log_lo / rho)
        t = self._ramp()
        log_s = rho * torch.log(a + t * (b - a))
        return self._from_positions((math.log(self.sigma_max) - log_s) / self.span)


def beta_cdf(x: Tensor, a: Tensor, b: Tensor, *, points: int = 64) -> Tensor:
    """Regularized incomplete beta `I_x(a, b)` for x in [0, 1], differentiable in a and b (torch has none).

    For x <= 1/2, substituting s = t^a gives `I_x = x^a / (2 a B(a, b)) sum_n w_n (1 - x q_n)^(b-1)` with
    Gauss-Legendre nodes `q_n = ((z_n + 1)/2)^(1/a)`; the integrand stays bounded since x q_n <= 1/2. For x >
    1/2 the symmetry `I_x(a, b) = 1 - I_{1-x}(b, a)` is used. Accurate to ~1e-6 for a, b in [1/3, 3].
    """
    z, w = np.polynomial.legendre.leggauss(points)
    u = torch.tensor((z + 1) / 2, dtype=torch.float64, device="cpu")
    wt = torch.tensor(w, dtype=torch.float64, device="cpu")
    log_beta = torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)

    def lower(xv: Tensor, p: Tensor, q: Tensor) -> Tensor:
        qn = u ** (1.0 / p)  # [n]
        inner = ((1.0 - xv[:, None] * qn[None, :]) ** (q - 1.0) * wt).sum(-1)
        return xv**p * inner / (2.0 * p * torch.exp(log_beta))

    flip = x > 0.5
    direct = lower(torch.where(flip, 0.5 * torch.ones_like(x), x), a, b)
    mirrored = 1.0 - lower(torch.where(flip, 1.0 - x, 0.5 * torch.ones_like(x)), b, a)
    return torch.where(flip, mirrored, direct)


class BetaWarp(Parameterization):
    """A Beta-CDF time warp: `p(t) = I_t(a, b)`, theta = (log a, log b); a = b = 1 is uniform in log sigma.

    a < 1 front-loads steps at high noise, b < 1 at low noise; two numbers span the usual heuristic shapes.
    """

    name = "beta_warp"
    LOG_RANGE = math.log(3.0)

    @property
    def dim(self) -> int:
        return 2

    def default(self) -> np.ndarray:
        return np.zeros(2)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return np.full(2, -self.LOG_RANGE), np.full(2, self.LOG_RANGE)

    def decode(self, theta: Tensor) -> Tensor:
        a, b = torch.exp(theta[0]), torch.exp(theta[1])
        return self._from_positions(beta_cdf(self._ramp(), a, b))


class MonotoneSpline(Parameterization):
    """A monotone cubic (PCHIP, Fritsch-Carlson) through `knots + 1` points of p(t), evaluated at t_i = i/N.

    theta [knots] are softmax logits of the knot increments (so the knot values rise from 0 to 1); the slopes
    are harmonic means of the neighbouring secants, which keeps every piece monotone. Zeros are uniform in log
    sigma.
    """

    name = "spline"
    SAMPLE_RANGE = 3.0

    def __init__(self, *, nfe: int, sigma_min: float, sigma_max: float, knots: int = 4) -> None:
        super().__init__(nfe=nfe, sigma_min=sigma_min, sigma_max=sigma_max)
        if knots < 1:
            raise ValueError(f"spline knots must be >= 1, got {knots}")
        self.knots = int(knots)

    @property
    def dim(self) -> int:
        return self.knots

    def default(self) -> np.ndarray:
        return np.zeros(self.knots)

    def search_box(self) -> tuple[np.ndarray, np.ndarray]:
        return np.full(self.dim, -self.SAMPLE_RANGE), np.full(self.dim, self.SAMPLE_RANGE)

    def decode(self, theta: Tensor) -> Tensor:
        k = self.knots
        h = 1.0 / k
        y = torch.cat([theta.new_zeros(1), torch.cumsum(torch.softmax(theta, 0), 0)])  # [k + 1]
        delta = (y[1:] - y[:-1]) / h  # secants, > 0
        inner = 2.0 * delta[:-1] * delta[1:] / (delta[:-1] + delta[1:])
        d = torch.cat([delta[:1], inner, delta[-1:]])  # [k + 1]
        t = self._ramp()
        seg = torch.clamp((t / h).floor().long(), max=k - 1)
        s = t / h - seg.double()
        h00, h10 = 2 * s**3 - 3 * s**2 + 1, s**3 - 2 * s**2 + s
        h01, h11 = -2 * s**3 + 3 * s**2, s**3 - s**2
        p = h00 * y[seg] + h10 * h * d[seg] + h01 * y[seg + 1] + h11 * h * d[seg + 1]
        return self._from_positions(p)


class GridIndices(Parameterization):
    """Interior nodes on the bank's log-sigma grid: theta = N - 1 grid indices (rounded). Not differentiable.

    The domain of the exact dynamic program (`fewstep_search.dp`); `grid` is the bank's descending grid.
    """

    name = "grid"
    differentiable = False

    def __init__(self, *, nfe: int, sigma_min: float, sigma_max: float, grid: Tensor | None = None) -> None:
        super().__init__(nfe=nfe, sigma_min=sigma_min, sigma_max=sigma_max)
        if grid is None:
            raise ValueError("the 'grid' parameterization needs the bank's grid")
        self.grid = torch.as_tensor(grid, dtype=torch.float64, device="cpu")  # coordinates live on the CPU
        if self.grid.numel() < nfe + 1:
            raise ValueError(
                f"nfe={nfe} needs a grid of at least {nfe + 1} points, the grid has {self.grid.numel()}"
            )

    @property
    def dim(self) -> int:
        return self.nfe - 1

    def default(self) -> np.ndarray:
        m = self.grid.numel()
        return np.round(np.linspace(0, m - 1, self.nfe + 1)[1:-1])

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        m = self.grid.numel()
        return np.full(self.dim, 1.0), np.full(self.dim, m - 2.0)

    def decode(self, theta: Tensor) -> Tensor:
        m = self.grid.numel()
        idx = torch.cat([torch.zeros(1, device="cpu"), theta.detach().cpu().round(),
                         torch.full((1,), m - 1.0, device="cpu")]).long()
        if not bool(torch.all(idx[1:] > idx[:-1])):
            raise ValueError(f"grid indices must be strictly increasing, got {idx.tolist()}")
        return self.grid[idx]

    def encode(self, start: Schedule) -> np.ndarray:
        self._check_start(start)
        lg = torch.log(self.grid).numpy()
        nearest = np.abs(lg[None, :] - np.log(start.sigmas[1:-1])[:, None]).argmin(1)
        idx, n, m = nearest.copy(), nearest.size, self.grid.numel()
        for i in range(n):  # strictly increasing, at least 1 ...
            idx[i] = max(idx[i], idx[i - 1] + 1 if i else 1)
        for i in range(n - 1, -1, -1):  # ... and leaving room below for the later nodes
            idx[i] = min(idx[i], idx[i + 1] - 1 if i < n - 1 else m - 2)
        return idx.astype(np.float64)


PARAMETERIZATIONS: dict[str, type[Parameterization]] = {
    cls.name: cls for cls in (Logits, Nodes, EdmRho, BetaWarp, MonotoneSpline, GridIndices)
}


def make_parameterization(
    name: str, *, nfe: int, sigma_min: float, sigma_max: float, grid: Tensor | None = None, **options: Any
) -> Parameterization:
    """Build a parameterization by name; `grid` (the bank's) is passed only to the one that needs it."""
    try:
        cls = PARAMETERIZATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown parameterization {name!r}; known: {', '.join(PARAMETERIZATIONS)}"
        ) from None
    if name == GridIndices.name:
        options = {**options, "grid": grid}
    try:
        return cls(nfe=nfe, sigma_min=sigma_min, sigma_max=sigma_max, **options)
    except TypeError as exc:
        raise ValueError(f"parameterization {name!r}: bad options {sorted(options)} ({exc})") from None
