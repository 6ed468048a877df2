"""The run directory: the resolved config, the bank, one folder per round, the best pair, the Optuna record.

Layout (docs/design.md section 3):

    DIR/run.json                 the run's identity (a random id that names its Optuna studies, budget, model)
    DIR/config.json              the resolved study (what actually ran)
    DIR/bank.safetensors         the teacher's reference trajectories, reused when their metadata matches
    DIR/keep.safetensors         the keep set: fresh reference end points the loop keeps its best pair on
    DIR/optuna.db, optuna.json   the Optuna record of every Phase-1 trial (and where it is, for `dashboard`)
    DIR/round_R/phase1.json      round R's Phase-1: every trial scored on fit / select / test
    DIR/round_R/schedule.json    round R's Phase-1 schedule (the one Phase-2 trains on)
    DIR/round_R/phase2/          Phase-2's checkpoints (one per epoch; a killed run resumes from the last)
    DIR/round_R/model.safetensors  round R's fine-tuned weights
    DIR/round_R/metrics.json     round R's evaluation and its pair's schedule (Phase-2's trained sigmas with
                                 `phase2.schedule_lr`); written last, so its presence marks the round finished
    DIR/best/schedule.json       the best pair's schedule {"nfe": N, "sigmas": [...], ...}
    DIR/best/model.safetensors   ... and its weights (absent when Phase-2 did not run)
    DIR/results.json             every round and the baselines, the table the CLI prints

Every write is atomic (`fewstep_search.atomic`). A folder is reused only for the same study (model, bank, budget,
search and Phase-2 settings); anything else is refused with one line naming what differs, never answered with
the old result. Nothing is written until `prepare` is called, which the loop does after the model has loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from fewstep_search.atomic import atomic_path, atomic_write_json
from fewstep_search.bank import Bank, BankMismatchError, load_bank
from fewstep_search.candidate import Candidate
from fewstep_search.phase2.checkpoints import ADAPTERS_FILE
from fewstep_search.study import StudyConfig

__all__ = ["RunDir", "RunDirError", "check_writable", "identity_of"]

RECORD_FILE = "optuna.json"



def adapters_beside(weights: Path) -> Path | None:
    """A LoRA round's adapters, kept beside its merged weights (`fewstep_search.phase2.lora`), or None."""
    path = Path(weights).with_name(ADAPTERS_FILE)
    return path if path.is_file() else None


def _copy_with_adapters(weights: Path, target: Path) -> None:
    """Copy round weights to `target` atomically, and the adapters beside them (or remove stale ones)."""
    with atomic_path(target) as tmp:
        shutil.copyfile(weights, tmp)
    adapters = adapters_beside(weights)
    if adapters is not None:
        with atomic_path(target.with_name(ADAPTERS_FILE)) as tmp:
            shutil.copyfile(adapters, tmp)
    else:
        target.with_name(ADAPTERS_FILE).unlink(missing_ok=True)

class RunDirError(ValueError):
    """The run directory cannot be used: another study's run, a file in the way, or not writable."""


def identity_of(config: StudyConfig) -> dict[str, Any]:
    """The parts of a study that determine its results (workers, addresses and rounds do not)."""
    data = config.model_dump(mode="json")
    search = {k: v for k, v in data["search"].items() if k not in ("workers", "address", "storage", "max_failures")}
    phase2 = {k: v for k, v in data["phase2"].items() if k != "workers"}
    return {"nfe": data["nfe"], "model": data["model"], "bank": {k: v for k, v in data["bank"].items()
                                                                 if k != "batch_size"},
            "search": search, "phase2": phase2}


def _first_difference(old: Any, new: Any, path: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            diff = _first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else key)
            if diff:
                return diff
        return None
    return None if old == new else f"{path} ({old!r} there, {new!r} now)"


def check_writable(path: Path) -> None:
    """RunDirError (one line) unless `path` is, or can be created as, a writable folder. Creates it."""
    if path.exists() and not path.is_dir():
        raise RunDirError(f"--out {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise RunDirError(f"--out {path} is not writable: {exc.strerror or exc}") from None


def _cached(path: Path, expect: dict[str, Any]) -> tuple[Bank | None, str | None]:
    """(the bank file at `path`, None) when it matches `expect`; (None, why not) when stale or damaged; (None, None)
    when there is none."""
    if not path.exists():
        return None, None
    try:
        return load_bank(path, expect=expect), None
    except (BankMismatchError, ValueError) as exc:
        return None, str(exc)


class RunDir:
    """One run's folder (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # ------------------------------------------------------------ identity
    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    def recorded_config(self) -> dict[str, Any] | None:
        """The resolved study a previous run wrote here, or None."""
        return self._read(self.config_path)

    def recorded_study_file(self) -> Path | None:
        """The study file the run was started from (relative model paths follow it), or None."""
        info = self._read(self.path / "run.json") or {}
        return Path(info["study_file"]) if info.get("study_file") else None

    def prepare(self, config: StudyConfig, *, study_path: Path | None = None) -> str:
        """Claim the folder for `config` (refusing another study's run); returns the run id.

        `study_path` (the study file) is recorded so `--resume` resolves relative model paths as the first
        run did.
        """
        check_writable(self.path)
        old = self.recorded_config()
        if old is not None:
            diff = _first_difference(identity_of(StudyConfig.model_validate(old)), identity_of(config))
            if diff:
                raise RunDirError(f"{self.path} holds a run of another study: {diff} differs; choose another --out")
        info = self._read(self.path / "run.json") or {"run_id": uuid.uuid4().hex[:12]}
        info.update({"nfe": config.nfe, "model": config.model_id})
        if study_path is not None:
            info["study_file"] = str(study_path.resolve())
        atomic_write_json(self.path / "run.json", info)
        atomic_write_json(self.config_path, config.model_dump(mode="json"))
        return str(info["run_id"])

    # ------------------------------------------------------------ bank
    @property
    def bank_path(self) -> Path:
        return self.path / "bank.safetensors"

    def load_bank(self, expect: dict[str, Any]) -> tuple[Bank | None, str | None]:
        """(the cached bank, None) when it matches `expect`; (None, why not) when it is stale or damaged."""
        return _cached(self.bank_path, expect)

    def save_bank(self, bank: Bank) -> None:
        bank.save(self.bank_path)

    @property
    def keep_path(self) -> Path:
        return self.path / "keep.safetensors"

    def load_keep(self, expect: dict[str, Any]) -> tuple[Bank | None, str | None]:
        """The cached keep set (`fewstep_search.bank.keep`) when it matches `expect`, as `load_bank`."""
        return _cached(self.keep_path, expect)

    def save_keep(self, keep: Bank) -> None:
        keep.save(self.keep_path)

    # ------------------------------------------------------------ rounds
    def round_dir(self, r: int) -> Path:
        return self.path / f"round_{r}"

    def phase1_result(self, r: int) -> dict[str, Any] | None:
        return self._read(self.round_dir(r) / "phase1.json")

    def write_phase1(self, r: int, summary: dict[str, Any]) -> None:
        atomic_write_json(self.round_dir(r) / "schedule.json", summary["best"])
        atomic_write_json(self.round_dir(r) / "phase1.json", summary)

    def finished_round(self, r: int) -> dict[str, Any] | None:
        return self._read(self.round_dir(r) / "metrics.json")

    def write_round(self, r: int, metrics: dict[str, Any]) -> None:
        """The round's evaluation; written last: its presence marks the round finished."""
        atomic_write_json(self.round_dir(r) / "metrics.json", metrics)

    def model_path(self, r: int) -> Path:
        return self.round_dir(r) / "model.safetensors"

    def store_model(self, r: int, checkpoint: Path) -> Path:
        """Copy a Phase-2 result to round r's model.safetensors (atomically), with a LoRA round's adapters."""
        _copy_with_adapters(checkpoint, self.model_path(r))
        return self.model_path(r)

    # ------------------------------------------------------------ results
    def write_best(self, pair: Candidate) -> Path:
        """best/schedule.json (the pair's schedule with its solver and family, its round and scores) and, for a
        fine-tuned pair, a copy of its weights as best/model.safetensors."""
        best = self.path / "best"
        if pair.weights is not None:
            _copy_with_adapters(Path(pair.weights), best / "model.safetensors")
        else:  # the best pair is now the untouched model
            for name in ("model.safetensors", ADAPTERS_FILE):
                (best / name).unlink(missing_ok=True)
        row = {**pair.schedule.to_dict(), "round": pair.round, "origin": pair.origin, **pair.scores.as_row()}
        return atomic_write_json(best / "schedule.json", row)

    def kept_pair(self) -> Candidate:
        """The pair best/schedule.json records (with best/model.safetensors when a round was kept), one-line errors."""
        if not self.path.is_dir():
            raise FileNotFoundError(f"run directory {self.path} does not exist")
        path = self.path / "best" / "schedule.json"
        if not path.is_file():
            raise FileNotFoundError(f"{self.path} has no best schedule yet ({path} is missing); run "
                                    "`fewstep-search run`")
        data = self._read(path)
        if data is None:
            raise ValueError(f"cannot read schedule {path}")
        r = int(data.get("round", 0))
        weights = path.parent / "model.safetensors"
        if r > 0 and not weights.is_file():
            raise FileNotFoundError(f"{self.path} kept round {r}'s pair but has no fine-tuned model ({weights} is "
                                    "missing)")
        try:
            return Candidate.from_row(data, round=r, weights=weights if r > 0 else None)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    def kept_family(self) -> str | None:
        """The model family best/schedule.json records (None for runs from before it recorded one)."""
        data = self._read(self.path / "best" / "schedule.json") or {}
        return str(data["family"]) if "family" in data else None

    @staticmethod
    def pair_summary(pair: Candidate) -> dict[str, Any]:
        """results.json's `best`: which pair was kept and its scores (its schedule is in best/schedule.json)."""
        return {"round": pair.round, "name": pair.name, "solver": pair.solver, "origin": pair.origin,
                "model": None if pair.weights is None else str(pair.weights), **pair.scores.as_row()}

    def write_results(self, results: dict[str, Any]) -> Path:
        return atomic_write_json(self.path / "results.json", results)

    def results(self) -> dict[str, Any] | None:
        return self._read(self.path / "results.json")

    # ------------------------------------------------------------ the Optuna record
    def note_record(self, storage: str, study: str) -> None:
        """Remember where the Optuna record is (password removed), for `fewstep-search dashboard DIR`."""
        info = self.record_location() or {"storage": storage, "studies": []}
        info["storage"] = storage
        if study not in info["studies"]:
            info["studies"].append(study)
        atomic_write_json(self.path / RECORD_FILE, info)

    def record_location(self) -> dict[str, Any] | None:
        return self._read(self.path / RECORD_FILE)

    @staticmethod
    def _read(path: Path) -> dict[str, Any] | None:
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return data if isinstance(data, dict) else None
