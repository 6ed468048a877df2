"""The sampler a Phase-2 student is trained for, written as steps that are affine in the step's own output.

Why: the per-step loss (docs/design.md section 1) regresses the student's output D_j at its own state x_j onto the
output that would put its next state on the teacher's accurate solve y_j from x_j. For a sampler whose step is
`x_{j+1} = base_j + gain_j * D_j` (the chain's earlier outputs fixed) that output is `(y_j - base_j) / gain_j`,
and an error in D_j reaches x_{j+1} multiplied by `gain_j`, the factor of the loss weight. Two families:

* first order (DDIM, Euler in the EDM convention): `base = r x`, `gain = 1 - r`, `r = sigma_{j+1} / sigma_j`;
  the target is the teacher's `D_bar` itself;
* iPNDM (`fewstep_search.solvers.ipndm`): Adams-Bashforth on `eps = (x - D) / sigma` with the chain's earlier
  eps fixed: `x_{j+1} = x_j + h (a_0 (x_j - D_j) / sigma_j + sum_{m >= 1} a_m eps_{j-m})`, `h = sigma_{j+1} -
  sigma_j`, so `gain = -h a_0 / sigma_j = a_0 (1 - r)`; its first step is DDIM's.

A step into sigma = 0 lands on D (both solvers' export convention): `base = 0`, `gain = 1`.
"""

from __future__ import annotations

from torch import Tensor

from fewstep_search.solvers import _AB_COEFFS, FIRST_ORDER_SOLVERS

__all__ = ["FIRST_ORDER_SOLVERS", "PHASE2_SOLVERS", "SamplerChain", "step_gains", "check_phase2_solver"]

PHASE2_SOLVERS = (*FIRST_ORDER_SOLVERS, "ipndm")
"""Solvers a student can be trained for (the loop trains the search's winner when it uses one of them)."""


def check_phase2_solver(solver: str) -> None:
    if solver not in PHASE2_SOLVERS:
        raise ValueError(f"Phase-2 trains for the solvers {', '.join(PHASE2_SOLVERS)}, not {solver!r}")


def step_gains(solver: str, sigmas: tuple[float, ...]) -> list[float]:
    """gain_j of every step (they depend on the schedule only, not on the states)."""
    check_phase2_solver(solver)
    out = []
    for j in range(len(sigmas) - 1):
        s, s_next = sigmas[j], sigmas[j + 1]
        if s_next == 0.0:
            out.append(1.0)
            continue
        a0 = 1.0 if solver in FIRST_ORDER_SOLVERS else _AB_COEFFS[min(j, len(_AB_COEFFS) - 1)][0]
        out.append(a0 * (1.0 - s_next / s))
    return out


class SamplerChain:
    """One pass of `solver` down `sigmas`, step by step: `affine(j, x)` before the step, `advance` to take it."""

    def __init__(self, solver: str, sigmas: tuple[float, ...]) -> None:
        check_phase2_solver(solver)
        self.solver, self.sigmas = solver, sigmas
        self.first_order = solver in FIRST_ORDER_SOLVERS
        self.gains = step_gains(solver, sigmas)
        self._eps: list[Tensor] = []  # newest first, as in solvers.ipndm

    def affine(self, j: int, x: Tensor) -> tuple[Tensor, float]:
        """(base_j, gain_j) with `x_{j+1} = base_j + gain_j * D_j` for the state x at sigmas[j]."""
        s, s_next = self.sigmas[j], self.sigmas[j + 1]
        if s_next == 0.0:
            return x.new_zeros(()).expand_as(x), 1.0
        if self.first_order:
            return (s_next / s) * x, self.gains[j]
        coeffs = _AB_COEFFS[min(len(self._eps), len(_AB_COEFFS) - 1)]
        h = s_next - s
        base = x + (h * coeffs[0] / s) * x
        for a, eps in zip(coeffs[1:], self._eps, strict=False):
            base = base + (h * a) * eps
        return base, self.gains[j]

    def target(self, j: int, x: Tensor, d_bar: Tensor) -> Tensor:
        """The output at x that lands the step on the teacher's solve `y = r x + (1 - r) d_bar`."""
        if self.first_order:
            return d_bar
        r = self.sigmas[j + 1] / self.sigmas[j]
        base, gain = self.affine(j, x)
        return (r * x + (1 - r) * d_bar.to(x.dtype) - base) / gain

    def advance(self, j: int, x: Tensor, d: Tensor) -> Tensor:
        """x_{j+1} from the state x and the output d at sigmas[j] (records d's eps for the next steps)."""
        base, gain = self.affine(j, x)
        if not self.first_order:
            self._eps.insert(0, (x - d) / self.sigmas[j])
            del self._eps[len(_AB_COEFFS) - 1 :]
        return base + gain * d
