"""The base of every study-file table: strict (unknown keys are errors) and immutable."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["Strict"]


class Strict(BaseModel):
    """A validated, frozen table of a study file; a typo in a key fails with one line naming it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
