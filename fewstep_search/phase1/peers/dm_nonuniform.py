"""DM-NonUniform (Xue et al., CVPR 2024, "Accelerating Diffusion Sampling with Optimized Time Steps"): a model-free
objective over the half log-SNR `lambda = -log sigma` for a multistep data-prediction (DDIM / DPM-Solver++) solver,
minimized with scipy's `trust-constr` under monotone linear constraints.

Derivation (section 3 of the paper, in the EDM convention). Over one step from lambda_n to lambda_{n+1} the exact
solution of the data-prediction ODE is `x_{n+1} = (sigma_{n+1}/sigma_n) x_n + sigma_{n+1} int e^lambda x_theta dlambda`,
and the solvers replace x_theta by the Lagrange polynomial through their last k evaluations (k = 1: DDIM; k = 2, 3:
the multistep DPM-Solver++ / UniPC predictor, lower order on the first steps). Unrolled, the output is
`(sigma_min/sigma_max) x_N + sigma_min sum_m c_m x_theta(lambda_m)` with node coefficients

    c_m = sum_n J_{n,m},   J_{n,m} = int_{lambda_n}^{lambda_{n+1}} e^lambda l_{n,m}(lambda) dlambda

(l_{n,m} the Lagrange basis of step n). The interpolation is exact on constants, so writing
`x_theta(lambda_m) = x_0 + e_m` the x_0 parts match the exact integral, and the error is bounded by the model-free

    L(lambda_1, ..., lambda_{N-1}) = sigma_min * sum_m |c_m| * w(lambda_m)   (triangle inequality),

with the data-prediction error scale `w(lambda) = sigma_t^2 / alpha_t` of the VP process with that half log-SNR
(`error_model="paper"`) or `w = 1` (`"unit"`). As in the authors' formulation, the first three steps' terms are
instead combined in quadrature per step and never offset against later steps (`dmn_objective`). L depends on the
schedule only: neither the model nor the data enter, so one schedule serves every model with the same noise range.

Solvers: "ddim" (order 1; then c_m are the convex weights of `fewstep_search.objectives.convex_weights`),
"lagrange2" / "lagrange3" (the paper's exact Lagrange integrals, orders 2 / 3 with lower-order warm start), and
"dpmpp_2m" (the coefficients of `fewstep_search.solvers.dpmpp_2m`, which approximates the order-2 integral with
phi_1 only). `lower_order_final` lowers the order of the last steps too (orders ..., 3, 2, 1), as DPM-Solver does for
few steps and as the authors' objective does.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np

from fewstep_search.schedules import Schedule, check_range, karras, log_uniform

__all__ = ["DMN_SOLVERS", "ErrorModel", "step_weights", "node_coefficients", "error_weight", "dmn_objective",
           "dm_nonuniform_schedule"]

DMN_SOLVERS = ("ddim", "lagrange2", "lagrange3", "dpmpp_2m")
ErrorModel = Literal["paper", "unit"]


def _orders(solver: str, n_steps: int, lower_order_final: bool) -> list[int]:
    if solver not in DMN_SOLVERS:
        raise ValueError(f"unknown DM-NonUniform solver {solver!r}; known: {', '.join(DMN_SOLVERS)}")
    top = {"ddim": 1, "lagrange2": 2, "dpmpp_2m": 2, "lagrange3": 3}[solver]
    orders = [min(top, n + 1) for n in range(n_steps)]  # warm start: lower order while history is short
    if lower_order_final:
        orders = [min(k, n_steps - n) for n, k in enumerate(orders)]
    return orders


def _exp_moments(h: float, p_max: int) -> list[float]:
    """I_p(h) = int_0^h e^u u^p du for p = 0..p_max (I_0 = e^h - 1, I_p = e^h h^p - p I_{p-1})."""
    moments = [math.expm1(h)]
    for p in range(1, p_max + 1):
        moments.append(math.exp(h) * h**p - p * moments[-1])
    return moments


def _basis_coefficients(nodes: list[float], m: int) -> list[float]:
    """Monomial coefficients (ascending powers of u) of the Lagrange basis polynomial l_m on `nodes` (in u)."""
    coeffs, denom = [1.0], 1.0
    for i, root in enumerate(nodes):
        if i == m:
            continue
        shifted = [0.0] + coeffs  # u * poly
        coeffs = [s - root * (coeffs[p] if p < len(coeffs) else 0.0) for p, s in enumerate(shifted)]
        denom *= nodes[m] - root
    return [c / denom for c in coeffs]


def step_weights(lambdas: Sequence[float], *, solver: str = "lagrange3",
                 lower_order_final: bool = True) -> list[dict[int, float]]:
    """J: for each step n, {node m: J_{n,m}}, from the ascending node vector `lambdas` [N + 1]."""
    lam = [float(v) for v in lambdas]
    out: list[dict[int, float]] = []
    for n, k in enumerate(_orders(solver, len(lam) - 1, lower_order_final)):
        h = lam[n + 1] - lam[n]
        scale = math.exp(lam[n])
        if solver == "dpmpp_2m" and k == 2:
            r = (lam[n] - lam[n - 1]) / h
            phi = scale * math.expm1(h)
            out.append({n: phi * (1 + 1 / (2 * r)), n - 1: -phi / (2 * r)})
            continue
        nodes = [lam[n - i] - lam[n] for i in range(k)]  # u-coordinates, newest first (u_0 = 0)
        moments = _exp_moments(h, k - 1)
        out.append({n - i: scale * sum(a * mo for a, mo in zip(_basis_coefficients(nodes, i), moments, strict=True))
                    for i in range(k)})
    return out


def node_coefficients(lambdas: Sequence[float], *, solver: str = "lagrange3",
                      lower_order_final: bool = True) -> np.ndarray:
    """c [N]: sigma_min times the weight of the model output at node m (m = 0..N-1) in the unrolled solver."""
    c = np.zeros(len(lambdas) - 1)
    for step in step_weights(lambdas, solver=solver, lower_order_final=lower_order_final):
        for m, j in step.items():
            c[m] += j
    return c * math.exp(-float(lambdas[-1]))


def error_weight(lam: float, error_model: ErrorModel = "paper") -> float:
    """w(lambda): the assumed size of the model's data-prediction error at half log-SNR lambda."""
    if error_model == "unit":
        return 1.0
    if error_model == "paper":  # sigma_t^2 / alpha_t of the VP process: sigma^2 = 1/(1+e^{2l}), alpha^2 = 1/(1+e^{-2l})
        return math.sqrt(1 + math.exp(-2 * lam)) / (1 + math.exp(2 * lam))
    raise ValueError(f"unknown error model {error_model!r}; expected 'paper' or 'unit'")


def dmn_objective(lambdas: Sequence[float], *, solver: str = "lagrange3", lower_order_final: bool = True,
                  error_model: ErrorModel = "paper", independent_steps: int = 3) -> float:
    """L(lambdas) for the full ascending node vector [N + 1].

    The first `independent_steps` steps' error terms are combined in quadrature within each step
    (`sqrt(sum_m (J_{n,m} w_m)^2)`, errors of independent size) and never offset against other steps; the later
    steps' terms are summed per node, `sum_m |sum_n J_{n,m}| w_m`. Without that split a multistep objective can
    cancel the first node's coefficient exactly (J_{1,0} < 0 offsets J_{0,0}) and rates a huge first step as free.
    """
    lam = [float(v) for v in lambdas]
    w = [error_weight(v, error_model) for v in lam[:-1]]
    total, c = 0.0, [0.0] * (len(lam) - 1)
    for n, step in enumerate(step_weights(lam, solver=solver, lower_order_final=lower_order_final)):
        if n < independent_steps:
            total += math.sqrt(sum((j * w[m]) ** 2 for m, j in step.items()))
        else:
            for m, j in step.items():
                c[m] += j * w[m]
    return (total + sum(abs(v) for v in c)) * math.exp(-lam[-1])


def dm_nonuniform_schedule(nfe: int, sigma_min: float, sigma_max: float, *, solver: str = "lagrange3",
                           lower_order_final: bool = True, error_model: ErrorModel = "paper",
                           independent_steps: int = 3, init: Schedule | None = None, maxiter: int = 300,
                           gap: float = 1e-4) -> Schedule:
    """The DM-NonUniform schedule: `min L` over the interior lambdas with scipy `trust-constr` (central-difference
    gradients, a BFGS Hessian) and the monotone constraints `lambda_{i+1} - lambda_i >= gap * span` (endpoints
    fixed).

    The defaults are the authors' setting: order 3 with lower-order warm start and final steps (1, 2, 3, ..., 3,
    2, 1), the error model sigma^2 / alpha, the first three steps in quadrature. `init` must span
    [sigma_min, sigma_max]; by default the search starts from both uniform-in-lambda (the paper's 'unif') and
    EDM rho = 7 ('edm') and keeps the lower objective (the objective has local minima).
    """
    from scipy.optimize import BFGS, LinearConstraint, minimize

    check_range(nfe, sigma_min, sigma_max)
    _orders(solver, nfe, lower_order_final)  # validates the solver name
    lam_lo, lam_hi = -math.log(sigma_max), -math.log(sigma_min)
    if nfe == 1:
        return Schedule(np.array([sigma_max, sigma_min]), name="dm_nonuniform")
    starts = [init] if init is not None else [log_uniform(nfe, sigma_min, sigma_max), karras(nfe, sigma_min, sigma_max)]
    for start in starts:
        if start.nfe != nfe or not (math.isclose(start.sigma_max, sigma_max, rel_tol=1e-9)
                                    and math.isclose(start.sigma_min, sigma_min, rel_tol=1e-9)):
            raise ValueError(f"init must be a {nfe}-step schedule on [{sigma_min:g}, {sigma_max:g}], got {start}")
    min_gap = gap * (lam_hi - lam_lo)

    def fun(theta: np.ndarray) -> float:
        return dmn_objective([lam_lo, *theta, lam_hi], solver=solver, lower_order_final=lower_order_final,
                             error_model=error_model, independent_steps=independent_steps)

    k = nfe - 1  # differences lambda_1 - lambda_0, ..., lambda_N - lambda_{N-1} as A theta + const >= gap
    a = np.zeros((nfe, k))
    for i in range(k):
        a[i, i], a[i + 1, i] = 1.0, -1.0
    lb = np.full(nfe, min_gap)
    lb[0] += lam_lo
    lb[-1] -= lam_hi
    constraint = LinearConstraint(a, lb, np.full(nfe, np.inf))
    best, best_value = None, math.inf
    for start in starts:
        theta0 = np.clip(start.lambdas()[1:-1], lam_lo + min_gap, lam_hi - min_gap)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "delta_grad == 0.0" from the BFGS update on flat directions
            res = minimize(fun, theta0, jac="3-point", hess=BFGS(), method="trust-constr",
                           constraints=[constraint], options={"maxiter": int(maxiter), "xtol": 1e-6})
        for theta in (res.x, theta0):
            value = fun(theta)
            if value < best_value:
                best, best_value = theta, value
    lambdas = np.concatenate([[lam_lo], np.sort(best), [lam_hi]])
    sigmas = np.exp(-lambdas)
    sigmas[0], sigmas[-1] = sigma_max, sigma_min
    return Schedule(sigmas, name="dm_nonuniform")
