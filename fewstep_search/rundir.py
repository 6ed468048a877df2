"""The run directory: resolved config, cached bank, one folder per round, and the best schedule.

Layout (DESIGN.md section 3):

    DIR/config.json             the resolved study (what actually ran)
    DIR/bank.safetensors        reference trajectories, reused on resume when its metadata matches
    DIR/round_1/schedule.json   the round's winning schedule; metrics.json: every candidate's scores
    DIR/best/schedule.json      the best schedule so far: {"sigmas": [...], "nfe": N, ...}

Every write is atomic, and a finished round is never recomputed, so rerunning an interrupted command resumes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fewstep_search.atomic import atomic_write_json
from fewstep_search.bank import Bank, BankMismatchError, load_bank
from fewstep_search.study import StudyConfig

__all__ = ["RunDir", "RunDirError"]


class RunDirError(ValueError):
    """The run directory belongs to a different study."""


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def bank_path(self) -> Path:
        return self.path / "bank.safetensors"

    def round_dir(self, r: int) -> Path:
        return self.path / f"round_{r}"

    def prepare(self, config: StudyConfig) -> None:
        """Create the folder and record the config; refuse a folder that holds another study's model or bank."""
        self.path.mkdir(parents=True, exist_ok=True)
        cfg_path = self.path / "config.json"
        new = config.model_dump(mode="json")
        if cfg_path.exists():
            try:
                old = json.loads(cfg_path.read_text())
            except json.JSONDecodeError:
                old = None
            if old is not None and (old.get("model") != new["model"] or old.get("bank") != new["bank"]):
                raise RunDirError(
                    f"{self.path} holds a run of a different model or bank settings; choose another --out"
                )
        atomic_write_json(cfg_path, new)

    def bank(self, expect: dict[str, Any], build: Callable[[], Bank]) -> Bank:
        """Load the cached bank when its metadata matches `expect`, else build and save it."""
        if self.bank_path.exists():
            try:
                return load_bank(self.bank_path, expect=expect)
            except (BankMismatchError, ValueError):
                pass  # stale or damaged cache: rebuild below
        bank = build()
        bank.save(self.bank_path)
        return bank

    def finished_round(self, r: int) -> dict[str, Any] | None:
        path = self.round_dir(r) / "metrics.json"
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None

    def write_round(self, r: int, schedule: dict[str, Any], metrics: dict[str, Any]) -> None:
        d = self.round_dir(r)
        atomic_write_json(d / "schedule.json", schedule)
        atomic_write_json(d / "metrics.json", metrics)  # written last: its presence marks the round finished

    def write_best(self, schedule: dict[str, Any]) -> Path:
        return atomic_write_json(self.path / "best" / "schedule.json", schedule)
