"""The peers as Phase-1 optimizers (trials of the search): thin adapters from a `Problem` to each peer's function.

| name          | peer (module)                   | hyper-parameters (defaults)                                        |
|---------------|---------------------------------|--------------------------------------------------------------------|
| gits          | GITS DP (`gits`)                | coeff=1.15, metric="l2", max_trajectories=128                      |
| dm_nonuniform | DM-NonUniform (`dm_nonuniform`) | solver="lagrange3", lower_order_final=True, error_model="paper",   |
|               |                                 | independent_steps=3, init="default", maxiter=300                   |
| ays           | AYS-style KLUB (`ays`)          | data="auto", n_samples=128, quad_points=6, candidates=5,           |
|               |                                 | max_sweeps=4, tol=1e-3, init="start"                               |
| ld3           | LD3-style (`ld3`)               | radius=0.01, steps=100, lr=0.05, slack_lr=0.1, eval_every=10,      |
|               |                                 | init="start"                                                       |
| b0_dp         | B_0 DP (`objectives` + `dp`)    | (none)                                                             |

Contract with the search. A peer has its own objective, so `check` accepts every (objective, parameterization)
pair: the trial's objective only *scores* the peer's schedule (recorded through `problem.value_of`) and the
parameterization is not used. `minimize` returns the peer's own schedule even where the start scores better on
the trial's objective (unlike the search's own optimizers, which return the best point evaluated), so a peer's
row shows the method itself. `init="start"` starts the peer's search from the trial's start schedule; "default"
/ "edm" use the paper's own start. GITS, AYS and LD3 need the trial's denoiser (`problem.denoiser`).
AYS's data (`data`): see `data_source` ("auto": the model's `sample_data(n, generator)`, else the Gaussian
mixture's samples; "digits": the built-in digits' training images).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any, ClassVar

from fewstep_search.dp import dp_optimal
from fewstep_search.objectives import grid_cost_matrix
from fewstep_search.phase1.optimizers import OptimizeResult, ScheduleOptimizer
from fewstep_search.phase1.peers.ays import ays_schedule
from fewstep_search.phase1.peers.data_source import DATA_SOURCES, data_samples
from fewstep_search.phase1.peers.dm_nonuniform import DMN_SOLVERS, dm_nonuniform_schedule
from fewstep_search.phase1.peers.gits import GITS_COEFF, gits_schedule
from fewstep_search.phase1.peers.ld3 import ld3_schedule
from fewstep_search.schedules import Schedule, karras

__all__ = ["PeerOptimizer", "GITSPeer", "DMNonUniformPeer", "AYSPeer", "LD3Peer", "B0Peer", "PEER_OPTIMIZERS"]


def _int(name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _num(name: str, value: Any, *, positive: bool = True) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        raise ValueError(f"{name} must be a {'positive' if positive else 'non-negative'} number, got {value!r}")
    return float(value)


def _choice(name: str, value: Any, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(options)}; got {value!r}")
    return str(value)


class PeerOptimizer(ScheduleOptimizer):
    """A published method run as a trial: computes its schedule from `problem`, scored by the trial's objective."""

    def __init__(self, **hyper: Any) -> None:
        self._hyper = hyper

    @property
    def hyper(self) -> dict[str, Any]:
        return dict(self._hyper)

    def check(self, *, objective: Any, parameterization: Any) -> None:
        """Every pair is accepted: the trial's objective only scores the peer's schedule."""
        return None

    @abstractmethod
    def schedule(self, problem: Any, start: Schedule) -> Schedule:
        """The peer's schedule of `problem.nfe` steps on the fit bank's noise range."""

    def run(self, problem: Any, start: Schedule) -> None:
        problem.value_of(self.schedule(problem, start))

    def minimize(self, problem: Any, start: Schedule) -> OptimizeResult:
        start_value = problem.value_of(start)
        sched = Schedule(self.schedule(problem, start).sigmas, name=self.name)
        value = problem.value_of(sched)
        if not math.isfinite(value):
            raise ValueError(f"peer {self.name!r} produced a schedule with a non-finite objective ({value})")
        return OptimizeResult(sched, value, start_value, problem.evaluations)

    def _denoiser(self, problem: Any) -> Any:
        if problem.denoiser is None:
            raise ValueError(f"peer {self.name!r} needs the trial's denoiser")
        return problem.denoiser


class GITSPeer(PeerOptimizer):
    """GITS (Chen et al. 2024): DP over the bank grid with the one-step Euler deviation cost."""

    name: ClassVar[str] = "gits"

    def __init__(self, *, coeff: float = GITS_COEFF, metric: str = "l2", max_trajectories: int = 128) -> None:
        super().__init__(coeff=_num("coeff", coeff), metric=_choice("metric", metric, ("l2", "l1", "dev")),
                         max_trajectories=_int("max_trajectories", max_trajectories))

    def schedule(self, problem: Any, start: Schedule) -> Schedule:
        h = self._hyper
        return gits_schedule(problem.fit, problem.nfe, denoiser=problem.denoiser, coeff=h["coeff"],
                             metric=h["metric"], max_trajectories=h["max_trajectories"])


class DMNonUniformPeer(PeerOptimizer):
    """DM-NonUniform (Xue et al. 2024): the model-free lambda objective, scipy trust-constr."""

    name: ClassVar[str] = "dm_nonuniform"

    def __init__(self, *, solver: str = "lagrange3", lower_order_final: bool = True, error_model: str = "paper",
                 independent_steps: int = 3, init: str = "default", maxiter: int = 300) -> None:
        if not isinstance(lower_order_final, bool):
            raise ValueError(f"lower_order_final must be true or false, got {lower_order_final!r}")
        super().__init__(solver=_choice("solver", solver, DMN_SOLVERS), lower_order_final=lower_order_final,
                         error_model=_choice("error_model", error_model, ("paper", "unit")),
                         independent_steps=_int("independent_steps", independent_steps, 0),
                         init=_choice("init", init, ("default", "start")), maxiter=_int("maxiter", maxiter))

    def schedule(self, problem: Any, start: Schedule) -> Schedule:
        h = dict(self._hyper)
        init = start if h.pop("init") == "start" else None
        return dm_nonuniform_schedule(problem.nfe, problem.fit.sigma_min, problem.fit.sigma_max, init=init, **h)


class AYSPeer(PeerOptimizer):
    """Align Your Steps-style (Sabour et al. 2024): KLUB on data, coordinate search with early stopping."""

    name: ClassVar[str] = "ays"

    def __init__(self, *, data: str = "auto", n_samples: int = 128, quad_points: int = 6, candidates: int = 5,
                 max_sweeps: int = 4, tol: float = 1e-3, init: str = "start") -> None:
        super().__init__(data=_choice("data", data, DATA_SOURCES), n_samples=_int("n_samples", n_samples),
                         quad_points=_int("quad_points", quad_points), candidates=_int("candidates", candidates),
                         max_sweeps=_int("max_sweeps", max_sweeps, 0), tol=_num("tol", tol, positive=False),
                         init=_choice("init", init, ("start", "edm")))

    def schedule(self, problem: Any, start: Schedule) -> Schedule:
        h, fit = self._hyper, problem.fit
        den = self._denoiser(problem)
        x0 = data_samples(h["data"], den, h["n_samples"], seed=problem.seed).to(fit.x_start)
        if tuple(x0.shape[1:]) != fit.shape:
            raise ValueError(f"data samples have shape {tuple(x0.shape[1:])}, the model {fit.shape}")
        init = start if h["init"] == "start" else karras(problem.nfe, fit.sigma_min, fit.sigma_max)
        return ays_schedule(den, x0, problem.nfe, fit.sigma_min, fit.sigma_max, init=init,
                            quad_points=h["quad_points"], candidates=h["candidates"], max_sweeps=h["max_sweeps"],
                            tol=h["tol"], seed=problem.seed).schedule


class LD3Peer(PeerOptimizer):
    """LD3-style (Tong et al. 2025): end-point error with the soft ball around the start noise."""

    name: ClassVar[str] = "ld3"

    def __init__(self, *, radius: float = 0.01, steps: int = 100, lr: float = 0.05, slack_lr: float = 0.1,
                 eval_every: int = 10, init: str = "start") -> None:
        super().__init__(radius=_num("radius", radius, positive=False), steps=_int("steps", steps, 0),
                         lr=_num("lr", lr), slack_lr=_num("slack_lr", slack_lr),
                         eval_every=_int("eval_every", eval_every), init=_choice("init", init, ("start", "edm")))

    def schedule(self, problem: Any, start: Schedule) -> Schedule:
        h = dict(self._hyper)
        init = start if h.pop("init") == "start" else None
        return ld3_schedule(self._denoiser(problem), problem.fit, problem.nfe, solver=problem.solver, init=init,
                            batch_size=problem.batch_size, **h).schedule


class B0Peer(PeerOptimizer):
    """The plain convex-combination bound B_0, minimized exactly on the bank grid (kept for comparison)."""

    name: ClassVar[str] = "b0_dp"

    def __init__(self) -> None:
        super().__init__()

    def schedule(self, problem: Any, start: Schedule) -> Schedule:
        idx, _ = dp_optimal(grid_cost_matrix(problem.fit, "b0"), problem.nfe)
        return Schedule(problem.fit.grid.double().cpu().numpy()[idx], name="b0")


PEER_OPTIMIZERS: dict[str, type[PeerOptimizer]] = {
    cls.name: cls for cls in (GITSPeer, DMNonUniformPeer, AYSPeer, LD3Peer, B0Peer)
}
"""Registry name -> optimizer class (hand to the search as `extra_optimizers`, or merge into its registry)."""
