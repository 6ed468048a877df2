"""Glue from a validated study to results in a run directory (no math here; see optimize.py, bank.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from fewstep_search.bank import Bank, build_bank
from fewstep_search.models.base import Denoiser, sigma_range
from fewstep_search.optimize import search_in_process
from fewstep_search.rundir import RunDir
from fewstep_search.study import StudyConfig

__all__ = ["load_study_model", "resolve_range", "resolve_shape", "ensure_bank", "phase1_in_process"]


def load_study_model(config: StudyConfig, study_path: Path | None) -> Denoiser:
    """The study's denoiser; relative model paths resolve against the study file's folder."""
    from fewstep_search.models.loading import load_model

    spec = config.model
    return load_model(spec.kind, path=spec.path, factory=spec.factory, options=spec.options, device=config.device,
                      base_dir=study_path.parent if study_path else None)


def resolve_range(denoiser: Denoiser, config: StudyConfig) -> tuple[float, float]:
    """The study's sigma range, else the model's advertised one."""
    lo, hi = sigma_range(denoiser, default=(0.002, 80.0))
    lo = config.model.sigma_min or lo
    hi = config.model.sigma_max or hi
    if lo >= hi:
        raise ValueError(f"model sigma range is empty: sigma_min={lo} >= sigma_max={hi}")
    return lo, hi


def resolve_shape(denoiser: Denoiser, config: StudyConfig) -> tuple[int, ...]:
    shape = config.model.shape or getattr(denoiser, "shape", None)
    if not shape:
        raise ValueError("the model does not advertise its sample shape; set model.shape in the study file")
    return tuple(int(s) for s in shape)


def ensure_bank(denoiser: Denoiser, config: StudyConfig, rundir: RunDir, *, progress: bool) -> Bank:
    """The run directory's bank, rebuilt (and saved) when its metadata does not match the study."""
    sigma_min, sigma_max = resolve_range(denoiser, config)
    shape = resolve_shape(denoiser, config)
    b = config.bank
    expect = {"model_id": config.model.model_id, "sigma_min": sigma_min, "sigma_max": sigma_max, "shape": list(shape),
              "n_trajectories": b.n_trajectories, "grid_size": b.grid_size, "seed": b.seed, "dtype": b.dtype}
    return rundir.bank(
        expect,
        lambda: build_bank(
            denoiser, shape=shape, sigma_min=sigma_min, sigma_max=sigma_max, model_id=config.model.model_id,
            progress=progress, device=config.device, **b.model_dump(exclude={"dtype"}),
            dtype=getattr(torch, b.dtype),
        ),
    )


def phase1_in_process(
    denoiser: Denoiser, config: StudyConfig, rundir: RunDir, *, progress: bool, console: Console, round_index: int = 1
) -> dict[str, Any]:
    """Round `round_index` of Phase-1 in process; a round already finished in the run directory is reused."""
    done = rundir.finished_round(round_index)
    if done is not None:
        console.print(f"round {round_index} already finished in {rundir.round_dir(round_index)}; reusing it")
        return done
    sigma_min, sigma_max = resolve_range(denoiser, config)
    shape = resolve_shape(denoiser, config)
    bank = ensure_bank(denoiser, config, rundir, progress=progress)
    p1 = config.phase1
    result = search_in_process(
        denoiser, nfe=config.nfe, shape=shape, sigma_min=sigma_min, sigma_max=sigma_max, bank=bank,
        heuristics=p1.heuristics, refine_starts=p1.refine_starts, refine_steps=p1.refine_steps, lr=p1.lr,
        solver=p1.solver, batch_size=config.bank.batch_size,
    )
    ref = result.best_heuristic.heldout_error
    cands = [
        {**c.schedule.to_dict(), "kind": c.kind, "fit_error": c.fit_error, "heldout_error": c.heldout_error,
         "heldout_vs_best_heuristic": c.heldout_error / ref, "seconds": c.seconds}
        for c in result.candidates
    ]
    best = min(cands, key=lambda c: c["heldout_error"])
    metrics = {"round": round_index, "nfe": config.nfe, "best": best, "candidates": cands,
               "timings": result.timings}
    rundir.write_round(round_index, best, metrics)
    return metrics
