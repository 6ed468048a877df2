"""Phase-1 as a search, from a validated study to a finished round in the run directory (glue, no math).

Steps: load or build the bank -> open the Optuna record (`DIR/optuna.db` by default) -> skip trials it already
holds as COMPLETE (resume) -> run the rest on Ray Tune, recording each as it finishes and showing a live table
-> select the winner on held-out E -> write `DIR/round_<r>/schedule.json` and `metrics.json` (the same schema
as the in-process Phase-1, plus the failed trials and where the record is).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from rich.console import Console

from fewstep_search.atomic import atomic_write_json
from fewstep_search.models.base import Denoiser
from fewstep_search.pipeline import ensure_bank
from fewstep_search.rundir import RunDir
from fewstep_search.search.engine import ModelSource, run_search
from fewstep_search.search.live import LiveTrials, trials_table
from fewstep_search.search.record import OptunaRecord, sqlite_url
from fewstep_search.search.select import best_heuristic, candidate_row, select_winner
from fewstep_search.search.trials import OptimizerFactory, TrialRecord
from fewstep_search.study import StudyConfig

__all__ = [
    "RECORD_FILE",
    "SearchOutcome",
    "phase1_search",
    "print_outcome",
    "record_location",
    "resolve_model_source",
    "study_name",
]

RECORD_FILE = "optuna.json"
"""Run-directory file naming the Optuna record (storage URL without password, studies), for `dashboard`."""


@dataclass
class SearchOutcome:
    """What a Phase-1 search round produced: the round's metrics (as written) and every trial's record."""

    metrics: dict[str, Any]
    records: list[TrialRecord] = field(default_factory=list)
    winner: TrialRecord | None = None
    resumed: bool = False


def study_name(nfe: int, round_index: int) -> str:
    return f"phase1-nfe{nfe}-round{round_index}"


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def record_location(rundir: RunDir) -> dict[str, Any] | None:
    """The run's Optuna record, as `phase1_search` wrote it to `DIR/optuna.json` (None when there is none)."""
    import json

    path = rundir.path / RECORD_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _note_record(rundir: RunDir, storage: str, name: str) -> None:
    info = record_location(rundir) or {"storage": _without_password(storage), "studies": []}
    info["storage"] = _without_password(storage)
    if name not in info["studies"]:
        info["studies"].append(name)
    atomic_write_json(rundir.path / RECORD_FILE, info)


def phase1_search(
    denoiser: Denoiser,
    config: StudyConfig,
    rundir: RunDir,
    *,
    model: ModelSource,
    console: Console,
    progress: bool = True,
    round_index: int = 1,
    extra_optimizers: Mapping[str, OptimizerFactory] | None = None,
) -> SearchOutcome:
    """Round `round_index` of Phase-1 as a Ray Tune search; resumes a finished round or a partial search.

    `denoiser` builds the bank in the driver; `model` is how workers get the same model (see `ModelSource`).
    Search settings come from `config.search` (workers, address, storage, trials, retries, tie tolerance).
    """
    done = rundir.finished_round(round_index)
    if done is not None:
        console.print(f"round {round_index} already finished in {rundir.round_dir(round_index)}; reusing it")
        return SearchOutcome(metrics=done, resumed=True)
    s = config.search
    t0 = time.perf_counter()
    bank = ensure_bank(denoiser, config, rundir, progress=progress)
    t_bank = time.perf_counter() - t0

    storage = s.storage or sqlite_url(rundir.path / "optuna.db")
    name = study_name(config.nfe, round_index)
    record = OptunaRecord(
        storage,
        name,
        optimizers=list(extra_optimizers or {}),
        attrs={
            "nfe": config.nfe,
            "model": config.model.model_id,
            "bank": config.bank.model_dump(mode="json"),
            "sigma_min": bank.sigma_min,
            "sigma_max": bank.sigma_max,
        },
    )
    _note_record(rundir, storage, name)

    specs = s.specs()
    wanted = {sp.key for sp in specs}
    previous = [r for r in record.records() if r.state == "COMPLETE" and r.spec.key in wanted]
    finished = {r.spec.key for r in previous}
    todo = [sp for sp in specs if sp.key not in finished]
    if previous:
        console.print(f"resuming: {len(previous)} of {len(specs)} trials already recorded in {name}")

    records = list(previous)
    t1 = time.perf_counter()
    with LiveTrials(
        title=f"Phase-1 search (NFE = {config.nfe})", total=len(specs), console=console, enabled=progress
    ) as live:
        for r in previous:
            live.add(r)

        def on_record(r: TrialRecord) -> None:
            record.add(r)
            records.append(r)
            live.add(r)

        if todo:
            run_search(
                todo,
                bank=bank,
                model=model,
                nfe=config.nfe,
                workers=s.workers,
                address=s.address,
                max_failures=s.max_failures,
                cpus_per_trial=s.cpus_per_trial,
                solver=config.phase1.solver,
                batch_size=config.bank.batch_size,
                extra_optimizers=extra_optimizers,
                on_record=on_record,
                storage_path=rundir.path / "tune",
                name=f"round_{round_index}",
            )
    t_search = time.perf_counter() - t1

    winner = select_winner(records, tie_tolerance=s.tie_tolerance)
    ref = best_heuristic(records)
    ref_e = ref.heldout_error if ref is not None else None
    rows = [candidate_row(r, reference=ref_e) for r in records if r.state == "COMPLETE"]
    best = candidate_row(winner, reference=ref_e)
    metrics = {
        "round": round_index,
        "nfe": config.nfe,
        "engine": "ray",
        "best": best,
        "candidates": rows,
        "failed": [
            {
                "name": r.spec.label,
                "key": r.spec.key,
                "trial": r.spec.to_dict(),
                "error": r.error,
                "attempts": r.attempts,
            }
            for r in records
            if r.state == "FAIL"
        ],
        "timings": {"bank": t_bank, "search": t_search},
        "optuna": {"storage": _without_password(storage), "study": name},
    }
    rundir.write_round(round_index, best, metrics)
    return SearchOutcome(metrics=metrics, records=records, winner=winner)


def print_outcome(outcome: SearchOutcome, *, console: Console, nfe: int) -> None:
    """The final table (every trial, or a finished round's candidates) and where the Optuna record is."""
    from fewstep_search.report import candidates_table

    m = outcome.metrics
    if outcome.records:
        title = f"Phase-1 search, every trial (NFE = {nfe})"
        console.print(trials_table(outcome.records, title=title, winner=outcome.winner))
    else:
        console.print(candidates_table(m["candidates"], title=f"Phase-1 candidates (NFE = {nfe})"))
    if "optuna" in m:
        console.print(
            f"every trial is in the Optuna study {m['optuna']['study']!r} at {m['optuna']['storage']}"
        )


def resolve_model_source(config: StudyConfig, *, study_path: Path | None) -> ModelSource:
    """The study's model as a spec the workers load themselves (built-ins, diffusers folders, factories)."""
    spec = config.model
    return ModelSource(
        kind=spec.kind,
        path=spec.path,
        factory=spec.factory,
        options=dict(spec.options),
        device=config.device,
        base_dir=str(study_path.parent.resolve()) if study_path else None,
    )
