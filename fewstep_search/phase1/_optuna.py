"""Optuna's logging, silenced where it would only add noise (shared by the inner samplers and the record)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

__all__ = ["quiet_optuna"]


@contextlib.contextmanager
def quiet_optuna() -> Iterator[Any]:
    """Yield the `optuna` module with its logger at WARNING and its ExperimentalWarnings off, restored after.

    Why: Optuna logs every trial at INFO; the inner studies of the sampler optimizers are an implementation
    detail, and the search's own record is reported by the rich table instead.
    """
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=optuna.exceptions.ExperimentalWarning)
            yield optuna
    finally:
        optuna.logging.set_verbosity(level)
