"""The Phase-2 objective: per-step distillation on the N selected sigmas, weighted by how errors propagate.

DESIGN.md section 1 (Phase-2). For a fixed schedule `s = [sigma_N, ..., sigma_0]` and step i (from sigma_i down
to sigma_{i-1}, `r = sigma_{i-1} / sigma_i`), the student's step error at sigma_{i-1} is `(1 - r)(D_theta - D_bar)`
and reaches the output with the RMS gain `phi(sigma_{i-1})` of the flow, so

    loss = mean_batch sum_i [phi(sigma_{i-1}) (1 - r)]^2 ||D_theta(x_i, sigma_i) - D_bar_i||^2

is (to first order) the squared error the step adds to the sample, in the units of E^2. Two ways to pick x_i:

* `student_state_loss`: x_i is the student's own state (its detached DDIM steps from x_N): the loss corrects the
  drift the student itself produces; needs a teacher solve per step (the cost of Phase-2).
* `teacher_forced_loss`: x_i is the teacher's trajectory state (precomputed): no teacher call per step, but it
  never sees the student's drift (a warm start).

End-to-end term `||x0_hat - x0*||^2` (x0_hat from an undetached chain of the student's sampler, x0* the end of
the teacher's trajectory): optional beside the per-step loss, or alone (`per_step_weight = 0`). Arrays are indexed
from the top: `sigmas[0] = sigma_max`, interval j is sigmas[j] -> sigmas[j + 1]. `sigmas` are the schedule's
nodes; every chain here runs them as the sampler does, the last step into 0 (`sampling_sigmas`), so the student is
trained for the sampler that is scored and exported. No Ray here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fewstep_search.bank import Bank
from fewstep_search.phase2.steps import FIRST_ORDER_SOLVERS, SamplerChain, step_gains
from fewstep_search.phase2.targets import ideal_output
from fewstep_search.solvers import sampling_sigmas

__all__ = [
    "rms_gain", "step_weights", "LossParts", "student_state_loss", "teacher_forced_loss", "fixed_state_loss",
    "student_state_targets", "solver_chain", "end_to_end_error", "path_error", "bind_student", "StudentChain",
]

StudentFn = Callable[[Tensor, Tensor], Tensor]
"""The student as called in training: `(x [B, *shape], sigma [B]) -> D [B, *shape]` (conditions bound)."""
TargetFn = Callable[[Tensor, int], Tensor]
"""The teacher's D_bar for interval j from a state x at sigmas[j]: `(x, j) -> D_bar` (no gradient)."""


def rms_gain(bank: Bank, sigmas: Tensor) -> Tensor:
    """phi at `sigmas` [Q]: the RMS over trajectories of the bank's gains, interpolated linearly in log sigma.

    Interpolates the mean square `mean_k phi_k^2` (not phi itself) because the loss weight is phi^2: the mean of
    squared gains is what a sum of squared propagated errors averages to. float64, clamped to the grid's range.
    """
    grid = bank.grid.double().cpu()
    ms = bank.phi.double().cpu().square().mean(0)  # [M]
    lg = torch.log(grid)  # descending
    q = torch.log(sigmas.double().cpu()).clamp(float(lg[-1]), float(lg[0]))
    # np.interp-style on an ascending axis: flip the descending grid
    x_axis, y_axis = lg.flip(0), ms.flip(0)
    idx = torch.searchsorted(x_axis, q).clamp(1, x_axis.numel() - 1)
    x0, x1 = x_axis[idx - 1], x_axis[idx]
    w = ((q - x0) / (x1 - x0)).clamp(0, 1)
    return (y_axis[idx - 1] * (1 - w) + y_axis[idx] * w).sqrt()


def step_weights(bank: Bank, sigmas: Tensor, solver: str = "ddim") -> Tensor:
    """[N] loss weights `[phi(sigma_{i-1}) gain_i]^2`, ordered like the intervals (top first). float64.

    `gain_i` is how much an error in the step's output moves the next state (`1 - r_i` for DDIM; see
    `fewstep_search.phase2.steps` for iPNDM)."""
    s = sigmas.double().cpu()
    phi = rms_gain(bank, s[1:])  # the gain from each step's end; the last (into 0) ends at sigma_min's, 1
    run = sampling_sigmas(s)
    if solver in FIRST_ORDER_SOLVERS:
        r = run[1:] / run[:-1]
        return (phi * (1 - r)).square()
    gains = torch.tensor(step_gains(solver, tuple(float(v) for v in run)), dtype=torch.float64)
    return (phi * gains).square()


@dataclass
class LossParts:
    """A training loss and what it is made of (per-step terms, detached, for the epoch log)."""

    total: Tensor
    per_step: Tensor
    end_to_end: Tensor | None = None


def _sigma_batch(x: Tensor, sigma: float | Tensor) -> Tensor:
    if isinstance(sigma, Tensor):  # a learned schedule's sigma: keep its graph
        return sigma.to(x.dtype).expand(x.shape[0])
    return torch.full((x.shape[0],), float(sigma), dtype=x.dtype, device=x.device)


def _sq(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample squared norm ||a - b||^2 in float32 or wider (autocast may hand bf16 outputs)."""
    diff = a.float() - b.float() if a.dtype in (torch.float16, torch.bfloat16) else a - b.to(a.dtype)
    return diff.square().flatten(1).sum(1)


def student_state_loss(
    student: StudentFn,
    target: TargetFn,
    x_start: Tensor,
    sigmas: tuple[float, ...],
    weights: Tensor,
    *,
    first_target: Tensor | None = None,
) -> LossParts:
    """The loss along the student's own DDIM states from `x_start` (each step's state detached).

    `first_target` is D_bar of the first interval when already known (it depends only on x_start, so it can be
    computed once per noise sample and reused across epochs).
    """
    x = x_start
    terms = []
    w = weights.to(device=x.device, dtype=torch.float32)
    run = sampling_sigmas(sigmas)
    for j in range(len(sigmas) - 1):
        d = student(x, _sigma_batch(x, sigmas[j]))
        dbar = first_target if (j == 0 and first_target is not None) else target(x, j)
        terms.append(w[j] * _sq(d, dbar))
        r = run[j + 1] / run[j]
        x = (r * x + (1 - r) * d.detach().to(x.dtype)).detach()
    per = torch.stack(terms)  # [N, B]
    return LossParts(total=per.sum(0).mean(), per_step=per.detach().mean(1))


def fixed_state_loss(
    student: StudentFn, states: Tensor, targets: Tensor, sigmas: tuple[float, ...], weights: Tensor
) -> LossParts:
    """The loss at given states [N, B, *shape] with given targets D_bar [N, B, *shape] (one batched student call).

    Used with the teacher's own trajectory (teacher-forced) and with reused student-state targets.
    """
    n, b = len(sigmas) - 1, states.shape[1]
    x = states.reshape(n * b, *states.shape[2:])
    sig = torch.tensor(sigmas[:-1], dtype=x.dtype, device=x.device).repeat_interleave(b)
    d = student(x, sig)
    w = weights.to(device=x.device, dtype=torch.float32)
    per = w[:, None] * _sq(d, targets.reshape(n * b, *targets.shape[2:])).reshape(n, b)
    return LossParts(total=per.sum(0).mean(), per_step=per.detach().mean(1))


def teacher_forced_loss(student: StudentFn, states: Tensor, sigmas: tuple[float, ...], weights: Tensor) -> LossParts:
    """The loss on the teacher's own trajectory `states` [N + 1, B, *shape] (one batched student call).

    D_bar of interval j is `(states[j + 1] - r states[j]) / (1 - r)`: the teacher trajectory is the exact solve
    (its last state x*(0), the last step's target itself).
    """
    n, run = len(sigmas) - 1, sampling_sigmas(sigmas)
    dbar = torch.stack([ideal_output(states[j + 1], states[j], run[j], run[j + 1]) for j in range(n)])
    return fixed_state_loss(student, states[:-1], dbar, sigmas, weights)


@torch.no_grad()
def student_state_targets(
    student: StudentFn, target: TargetFn, x_start: Tensor, sigmas: tuple[float, ...], *,
    first_target: Tensor | None = None, solver: str = "ddim",
) -> tuple[Tensor, Tensor]:
    """(states, targets) [N, B, *shape] along the student's own `solver` chain from `x_start`, without gradients.

    For DDIM the targets are the teacher's D_bar (what `student_state_loss` computes on the way); for another
    solver, the outputs that land each step on the teacher's solve given the chain's earlier outputs
    (`fewstep_search.phase2.steps`). Kept so the pairs can be trained on again later (reuse).
    """
    chain = SamplerChain(solver, sampling_sigmas(sigmas))
    x = x_start
    states, targets = [], []
    for j in range(len(sigmas) - 1):
        states.append(x)
        d_bar = first_target if (j == 0 and first_target is not None) else target(x, j)
        targets.append(chain.target(j, x, d_bar))
        d = student(x, _sigma_batch(x, sigmas[j]))
        x = chain.advance(j, x, d.to(x.dtype))
    return torch.stack(states), torch.stack(targets)


def solver_chain(student: StudentFn, x_start: Tensor, sigmas: Sequence[float] | Sequence[Tensor],
                 solver: str = "ddim", *, states: bool = False) -> Tensor:
    """x0_hat of the student's `solver` solve (DDIM / Euler / iPNDM), differentiable through every step; with
    `states`, every node's state [N + 1, B, *shape] (x_start first, x0_hat last) for the path term. `sigmas` as
    0-dim tensors (a `LearnedSchedule`'s) make it differentiable in them too.

    Why a chain of `SamplerChain` steps rather than `solvers.get_solver`: it is the same step the per-step
    targets use (tests/test_phase2_steps.py checks it against `solvers.ipndm`), so both terms train one sampler.
    """
    chain = SamplerChain(solver, sampling_sigmas(sigmas))  # 0-dim tensors work as floats do
    x = x_start
    visited = [x]
    for j in range(len(sigmas) - 1):
        x = chain.advance(j, x, student(x, _sigma_batch(x, sigmas[j])).to(x.dtype))
        visited.append(x)
    return torch.stack(visited) if states else x


def end_to_end_error(x0_hat: Tensor, x_end: Tensor, kind: str = "squared") -> Tensor:
    """mean_batch ||x0_hat - x0*||^2 (`kind = "squared"`) or mean_batch ||x0_hat - x0*|| (`"norm"`): x0_hat from
    the student's chain (`StudentChain`, `solver_chain`), x0* the teacher's accurate end point from the same noise.

    The term E itself measures: it sees how the steps' errors cancel, which the per-step loss cannot, and its
    target depends on the noise alone, so a pool sample's teacher solve is done once per round. `"norm"` is E
    exactly (the mean distance, each sample's gradient of unit size); `"squared"` weights each sample's gradient
    by its distance, so a few far-off samples steer it.
    """
    sq = _sq(x0_hat, x_end)
    if kind == "norm":
        return (sq + 1e-12).sqrt().mean()
    if kind != "squared":
        raise ValueError(f"unknown end-to-end loss {kind!r}; known: squared, norm")
    return sq.mean()


def path_error(states: Tensor, target: Tensor, node_weights: Tensor, kind: str = "norm") -> Tensor:
    """The path term: mean over the interior nodes j of `phi_j * mean_batch ||x_j - x_j*||` (`kind = "norm"`; the
    square of both factors for `"squared"`), x_j the student's chain state, x_j* the teacher's, [N + 1, B, ...].

    Why: the end-to-end term alone lets the chain wander off the teacher's path as long as its end lands, and on
    the digits model at N = 10 that bought a lower median E at the price of a few trajectories that ended much
    further off than the untouched model's (docs/phase2.md, "Where the N = 10 error is"; there this term did not
    change that, so it is off by default). A deviation at node j reaches the end about `phi_j` (the flow's RMS
    gain from sigma_j down) times larger, so each term is in units of E.
    """
    inner, goal = states[1:-1], target[1:-1].to(states.dtype)
    if inner.shape[0] == 0:
        return states.new_zeros(())
    sq = (inner - goal).square().flatten(2).sum(2)  # [N - 1, B]
    w = node_weights.to(device=states.device, dtype=sq.dtype)[:, None]
    per = w.square() * sq if kind == "squared" else w * (sq + 1e-12).sqrt()
    return per.mean()


def bind_student(model: nn.Module, cond: Tensor | None, autocast: bool) -> Callable[[Tensor, Tensor], Tensor]:
    """The student as `(x, sigma) -> D` with the batch's conditions bound (tiled for the N-step batched call)."""

    def call(x: Tensor, sigma: Tensor) -> Tensor:
        ctx = torch.autocast(x.device.type, dtype=torch.bfloat16) if autocast else nullcontext()
        with ctx:
            if cond is None:
                out = model(x, sigma)
            else:
                out = model(x, sigma, cond.repeat(x.shape[0] // cond.shape[0]))
        return out.to(x.dtype)

    return call


class StudentChain(nn.Module):
    """The student's whole N-step `solver` chain as one module: `forward(x_start, cond) -> x0_hat`.

    Why a module: the end-to-end term calls the student N times before one backward, and DDP (several workers)
    allows one forward of the wrapped module per backward; wrapping this module instead of the student makes the
    chain that one forward. Its parameters are the student's own (no copy), so optimizer, EMA and checkpoints
    still see the student; with a `schedule` (a `LearnedSchedule`, `phase2.schedule_lr > 0`) its sigmas are the
    chain's, and DDP reduces their gradients with the student's.
    """

    def __init__(self, student: nn.Module, sigmas: tuple[float, ...], solver: str, autocast: bool, *,
                 states: bool = False, schedule: nn.Module | None = None) -> None:
        super().__init__()
        self.student, self.schedule = student, schedule
        self.sigmas, self.solver, self.autocast, self.states = sigmas, solver, autocast, states

    def forward(self, x_start: Tensor, cond: Tensor | None = None) -> Tensor:
        """x0_hat, or with `states` every node's state [N + 1, B, *shape] (the path term needs them)."""
        sigmas = self.sigmas if self.schedule is None else self.schedule().unbind(0)
        return solver_chain(bind_student(self.student, cond, self.autocast), x_start, sigmas, self.solver,
                            states=self.states)
