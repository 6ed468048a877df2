"""Align Your Steps-style schedules (Sabour, Fidler & Kreis, ICML 2024, "Align Your Steps: Optimizing Sampling
Schedules in Diffusion Models"): minimize a KL-divergence upper bound (KLUB) between the true generative SDE and
the linearized SDE a solver integrates exactly on each step, by coordinate-wise iterative refinement; move a
schedule to another step count by log-linear interpolation.

KLUB (section 3, EDM convention sigma(t) = t, s(t) = 1). On step i the solver freezes the denoiser at the step's
start t_i; Girsanov's theorem bounds the KL divergence between the path measures by

    KLUB(t_0 .. t_N) = sum_i  int_{t_{i-1}}^{t_i} (1 / t^3) E || D(x_t, t) - D(x_{t_i}, t_i) ||^2 dt,
    the expectation over x_0 ~ data, x_t ~ p(x_t | x_0), x_{t_i} ~ p(x_{t_i} | x_t)

(the drift difference 2 (D(x_t, t) - D(x_{t_i}, t_i)) / t over the diffusion g^2 = 2t of the EDM SDE). It is
estimated by Monte Carlo on data: x_{t_i} = x_0 + t_i eps and x_t from the Brownian bridge between x_0 and
x_{t_i} (the forward process's joint law of the pair), with the samples (x_0, eps, eps') drawn once and reused
for every evaluation (common random numbers: the estimate is a deterministic function of the schedule, so the
search below never increases it), and the t-integral done by Gauss-Legendre quadrature in log t
(`int f(t) t^-3 dt = int f(e^l) e^(-2l) dl`). Reported per dimension (divided by d).

Optimization (the paper's iterative refinement): sweep the interior nodes; for each, evaluate candidates inside
its bracket (t_{i+1}, t_{i-1}) on a log-t grid (only the two intervals it touches change) and keep the best one
if it lowers the estimate; the candidate window halves after every sweep; early stopping ends the search when a
sweep improves the KLUB by less than `tol` (relative), or after `max_sweeps`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fewstep_search.denoiser import Denoiser, is_conditional
from fewstep_search.schedules import Schedule, check_range, karras

__all__ = ["loglinear_interp", "KLUB", "AYSResult", "coordinate_search", "ays_schedule"]


def loglinear_interp(schedule: Schedule, nfe: int) -> Schedule:
    """AYS's log-linear interpolation: place the schedule's log sigmas at equal spacing on [0, 1] and read the
    piecewise-linear curve at `nfe + 1` equally spaced points. Keeps both endpoints; the identity at the same
    step count; strictly decreasing (a monotone interpolant of a strictly decreasing sequence)."""
    if isinstance(nfe, bool) or not isinstance(nfe, (int, np.integer)) or nfe < 1:
        raise ValueError(f"nfe must be a positive integer, got {nfe!r}")
    if nfe == schedule.nfe:
        return Schedule(schedule.sigmas, name=schedule.name)
    xs = np.linspace(0.0, 1.0, schedule.sigmas.size)
    out = np.exp(np.interp(np.linspace(0.0, 1.0, nfe + 1), xs, np.log(schedule.sigmas)))
    out[0], out[-1] = schedule.sigma_max, schedule.sigma_min
    return Schedule(out, name=f"{schedule.name}_loglinear{nfe}")


class KLUB:
    """Monte-Carlo KLUB of `denoiser` on data samples `x0` [n, *shape] with fixed noise (see the module docstring).

    Each interval costs `n * quad_points` denoiser rows (plus n for a new step start), batched by `batch_size`.
    """

    def __init__(self, denoiser: Denoiser, x0: Tensor, *, quad_points: int = 6, seed: int = 0,
                 batch_size: int | None = None) -> None:
        if is_conditional(denoiser):
            raise ValueError("the AYS KLUB here needs an unconditional model (data samples carry no condition)")
        if x0.ndim < 2 or x0.shape[0] < 1:
            raise ValueError(f"x0 must be [n, *shape] with n >= 1, got shape {tuple(x0.shape)}")
        if quad_points < 1:
            raise ValueError(f"quad_points must be >= 1, got {quad_points}")
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        self.denoiser, self.x0 = denoiser, x0
        self.eps = torch.randn(x0.shape, generator=g, dtype=torch.float64, device="cpu").to(x0)
        self.eps2 = torch.randn(x0.shape, generator=g, dtype=torch.float64, device="cpu").to(x0)
        nodes, weights = np.polynomial.legendre.leggauss(quad_points)
        self.nodes, self.weights = (nodes + 1) / 2, weights / 2
        self.batch_size = batch_size or 4096
        self._cache: dict[float, Tensor] = {}
        self.evaluations = 0  # intervals evaluated
        self.dim = int(np.prod(x0.shape[1:]))

    def _denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        out = []
        with torch.no_grad():
            for lo in range(0, x.shape[0], self.batch_size):
                out.append(self.denoiser(x[lo : lo + self.batch_size], sigma[lo : lo + self.batch_size]))
        return torch.cat(out)

    def _d_hi(self, hi: float) -> Tensor:
        """D(x_hi, hi) at x_hi = x0 + hi eps (cached: every candidate below a fixed node shares it)."""
        if hi not in self._cache:
            if len(self._cache) >= 64:
                self._cache.pop(next(iter(self._cache)))
            x_hi = self.x0 + hi * self.eps
            sigma = torch.full((x_hi.shape[0],), hi, dtype=x_hi.dtype, device=x_hi.device)
            self._cache[hi] = self._denoise(x_hi, sigma)
        return self._cache[hi]

    def _sq_dist(self, t: Tensor, hi: float) -> Tensor:
        """E_k ||D(x_t, t) - D(x_hi, hi)||^2 for each quadrature time t [Q] (mean over the n samples).

        Sampled through the bridge: x_hi = x0 + hi eps, then x_t | x_hi = x0 + (t/hi)^2 (x_hi - x0)
        + t sqrt(1 - (t/hi)^2) eps' (the same joint law as x_t = x0 + t eps, x_hi = x_t + sqrt(hi^2 - t^2) eps'),
        so D(x_hi, hi) is one evaluation per sample whatever the number of quadrature nodes.
        """
        n, q = self.x0.shape[0], t.numel()
        view = (q, 1) + (1,) * (self.x0.ndim - 1)
        tt = t.to(self.x0).reshape(view)
        frac = tt / hi
        x_t = self.x0[None] + tt * frac * self.eps[None] + tt * torch.sqrt(torch.clamp(1 - frac**2, min=0.0)) * \
            self.eps2[None]
        sig_t = tt.expand(q, n, *([1] * (self.x0.ndim - 1))).reshape(-1)
        d_t = self._denoise(x_t.flatten(0, 1), sig_t).reshape(q, n, -1)
        d_hi = self._d_hi(hi).reshape(1, n, -1)
        return (d_t - d_hi).double().pow(2).sum(-1).mean(1).cpu()

    def interval(self, lo: float, hi: float) -> float:
        """`int_lo^hi t^-3 E||D(x_t, t) - D(x_hi, hi)||^2 dt / d` for one step from hi down to lo (0 < lo < hi)."""
        if not 0 < lo < hi:
            raise ValueError(f"an interval needs 0 < lo < hi, got lo={lo}, hi={hi}")
        l_lo, l_hi = math.log(lo), math.log(hi)
        ls = l_lo + (l_hi - l_lo) * self.nodes
        sq = self._sq_dist(torch.tensor(np.exp(ls), dtype=torch.float64, device="cpu"), hi).numpy()
        self.evaluations += 1
        return float(np.sum(self.weights * np.exp(-2 * ls) * sq) * (l_hi - l_lo) / self.dim)

    def total(self, sigmas: np.ndarray | Schedule) -> float:
        """The KLUB of a whole schedule (descending sigmas)."""
        s = sigmas.sigmas if isinstance(sigmas, Schedule) else np.asarray(sigmas, dtype=np.float64)
        return float(sum(self.interval(float(s[i + 1]), float(s[i])) for i in range(s.size - 1)))


@dataclass(frozen=True)
class AYSResult:
    """The refined schedule, the KLUB after each sweep (history[0]: the start), and the intervals evaluated."""

    schedule: Schedule
    history: tuple[float, ...]
    evaluations: int


def coordinate_search(klub: KLUB, start: Schedule, *, candidates: int = 5, max_sweeps: int = 4,
                      tol: float = 1e-3, shrink: float = 0.5) -> AYSResult:
    """AYS's iterative refinement of `start` (see the module docstring); never increases the KLUB estimate."""
    if candidates < 1 or max_sweeps < 0 or not 0 < shrink <= 1 or tol < 0:
        raise ValueError("need candidates >= 1, max_sweeps >= 0, 0 < shrink <= 1 and tol >= 0")
    s = np.array(start.sigmas, dtype=np.float64)
    n = s.size - 1
    costs = [klub.interval(s[i + 1], s[i]) for i in range(n)]  # costs[i]: step from s[i] down to s[i+1]
    history = [float(sum(costs))]
    width = 1.0
    for _ in range(max_sweeps):
        for i in range(1, n):
            top, bottom, cur = math.log(s[i - 1]), math.log(s[i + 1]), math.log(s[i])
            half = width * (top - bottom) / 2
            lo, hi = max(bottom, cur - half), min(top, cur + half)
            best, choice = costs[i - 1] + costs[i], None
            for c in np.linspace(lo, hi, candidates + 2)[1:-1]:
                v = math.exp(c)
                if not s[i + 1] < v < s[i - 1] or v == s[i]:
                    continue
                above, below = klub.interval(v, s[i - 1]), klub.interval(s[i + 1], v)
                if above + below < best:
                    best, choice = above + below, (v, above, below)
            if choice is not None:
                s[i], costs[i - 1], costs[i] = choice
        history.append(float(sum(costs)))
        width *= shrink
        if history[-2] - history[-1] <= tol * history[-2]:  # early stopping
            break
    return AYSResult(Schedule(s, name="ays"), tuple(history), klub.evaluations)


def ays_schedule(denoiser: Denoiser, data: Tensor, nfe: int, sigma_min: float, sigma_max: float, *,
                 init: Schedule | None = None, quad_points: int = 6, candidates: int = 5, max_sweeps: int = 4,
                 tol: float = 1e-3, seed: int = 0, batch_size: int | None = None) -> AYSResult:
    """An AYS-style schedule of `nfe` steps for `denoiser` on data samples `data` [n, *shape].

    `init` (default EDM rho = 7) may have any step count: it is moved to `nfe` steps by `loglinear_interp` (the
    paper's way to reuse an optimized schedule at another budget) and must span [sigma_min, sigma_max].
    """
    check_range(nfe, sigma_min, sigma_max)
    start = loglinear_interp(init, nfe) if init is not None else karras(nfe, sigma_min, sigma_max)
    if not (math.isclose(start.sigma_max, sigma_max, rel_tol=1e-9)
            and math.isclose(start.sigma_min, sigma_min, rel_tol=1e-9)):
        raise ValueError(f"init must span [{sigma_min:g}, {sigma_max:g}], got {start}")
    klub = KLUB(denoiser, data, quad_points=quad_points, seed=seed, batch_size=batch_size)
    return coordinate_search(klub, start, candidates=candidates, max_sweeps=max_sweeps, tol=tol)
