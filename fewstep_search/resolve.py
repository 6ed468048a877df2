"""From a validated study to the concrete things a run needs: device, model source, sigma range, shape, bank.

No silent fallbacks: a range the model does not advertise must come from the study (else a one-line error); a
study range outside the model's is narrowed to it with a visible note; a cached bank that does not match is
rebuilt with a note saying why. Notes are returned to the caller, which prints them and records them in
results.json.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fewstep_search.bank import Bank, BankPlan, build_bank, plan_for
from fewstep_search.bank.keep import build_keep_set, keep_expectation
from fewstep_search.denoiser import Denoiser, is_conditional, sigma_range
from fewstep_search.models.source import ModelSource
from fewstep_search.study import StudyConfig

__all__ = ["resolve_device", "model_source", "resolve_range", "resolve_shape", "bank_expectation", "build_study_bank",
           "cached_or_built_bank", "cached_or_built_keep_set", "study_plan"]


def resolve_device(device: str) -> str:
    """The device string, checked: `cuda` on a machine without CUDA is a one-line error within seconds."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for, but this torch has no CUDA device "
                             f"(torch {torch.__version__}); use device = \"cpu\" or install a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA devices are visible")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' was asked for, but MPS is not available on this machine")
    return device


def read_conditions(config: StudyConfig, *, study_path: Path | None) -> list[Any] | None:
    """The study's conditions: `model.conditions`, or the file `model.conditions_file` (JSON list or lines)."""
    import json

    spec = config.model
    if spec.conditions:
        return list(spec.conditions)
    if not spec.conditions_file:
        return None
    path = Path(spec.conditions_file).expanduser()
    if not path.is_absolute() and study_path is not None:
        path = study_path.parent / path
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"model.conditions_file {path} cannot be read: {exc.strerror or exc}") from None
    if path.suffix == ".json":
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"model.conditions_file {path} is not valid JSON: {exc}") from None
        if not isinstance(values, list):
            raise ValueError(f"model.conditions_file {path} must hold a JSON list")
    else:
        values = [line.strip() for line in text.splitlines() if line.strip()]
    if not values:
        raise ValueError(f"model.conditions_file {path} lists no conditions")
    return values


def model_source(config: StudyConfig, *, study_path: Path | None, run_folder: Path | None = None,
                 note: Callable[[str], None] | None = None) -> ModelSource:
    """The study's model as a spec every process can load (relative paths follow the study file).

    The study's conditions reach the model's factory as its `conditions` keyword argument. A text-to-image
    pipeline's prompt set is checked and embedded here, once, into `run_folder` (`models.t2i.setup`).
    """
    spec = config.model
    options = dict(spec.options)
    conditions = read_conditions(config, study_path=study_path)
    if conditions is not None:
        options["conditions"] = conditions
    if spec.kind == "pipeline" and config.prompts is not None:
        from fewstep_search.models.t2i.setup import PROMPT_EMBEDDINGS_FILE, pipeline_options

        folder = Path(str(spec.path)).expanduser()
        if not folder.is_absolute() and study_path is not None:
            folder = study_path.parent / folder
        p = config.prompts
        options = pipeline_options(
            folder, options, prompts_file=p.file, guidance_scale=p.guidance_scale, negative_prompt=p.negative_prompt,
            cache=None if run_folder is None else run_folder.resolve() / PROMPT_EMBEDDINGS_FILE, device=config.device,
            note=note)
    return ModelSource(kind=spec.kind, path=spec.path, factory=spec.factory, options=options,
                       device=config.device, base_dir=str(study_path.parent.resolve()) if study_path else None)


def check_conditions(denoiser: Denoiser, source: ModelSource) -> int:
    """The number of conditions; ValueError when the study lists conditions the model does not take."""
    listed = source.options.get("conditions")
    have = len(denoiser.conditions) if is_conditional(denoiser) else 0  # type: ignore[attr-defined]
    if listed is not None and have != len(listed):
        raise ValueError(f"the study lists {len(listed)} conditions but the model advertises "
                         f"{have or 'no'} `conditions`; its factory must return a conditional denoiser")
    return have


def resolve_range(denoiser: Denoiser, config: StudyConfig, notes: list[str]) -> tuple[float, float]:
    """The sigma range: the model's, narrowed by the study's; a study value outside the model's is clamped."""
    lo_m = getattr(denoiser, "sigma_min", None)
    hi_m = getattr(denoiser, "sigma_max", None)
    lo_s, hi_s = config.model.sigma_min, config.model.sigma_max
    if lo_m is None or hi_m is None:
        if lo_s is None or hi_s is None:
            raise ValueError(f"{type(denoiser).__name__} advertises no sigma range; set model.sigma_min and "
                             "model.sigma_max in the study file")
        return float(lo_s), float(hi_s)
    lo, hi = sigma_range(denoiser)
    if lo_s is not None:
        if lo_s < lo:
            notes.append(f"model.sigma_min = {lo_s:g} is below the model's trained range; using {lo:g}")
        else:
            lo = float(lo_s)
    if hi_s is not None:
        if hi_s > hi:
            notes.append(f"model.sigma_max = {hi_s:g} is above the model's trained range; using {hi:g}")
        else:
            hi = float(hi_s)
    if lo >= hi:
        raise ValueError(f"the sigma range is empty: sigma_min={lo:g} >= sigma_max={hi:g}")
    return lo, hi


def resolve_shape(denoiser: Denoiser, config: StudyConfig) -> tuple[int, ...]:
    shape = config.model.shape or getattr(denoiser, "shape", None)
    if not shape:
        raise ValueError("the model does not advertise its sample shape; set model.shape in the study file")
    return tuple(int(s) for s in shape)


def bank_expectation(config: StudyConfig, *, sigma_min: float, sigma_max: float, shape: tuple[int, ...],
                     n_conditions: int) -> dict[str, Any]:
    """The metadata a cached bank must have to be reused for this study."""
    b = config.bank
    return {"model_id": config.model_id, "sigma_min": sigma_min, "sigma_max": sigma_max, "shape": list(shape),
            "n_trajectories": b.n_trajectories, "grid_size": b.grid_size, "seed": b.seed, "dtype": b.dtype,
            "select_fraction": b.select_fraction, "test_fraction": b.test_fraction, "substeps": b.substeps,
            "probes": b.probes, "gain_substeps": b.gain_substeps, "project_dim": b.project_dim,
            "store_float16": b.store_float16, "n_conditions": n_conditions}


_NOT_BUILD_SETTINGS = frozenset({"dtype", "sharded", "keep_trajectories"})
"""`[bank]` keys that are not `build_bank` keyword arguments: the dtype is passed as a torch dtype, `sharded`
picks the engine, `keep_trajectories` sizes the keep set (its own file)."""


def study_plan(denoiser: Denoiser, config: StudyConfig, *, sigma_min: float, sigma_max: float,
               shape: tuple[int, ...], **override: Any) -> BankPlan:
    """The `BankPlan` of the study's bank (`override`: plan fields to change, e.g. `keep_states`)."""
    b = config.bank
    settings = {**b.model_dump(exclude=_NOT_BUILD_SETTINGS | {"batch_size"}), **override}
    return plan_for(denoiser, shape=shape, sigma_min=sigma_min, sigma_max=sigma_max, dtype=b.dtype,
                    model_id=config.model_id, **settings)


def build_study_bank(denoiser: Denoiser, config: StudyConfig, *, sigma_min: float, sigma_max: float,
                     shape: tuple[int, ...], progress: bool, source: ModelSource | None = None,
                     shards: Path | None = None) -> Bank:
    """The study's bank: in this process, or (`bank.sharded`, with the model's `source` and a `shards` folder) as
    shards built by Ray tasks, resumable, and assembled here (`fewstep_search.bank_shards`)."""
    b = config.bank
    if not b.sharded or source is None or shards is None:
        return build_bank(denoiser, shape=shape, sigma_min=sigma_min, sigma_max=sigma_max,
                          model_id=config.model_id, progress=progress, device=config.device,
                          **b.model_dump(exclude=_NOT_BUILD_SETTINGS),
                          dtype=getattr(torch, b.dtype))
    from fewstep_search.bank_shards import build_bank_sharded

    plan = study_plan(denoiser, config, sigma_min=sigma_min, sigma_max=sigma_max, shape=shape)
    return build_bank_sharded(source, plan, shards, workers=config.search.workers, address=config.search.address,
                              device=config.device, batch_size=b.batch_size, progress=progress)


Loader = Callable[[dict[str, Any]], tuple[Bank | None, str | None]]
"""Reads a cached bank file for an expectation: (it, None), (None, why not) or (None, None) when there is none."""


def _cached_or_built(load: Loader, expect: dict[str, Any], build: Callable[[], Bank], save: Callable[[Bank], None],
                     notes: list[str], what: str) -> tuple[Bank, bool]:
    """(the cached `what`, False) when it matches `expect`, else (a new one, saved, True), with a note why the
    cached one was not reused."""
    found, why = load(expect)
    if found is not None:
        return found, False
    if why is not None:
        notes.append(f"the cached {what} was not reused ({why}); building a new one")
    made = build()
    save(made)
    return made, True


def _expectation(denoiser: Denoiser, config: StudyConfig, *, sigma_min: float, sigma_max: float,
                 shape: tuple[int, ...]) -> dict[str, Any]:
    n_cond = len(denoiser.conditions) if is_conditional(denoiser) else 0  # type: ignore[attr-defined]
    return bank_expectation(config, sigma_min=sigma_min, sigma_max=sigma_max, shape=shape, n_conditions=n_cond)


def cached_or_built_bank(denoiser: Denoiser, config: StudyConfig, *, load: Loader, save: Callable[[Bank], None],
                         sigma_min: float, sigma_max: float, shape: tuple[int, ...], progress: bool,
                         notes: list[str], source: ModelSource | None = None,
                         shards: Path | None = None) -> tuple[Bank, bool]:
    """(bank, built): the cached bank when it matches the study, else a new one (saved), with a note why.

    With `bank.sharded` the new bank is built as shards in `shards` (a killed build resumes from them) and
    the folder is removed once the assembled bank is saved."""
    expect = _expectation(denoiser, config, sigma_min=sigma_min, sigma_max=sigma_max, shape=shape)
    bank, built = _cached_or_built(
        load, expect, lambda: build_study_bank(denoiser, config, sigma_min=sigma_min, sigma_max=sigma_max,
                                               shape=shape, progress=progress, source=source, shards=shards),
        save, notes, "bank")
    if built and shards is not None and config.bank.sharded:
        import shutil

        shutil.rmtree(shards, ignore_errors=True)
    return bank, built


def cached_or_built_keep_set(denoiser: Denoiser, config: StudyConfig, *, load: Loader, save: Callable[[Bank], None],
                             sigma_min: float, sigma_max: float, shape: tuple[int, ...], progress: bool,
                             notes: list[str]) -> tuple[Bank | None, bool]:
    """(keep set, built): the loop's decision set (`fewstep_search.bank.keep`), cached like the bank; (None, False)
    with `bank.keep_trajectories = 0`."""
    n = config.bank.keep_trajectories
    if n == 0:
        return None, False
    expect = keep_expectation(_expectation(denoiser, config, sigma_min=sigma_min, sigma_max=sigma_max, shape=shape), n)
    plan = study_plan(denoiser, config, sigma_min=sigma_min, sigma_max=sigma_max, shape=shape, keep_states=False)
    return _cached_or_built(load, expect, lambda: build_keep_set(denoiser, plan, n, device=config.device,
                                                                 batch_size=config.bank.batch_size,
                                                                 progress=progress),
                            save, notes, "keep set")
