"""LD3-style schedules (Tong et al., ICLR 2025, "Learning to Discretize Denoising Diffusion ODEs"): learn the N steps
by gradient descent on the end-point error of the few-step solve against the teacher's end point, with LD3's soft
(relaxed) objective: each student solve may start from a perturbed noise x'_k inside a ball around the teacher's
start x_k, the perturbation being a slack variable per sample optimized jointly with the schedule:

    min_s  mean_k  min_{||x'_k - x_k|| <= rho}  || Solve_s(x'_k) - x0*_k ||,      rho = radius * sigma_max * sqrt(d)

(the paper's ball B(x_T, r sigma_T); here the radius is relative to the start noise's typical norm
sigma_max sqrt(d), so it does not depend on the dimension). Why a ball: with only N parameters the student cannot
map every teacher noise to exactly its end point; letting it match the end point from a nearby start keeps the
objective from being dominated by samples no schedule can fit. With radius 0 it is plain direct optimization of
E (`fewstep_search.objectives.true_error`, the DESIGN's `direct` objective).

Steps: Adam on the schedule's softmax logits (`fewstep_search.schedules.sigmas_from_logits`, endpoints exact) and
on the slacks, each slack projected back onto its ball after every step; the schedule returned is the one with
the lowest un-relaxed E (from the teacher's own start, how it is used) among those evaluated every `eval_every`
steps and at the start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fewstep_search.bank import Bank
from fewstep_search.denoiser import Denoiser, bind_condition
from fewstep_search.objectives import true_error
from fewstep_search.schedules import Schedule, karras, logits_from_sigmas, sigmas_from_logits
from fewstep_search.solvers import get_solver, sampling_sigmas

__all__ = ["LD3Result", "project_to_ball", "soft_errors", "ld3_schedule"]


@dataclass(frozen=True)
class LD3Result:
    """The schedule with the lowest E seen, its E, the final slacks [K, *shape], the ball radius, and the number
    of gradient steps taken."""

    schedule: Schedule
    error: float
    slack: Tensor
    rho: float
    steps: int


def project_to_ball(delta: Tensor, rho: float) -> Tensor:
    """Each sample's perturbation [K, *shape] scaled back onto the ball ||delta_k|| <= rho (rho = 0: all zero)."""
    if rho <= 0:
        return torch.zeros_like(delta)
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-300)
    scale = torch.clamp(rho / norms, max=1.0).to(delta.dtype)
    return delta * scale.reshape(-1, *([1] * (delta.ndim - 1)))


def soft_errors(denoiser: Denoiser, bank: Bank, sigmas: Tensor, slack: Tensor, *, solver: str = "ddim") -> Tensor:
    """[K] per-sample `||Solve_s(x_k + slack_k) - x0*_k||`, differentiable in `sigmas` and `slack`."""
    den = bind_condition(denoiser, bank.cond)
    x = bank.x_start + slack.to(bank.x_start)
    out = get_solver(solver)(den, x, sampling_sigmas(sigmas.to(device=x.device, dtype=x.dtype)))
    return (out - bank.x_end.to(out)).flatten(1).norm(dim=1).double()


def ld3_schedule(denoiser: Denoiser, bank: Bank, nfe: int, *, radius: float = 0.01, steps: int = 100,
                 lr: float = 0.05, slack_lr: float = 0.1, solver: str = "ddim", init: Schedule | None = None,
                 eval_every: int = 10, batch_size: int | None = None) -> LD3Result:
    """LD3's soft-objective optimization on the bank's trajectories (pass the fit part).

    `radius`: the ball, relative to sigma_max sqrt(d) (0 = plain direct optimization). `lr`: Adam's step on the
    logits; `slack_lr`: Adam's step on each slack coordinate in units of rho / sqrt(d) (so one step moves a slack
    by about `slack_lr` of the ball's radius). `init`: the start (default EDM rho = 7). `batch_size` bounds the
    memory of the un-relaxed evaluations only; each gradient step solves all K trajectories at once.
    """
    if not (math.isfinite(radius) and radius >= 0):
        raise ValueError(f"radius must be a number >= 0, got {radius!r}")
    if steps < 0 or eval_every < 1 or lr <= 0 or slack_lr <= 0:
        raise ValueError("need steps >= 0, eval_every >= 1, lr > 0 and slack_lr > 0")
    lo, hi = bank.sigma_min, bank.sigma_max
    start = init if init is not None else karras(nfe, lo, hi)
    if start.nfe != nfe:
        raise ValueError(f"init has {start.nfe} steps, expected {nfe}")
    d = math.prod(bank.shape)
    rho = radius * hi * math.sqrt(d)
    logits = logits_from_sigmas(start).clone().requires_grad_(True)
    slack = torch.zeros_like(bank.x_start, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=lr)
    opt_slack = torch.optim.Adam([slack], lr=slack_lr * rho / math.sqrt(d)) if rho > 0 else None

    def plain(sig: Tensor) -> float:
        with torch.no_grad():
            return float(true_error(denoiser, bank, sig, solver=solver, batch_size=batch_size))

    best_sig = sigmas_from_logits(logits.detach(), lo, hi)
    best = plain(best_sig)
    for step in range(1, steps + 1):
        opt.zero_grad()
        if opt_slack is not None:
            opt_slack.zero_grad()
        sig = sigmas_from_logits(logits, lo, hi)
        loss = soft_errors(denoiser, bank, sig, slack if rho > 0 else slack.detach(), solver=solver).mean()
        loss.backward()
        opt.step()
        if opt_slack is not None:
            opt_slack.step()
            with torch.no_grad():
                slack.copy_(project_to_ball(slack, rho))
        if step % eval_every == 0 or step == steps:
            sig = sigmas_from_logits(logits.detach(), lo, hi)
            value = plain(sig)
            if value < best:
                best, best_sig = value, sig
    return LD3Result(Schedule(best_sig.detach().double().cpu().numpy(), name="ld3"), best, slack.detach().clone(), rho,
                     steps)
