"""fewstep-search: search sampling schedules that make diffusion models sample well in 3-10 steps.

The public API is small and importing it is cheap (Ray and Optuna load only when a search runs):

    >>> from fewstep_search import optimize_schedule, Schedule, karras
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "Schedule",
    "Bank",
    "build_bank",
    "load_bank",
    "optimize_schedule",
    "search_schedules",
    "ModelSource",
    "karras",
    "make_schedule",
    "get_solver",
    "sample",
    "Denoiser",
]

_EXPORTS = {
    "Schedule": "fewstep_search.schedules",
    "karras": "fewstep_search.schedules",
    "make_schedule": "fewstep_search.schedules",
    "Bank": "fewstep_search.bank",
    "build_bank": "fewstep_search.bank",
    "load_bank": "fewstep_search.bank",
    "optimize_schedule": "fewstep_search.phase1.optimize",
    "search_schedules": "fewstep_search.phase1.optimize",
    "get_solver": "fewstep_search.solvers",
    "sample": "fewstep_search.solvers",
    "Denoiser": "fewstep_search.denoiser",
    "ModelSource": "fewstep_search.models.source",
}

if TYPE_CHECKING:
    from fewstep_search.bank import Bank, build_bank, load_bank
    from fewstep_search.denoiser import Denoiser
    from fewstep_search.models.source import ModelSource
    from fewstep_search.phase1.optimize import optimize_schedule, search_schedules
    from fewstep_search.schedules import Schedule, karras, make_schedule
    from fewstep_search.solvers import get_solver, sample


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fewstep_search' has no attribute {name!r}")
