"""`load_model(kind, ...)`: one entry point from a study file's `[model]` table to a checked `Denoiser`.

Kinds live in a small registry (name -> loader); every loader imports its backend lazily, so importing this
module never imports diffusers or the digits network. Every model comes back wrapped in `CheckedDenoiser`, so
a NaN or a wrong-shaped output fails at the call that produced it.

| kind      | needs              | options                                                                |
|-----------|--------------------|------------------------------------------------------------------------|
| digits    | -                  | passed to `load_digits(device=...)`                                    |
| mixture   | -                  | `builtin_mixture(dim=64, seed=0)` arguments                            |
| diffusers | path (local)       | `timestep_mode`, `dtype` ("float32", "float64", ...), `prediction_type`|
| edm       | factory            | `sigma_min`, `sigma_max`, `prediction_type`; the rest go to the factory|
| factory   | factory            | passed to the factory as keyword arguments (with `device`)             |
| flow      | path or factory    | a FlowMatch diffusers folder, or a velocity factory (docs/flow.md)     |
| pipeline  | path (local)       | `height`, `width`, `dtype`; the prompts come from the study's [prompts]|

`factory` and `edm` run the user's own Python code (see `fewstep_search.models.factory`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fewstep_search.denoiser import CheckedDenoiser, Denoiser
from fewstep_search.models.errors import ModelLoadError

__all__ = ["ModelLoadError", "MODEL_KINDS", "MODEL_TABLE_KEYS", "load_model", "load_model_table"]


@dataclass(frozen=True)
class _Request:
    path: Path | None
    factory: str | None
    options: dict[str, Any]
    device: str | torch.device
    base_dir: Path | None


@dataclass(frozen=True)
class _Kind:
    loader: Callable[[_Request], Denoiser]
    needs_path: bool = False
    needs_factory: bool = False
    path_or_factory: bool = False


_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
MODEL_TABLE_KEYS = ("kind", "path", "factory", "options")


def _required(value: Any, what: str) -> Any:
    if value is None:
        raise ValueError(f"this model kind needs a {what}")
    return value


def _load_digits(req: _Request) -> Denoiser:
    from fewstep_search.models.digits import load_digits
    from fewstep_search.models.factory import check_kwargs

    kwargs = {"device": req.device, **req.options}
    check_kwargs(load_digits, kwargs, what="model kind 'digits'")
    return load_digits(**kwargs)


def _load_mixture(req: _Request) -> Denoiser:
    """The analytic mixture is device-agnostic (it follows its input's device), so `device` is not passed."""
    from fewstep_search.models.factory import check_kwargs
    from fewstep_search.models.mixture import builtin_mixture

    check_kwargs(builtin_mixture, req.options, what="model kind 'mixture'")
    return builtin_mixture(**req.options)


def _load_diffusers(req: _Request) -> Denoiser:
    from fewstep_search.models.diffusers_adapter import DiffusersUNetDenoiser

    opts = dict(req.options)
    unknown = sorted(set(opts) - {"timestep_mode", "dtype", "prediction_type"})
    if unknown:
        raise ValueError(
            f"model kind 'diffusers': unknown options {unknown}; known: timestep_mode, dtype, prediction_type"
        )
    dtype_name = opts.pop("dtype", "float32")
    if dtype_name not in _DTYPES:
        raise ValueError(f"model kind 'diffusers': dtype {dtype_name!r} is not one of {', '.join(_DTYPES)}")
    return DiffusersUNetDenoiser.from_pretrained(
        _required(req.path, "path"), device=req.device, dtype=_DTYPES[dtype_name], **opts
    )


def _load_edm(req: _Request) -> Denoiser:
    from fewstep_search.models.edm_adapter import CallableDenoiser
    from fewstep_search.models.factory import load_factory

    opts = dict(req.options)
    missing = [k for k in ("sigma_min", "sigma_max") if k not in opts]
    if missing:
        raise ValueError(f"model kind 'edm' needs options {missing} (the trained noise range)")
    lo, hi = opts.pop("sigma_min"), opts.pop("sigma_max")
    ptype = opts.pop("prediction_type", "x0")
    fn = load_factory(
        _required(req.factory, "factory"), kwargs={"device": req.device, **opts}, base_dir=req.base_dir
    )
    return CallableDenoiser(fn, sigma_min=lo, sigma_max=hi, prediction_type=ptype)


def _load_user_factory(req: _Request) -> Denoiser:
    from fewstep_search.models.factory import load_factory

    return load_factory(
        _required(req.factory, "factory"), kwargs={"device": req.device, **req.options}, base_dir=req.base_dir
    )


def _load_flow(req: _Request) -> Denoiser:
    from fewstep_search.models.flow import load_flow

    return load_flow(req)


PIPELINE_OPTIONS = ("height", "width", "dtype", "timestep_mode")
"""A pipeline's `[model] options`; `prompt_embeddings`, `guidance_scale` and `conditions` (the prompts) are added
by the run from the study's `[prompts]` (`fewstep_search.resolve.model_source`)."""


def _load_pipeline(req: _Request) -> Denoiser:
    from fewstep_search.models.t2i.guided import load_pipeline_denoiser

    opts = dict(req.options)
    unknown = sorted(set(opts) - set(PIPELINE_OPTIONS) - {"prompt_embeddings", "guidance_scale", "conditions"})
    if unknown:
        raise ValueError(f"model kind 'pipeline': unknown options {unknown}; known: {', '.join(PIPELINE_OPTIONS)}")
    if "prompt_embeddings" not in opts or "conditions" not in opts:
        raise ValueError("model kind 'pipeline' needs a [prompts] table in the study (file, guidance_scale)")
    dtype_name = opts.get("dtype", "float32")
    if dtype_name not in _DTYPES:
        raise ValueError(f"model kind 'pipeline': dtype {dtype_name!r} is not one of {', '.join(_DTYPES)}")
    return load_pipeline_denoiser(
        _required(req.path, "path"), opts["prompt_embeddings"], prompts=list(opts["conditions"]),
        guidance_scale=float(opts.get("guidance_scale", 1.0)), height=opts.get("height"), width=opts.get("width"),
        device=req.device, dtype=_DTYPES[dtype_name], timestep_mode=opts.get("timestep_mode", "interpolate"))


MODEL_KINDS: dict[str, _Kind] = {
    "digits": _Kind(_load_digits),
    "mixture": _Kind(_load_mixture),
    "diffusers": _Kind(_load_diffusers, needs_path=True),
    "edm": _Kind(_load_edm, needs_factory=True),
    "factory": _Kind(_load_user_factory, needs_factory=True),
    "flow": _Kind(_load_flow, path_or_factory=True),
    "pipeline": _Kind(_load_pipeline, needs_path=True),
}


def load_model(
    kind: str,
    *,
    path: str | Path | None = None,
    factory: str | None = None,
    options: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    base_dir: str | Path | None = None,
) -> CheckedDenoiser:
    """Build the model a study file names and wrap it in `CheckedDenoiser`.

    `path` (kind diffusers) and a `.py` factory path may be relative to `base_dir` (the study file's folder).
    Kinds `factory` and `edm` call `factory` with `device=device` plus `options` as keyword arguments: that
    runs the user's own code. Raises ValueError (ModelLoadError for load failures) with a one-line reason.

    Example:
        >>> den = load_model("mixture", options={"dim": 2})
        >>> den.sigma_max
        80.0
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; known kinds: {', '.join(MODEL_KINDS)}")
    spec = MODEL_KINDS[kind]
    if spec.path_or_factory:
        if (path is None) == (factory is None):
            raise ValueError(f"model kind {kind!r} needs exactly one of a path (a local folder) or a factory")
    else:
        if spec.needs_path and path is None:
            raise ValueError(f"model kind {kind!r} needs a path (a local folder)")
        if not spec.needs_path and path is not None:
            raise ValueError(f"model kind {kind!r} takes no path (got {str(path)!r})")
        if spec.needs_factory and not factory:
            raise ValueError(
                f"model kind {kind!r} needs factory = 'module:function' or 'path/to/file.py:function'"
            )
        if not spec.needs_factory and factory is not None:
            raise ValueError(f"model kind {kind!r} takes no factory (got {factory!r})")
    if options is not None and not isinstance(options, Mapping):
        raise ValueError(f"model options must be a table/dict, got {type(options).__name__}")
    base = Path(base_dir).expanduser() if base_dir is not None else None
    resolved = None
    if path is not None:
        resolved = Path(path).expanduser()
        if base is not None and not resolved.is_absolute():
            resolved = base / resolved
    inner = spec.loader(_Request(resolved, factory, dict(options or {}), device, base))
    return CheckedDenoiser(inner, name=f"{kind}:{resolved or factory or kind}")


def load_model_table(
    table: Mapping[str, Any], *, device: str | torch.device = "cpu", base_dir: str | Path | None = None
) -> CheckedDenoiser:
    """`load_model` from a study file's `[model]` table: `kind` (required), `path`, `factory`, `options`."""
    unknown = sorted(set(table) - set(MODEL_TABLE_KEYS))
    if unknown:
        raise ValueError(f"[model] table: unknown keys {unknown}; allowed: {', '.join(MODEL_TABLE_KEYS)}")
    if "kind" not in table:
        raise ValueError(f"[model] table needs kind = one of {', '.join(MODEL_KINDS)}")
    return load_model(
        table["kind"],
        path=table.get("path"),
        factory=table.get("factory"),
        options=table.get("options"),
        device=device,
        base_dir=base_dir,
    )
