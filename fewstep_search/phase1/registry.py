"""The optimizer registry: every schedule optimizer by name, and `make_optimizer`.

Example:
    >>> make_optimizer("adam", steps=10).hyper
    {'steps': 10, 'lr': 0.05}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from fewstep_search.phase1.chains import DPThenAdam
from fewstep_search.phase1.optimizers import LBFGSB, Adam, GridDP, Identity, ScheduleOptimizer, TrustConstr
from fewstep_search.phase1.peers.wrappers import PEER_OPTIMIZERS
from fewstep_search.phase1.samplers import CMAES, TPE

__all__ = ["OPTIMIZERS", "OptimizerFactory", "make_optimizer"]

OptimizerFactory = Callable[..., ScheduleOptimizer]

OPTIMIZERS: dict[str, OptimizerFactory] = {
    **{cls.name: cls for cls in (Identity, GridDP, Adam, LBFGSB, TrustConstr, TPE, CMAES, DPThenAdam)},
    **PEER_OPTIMIZERS,  # gits, dm_nonuniform, ays, ld3, b0_dp (docs/peers.md)
}


def make_optimizer(
    name: str, *, extra: Mapping[str, OptimizerFactory] | None = None, **hyper: Any
) -> ScheduleOptimizer:
    """An optimizer by registry name (or from `extra`) with keyword hyper-parameters; ValueError if not."""
    registry = {**OPTIMIZERS, **(extra or {})}
    try:
        factory = registry[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(registry)}") from None
    try:
        return factory(**hyper)
    except TypeError as exc:
        raise ValueError(f"optimizer {name!r}: bad hyper-parameters {sorted(hyper)} ({exc})") from None
