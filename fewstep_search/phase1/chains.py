"""Chains of optimizers: stages run in order, each from the previous one's best (e.g. DP, then Adam).

| name    | domain                             | method                                      |
|---------|------------------------------------|---------------------------------------------|
| dp_adam | DP on a bound, then any continuous | chain: `dp` on `dp_objective`, then `adam`  |
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fewstep_search.phase1.optimizers import Adam, GridDP, ScheduleOptimizer
from fewstep_search.phase1.parameterizations import (
    PARAMETERIZATIONS,
    GridIndices,
    Parameterization,
    make_parameterization,
)
from fewstep_search.phase1.problem import Objective, Problem, get_objective
from fewstep_search.schedules import Schedule

__all__ = ["Stage", "Chain", "DPThenAdam"]


@dataclass(frozen=True)
class Stage:
    """One stage of a chain: an optimizer and, where not the trial's, its objective / parameterization."""

    optimizer: ScheduleOptimizer
    objective: str | None = None
    parameterization: str | None = None


class Chain(ScheduleOptimizer):
    """Stages run in order, each from the previous stage's best; the result is scored on the trial's.

    Stages with their own objective or parameterization work on a derived problem (same bank and model).
    """

    name = "chain"

    def __init__(self, *, stages: Sequence[Stage]) -> None:
        if not stages:
            raise ValueError("a chain needs at least one stage")
        self.stages = tuple(stages)

    @property
    def hyper(self) -> dict[str, Any]:
        return {
            "stages": [
                {
                    "optimizer": s.optimizer.name,
                    "objective": s.objective,
                    "parameterization": s.parameterization,
                    **s.optimizer.hyper,
                }
                for s in self.stages
            ]
        }

    def check(self, *, objective: Objective, parameterization: type[Parameterization]) -> None:
        for s in self.stages:
            param = PARAMETERIZATIONS[s.parameterization] if s.parameterization else parameterization
            s.optimizer.check(
                objective=get_objective(s.objective) if s.objective else objective, parameterization=param
            )

    def run(self, problem: Problem, start: Schedule) -> None:
        current = start
        for s in self.stages:
            param = None
            if s.parameterization is not None:
                p = problem.parameterization
                param = make_parameterization(
                    s.parameterization,
                    nfe=p.nfe,
                    sigma_min=p.sigma_min,
                    sigma_max=p.sigma_max,
                    grid=problem.fit.grid,
                )
            sub = problem.derive(objective=s.objective, parameterization=param)
            current = s.optimizer.minimize(sub, current).schedule
            problem.evaluations += sub.evaluations  # the chain's cost is all of its stages'
        problem.value_of(current)


class DPThenAdam(Chain):
    """The exact grid DP of a bound (`dp_objective`, docs/design.md "Additivity and DP"), then Adam on the
    trial's objective."""

    name = "dp_adam"

    def __init__(self, *, dp_objective: str = "bw", steps: int = 150, lr: float = 0.05) -> None:
        if dp_objective not in ("bw", "b0"):
            raise ValueError(f"dp_objective must be 'bw' or 'b0', got {dp_objective!r}")
        self.dp_objective = dp_objective
        super().__init__(
            stages=[
                Stage(GridDP(), objective=dp_objective, parameterization=GridIndices.name),
                Stage(Adam(steps=steps, lr=lr)),
            ]
        )

    @property
    def hyper(self) -> dict[str, Any]:
        adam = self.stages[-1].optimizer
        return {"dp_objective": self.dp_objective, **adam.hyper}
