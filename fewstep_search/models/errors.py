"""Errors of the model adapters, in a module of their own so adapters and the loader registry share them
without importing each other."""

from __future__ import annotations

__all__ = ["ModelLoadError"]


class ModelLoadError(ValueError):
    """A model could not be loaded (missing folder or config, corrupt weights, unsupported model)."""
