"""Exports: a searched `Schedule` in the form users paste into samplers, spending exactly the budget.

A schedule `sigma_N > ... > sigma_1 > sigma_0 = sigma_min > 0` costs N model calls with a first-order solver.
Samplers stop at sigma = 0, so every export REPLACES sigma_min by 0 (the last step then lands on
`D(x_1, sigma_1)`): N model calls, not N + 1 (appending a 0 would add a step). DESIGN.md section 1.

What each target does with the values (read in diffusers 0.42's source):
- k-diffusion `sample_euler(model, x, sigmas)`: the N + 1 sigmas as given (last 0).
- diffusers `EulerDiscreteScheduler.set_timesteps(sigmas=...)`: N + 1 values used as given (last 0); the model is
  called at the fractional timesteps diffusers interpolates in log sigma (what `DiffusersUNetDenoiser` does by
  default). For a VP model the scheduler's sigma is `sigma_t / alpha_t`, which is our sigma. DDPM-trained models
  also get integer `timesteps` for `set_timesteps(timesteps=...)`, which snap the schedule to trained steps.
- diffusers `FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=...)`: N values of t; it applies its own shift
  to them and appends the final 0 itself, so the export undoes the shift and drops the 0. Configurations that
  change the values in ways that cannot be undone exactly are refused (`flow_scheduler_sigmas`).

Everything here is a pure function of the schedule and what the model advertises (`ModelInfo`), except
`export_diffusers_folder`, which writes a fine-tuned model as a diffusers folder.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fewstep_search.models.flow import FLOW_SCHEDULER, sigma_to_t, unshift_t
from fewstep_search.noise import DiscreteVP
from fewstep_search.schedules import Schedule
from fewstep_search.solvers import FIRST_ORDER_SOLVERS

__all__ = [
    "FAMILIES",
    "FORMATS",
    "ModelInfo",
    "model_info",
    "export_sigmas",
    "calls_of",
    "export_json",
    "export_k_diffusion",
    "vp_timesteps",
    "flow_scheduler_sigmas",
    "export_diffusers",
    "export_diffusers_folder",
    "dumps",
]

FAMILIES = ("edm", "vp", "flow")
FORMATS = ("json", "k-diffusion", "diffusers", "diffusers-folder")
_K_SAMPLERS = {"ddim": "sample_euler", "euler": "sample_euler", "heun": "sample_heun", "dpmpp_2m": "sample_dpmpp_2m"}
# FlowMatchEulerDiscreteScheduler options that replace or re-map the given sigmas beyond the (undoable) shift.
_FLOW_REPLACING = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
_SHIFT_TERMINAL_TOL = 1e-6


@dataclass(frozen=True)
class ModelInfo:
    """What a model advertises that an export needs: its family and that family's coordinates."""

    family: str = "edm"
    vp: DiscreteVP | None = None
    shift: float = 1.0
    scheduler_config: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        _check_family(self.family)


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")


def _advertised(denoiser: object, attr: str) -> Any:
    """`attr` of a denoiser or of the model it wraps (CheckedDenoiser passes on only a few attributes)."""
    obj, seen = denoiser, 0
    while obj is not None and seen < 8:
        if getattr(obj, attr, None) is not None:
            return getattr(obj, attr)
        obj, seen = getattr(obj, "inner", None), seen + 1
    return None


def model_info(denoiser: object) -> ModelInfo:
    """The family of a denoiser: `family` where it says, else "vp" when it has a `DiscreteVP` table, else "edm"."""
    vp = _advertised(denoiser, "vp")
    family = _advertised(denoiser, "family") or ("vp" if isinstance(vp, DiscreteVP) else "edm")
    return ModelInfo(
        family=str(family),
        vp=vp if isinstance(vp, DiscreteVP) else None,
        shift=float(_advertised(denoiser, "shift") or 1.0),
        scheduler_config=_advertised(denoiser, "scheduler_config"),
    )


def export_sigmas(schedule: Schedule) -> np.ndarray:
    """The N + 1 sigmas with sigma_min replaced by 0: what a sampler needs for exactly N first-order calls."""
    out = np.array(schedule.sigmas, dtype=np.float64, copy=True)
    out[-1] = 0.0
    return out


def calls_of(solver: str, nfe: int) -> int:
    """Model calls of `solver` on the exported sigmas (Heun takes an Euler step into 0)."""
    if solver not in _K_SAMPLERS:
        raise ValueError(f"no export for solver {solver!r}; known: {', '.join(_K_SAMPLERS)}")
    return 2 * nfe - 1 if solver == "heun" else nfe


def _floats(values: np.ndarray) -> list[float]:
    return [float(v) for v in values]


def export_json(schedule: Schedule, *, family: str = "edm", solver: str = "ddim") -> dict[str, Any]:
    """`{"nfe", "sigmas" (N + 1, last 0), "solver", "family", ...}`; flow models also get their t values."""
    _check_family(family)
    out: dict[str, Any] = {
        "nfe": schedule.nfe,
        "sigmas": _floats(export_sigmas(schedule)),
        "solver": solver,
        "family": family,
        "calls": calls_of(solver, schedule.nfe),
        "name": schedule.name,
        "sigma_min_replaced": schedule.sigma_min,
    }
    if family == "flow":
        out["t"] = _floats(sigma_to_t(export_sigmas(schedule)))
    return out


def export_k_diffusion(schedule: Schedule, *, family: str = "edm", solver: str = "ddim") -> str:
    """A Python snippet defining `sigmas` (torch, descending, last 0) for k-diffusion's samplers."""
    sampler = _K_SAMPLERS.get(solver)
    if sampler is None:
        raise ValueError(f"no k-diffusion sampler for solver {solver!r}; known: {', '.join(_K_SAMPLERS)}")
    _check_family(family)
    vals = ", ".join(repr(v) for v in _floats(export_sigmas(schedule)))
    lines = [
        "import torch",
        "",
        f"# fewstep-search schedule {schedule.name!r}: {calls_of(solver, schedule.nfe)} model calls with",
        f"# k_diffusion.sampling.{sampler}(model, x, sigmas), x = sigmas[0] * torch.randn(...) (EDM convention)",
        f"sigmas = torch.tensor([{vals}], dtype=torch.float64)",
    ]
    if family == "flow":
        t_vals = ", ".join(repr(v) for v in _floats(sigma_to_t(export_sigmas(schedule))))
        lines += [
            "# Flow-matching model: samplers that take sigma = t (x_t = (1 - t) x0 + t eps, e.g. ComfyUI's flow",
            "# models, custom sigmas used as given, no shift) take these t values instead; start from",
            "# x_t = t[0] * torch.randn(...).",
            f"t = torch.tensor([{t_vals}], dtype=torch.float64)",
        ]
    return "\n".join(lines) + "\n"


def vp_timesteps(schedule: Schedule, vp: DiscreteVP) -> tuple[list[int], list[float]]:
    """(N integer timesteps, the N + 1 sigmas they stand for, last 0) of a DDPM-trained model.

    The nearest trained timestep of sigma_N .. sigma_1 (sigma_0 becomes the final 0, which takes no call). The
    sampler then runs the schedule snapped to the table; refused when two nodes snap to the same timestep.
    """
    steps = np.asarray(vp.t(schedule.sigmas[:-1], nearest=True), dtype=np.int64)
    if np.any(np.diff(steps) >= 0):
        i = int(np.nonzero(np.diff(steps) >= 0)[0][0])
        raise ValueError(
            f"sigmas {schedule.sigmas[i]:.6g} and {schedule.sigmas[i + 1]:.6g} snap to the same trained timestep "
            f"{int(steps[i])}; use the sigmas export instead of integer timesteps"
        )
    snapped = np.append(vp.sigmas[steps], 0.0)
    return [int(s) for s in steps], _floats(snapped)


def _flow_shift(config: Mapping[str, Any], mu: float | None) -> float:
    """The shift `FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas, mu=mu)` applies (refusing the rest)."""
    if config.get("stochastic_sampling"):
        raise ValueError("FlowMatch scheduler has stochastic_sampling: it re-noises each step (not the ODE solver)")
    if config.get("invert_sigmas"):
        raise ValueError("FlowMatch scheduler has invert_sigmas (the Mochi convention, t = 0 is noise): not supported")
    for key in _FLOW_REPLACING:
        if config.get(key):
            raise ValueError(f"FlowMatch scheduler has {key}: it replaces the given sigmas by its own formula")
    if not config.get("use_dynamic_shifting"):
        if mu is not None:
            raise ValueError("mu is only used by a FlowMatch scheduler with use_dynamic_shifting; drop --mu")
        shift = float(config.get("shift", 1.0))
    else:
        if mu is None:
            raise ValueError("the FlowMatch scheduler uses dynamic shifting: pass mu (the pipeline's resolution shift)")
        kind = config.get("time_shift_type", "exponential")
        if kind not in ("exponential", "linear"):
            raise ValueError(f"unknown FlowMatch time_shift_type {kind!r}")
        shift = math.exp(mu) if kind == "exponential" else float(mu)  # with sigma = 1 both are s t / (1 + (s-1) t)
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"FlowMatch shift must be positive, got {shift}")
    return shift


def flow_scheduler_sigmas(
    schedule: Schedule,
    *,
    shift: float = 1.0,
    scheduler_config: Mapping[str, Any] | None = None,
    mu: float | None = None,
) -> tuple[list[float], float]:
    """(N values for `FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=...)`, the shift undone).

    The scheduler will run `t = sigma / (1 + sigma)` at sigma_N .. sigma_1 and then 0. Its config's `shift`
    (or, with `use_dynamic_shifting`, `exp(mu)` / `mu`) wins over `shift`; a shift changed at run time with
    `set_shift` cannot be seen here. `shift_terminal` is honoured only when it already equals the last t.
    """
    config = dict(scheduler_config or {})
    if config and config.get("_class_name", FLOW_SCHEDULER) != FLOW_SCHEDULER:
        raise ValueError(f"scheduler config is a {config['_class_name']}, not a {FLOW_SCHEDULER}")
    s = _flow_shift(config, mu) if config else float(shift)
    if not config and mu is not None:
        raise ValueError("mu needs the scheduler config (use_dynamic_shifting); this model has none")
    t = sigma_to_t(schedule.sigmas[:-1])
    terminal = config.get("shift_terminal")
    if terminal and abs(float(t[-1]) - float(terminal)) > _SHIFT_TERMINAL_TOL:
        raise ValueError(
            f"FlowMatch scheduler has shift_terminal={terminal}: it stretches the schedule to end there, "
            f"but this schedule's last t is {float(t[-1]):.6g}"
        )
    return _floats(unshift_t(t, s)), s


def export_diffusers(
    schedule: Schedule, info: ModelInfo, *, solver: str = "ddim", mu: float | None = None
) -> dict[str, Any]:
    """What diffusers' Euler schedulers take for this model family (see the module docstring)."""
    if solver not in FIRST_ORDER_SOLVERS:
        raise ValueError(f"diffusers' Euler schedulers are first order; this schedule was searched for {solver!r}")
    n = schedule.nfe
    if mu is not None and info.family != "flow":
        raise ValueError(f"mu is the FlowMatch scheduler's dynamic shift; this model is {info.family}, not flow")
    if info.family == "flow":
        values, s = flow_scheduler_sigmas(schedule, shift=info.shift, scheduler_config=info.scheduler_config, mu=mu)
        out: dict[str, Any] = {
            "scheduler": FLOW_SCHEDULER,
            "nfe": n,
            "sigmas": values,
            "shift": s,
            "t": _floats(sigma_to_t(export_sigmas(schedule))),
            "usage": "scheduler.set_timesteps(sigmas=sigmas" + (", mu=mu)" if mu is not None else ")"),
        }
        if mu is not None:
            out["mu"] = float(mu)
        return out
    out = {
        "scheduler": "EulerDiscreteScheduler",
        "nfe": n,
        "sigmas": _floats(export_sigmas(schedule)),
        "usage": "scheduler.set_timesteps(sigmas=sigmas)",
    }
    if info.family == "vp" and info.vp is not None:
        try:
            steps, snapped = vp_timesteps(schedule, info.vp)
        except ValueError as e:
            out["timesteps_note"] = str(e)
        else:
            out["timesteps"] = steps
            out["timestep_sigmas"] = snapped
            out["timesteps_usage"] = "scheduler.set_timesteps(timesteps=timesteps)  # snaps to trained steps"
    elif info.family == "edm":
        out["note"] = "EDM-convention model: EDMEulerScheduler re-maps given sigmas (sigma_schedule); use these as is"
    return out


# ---------------------------------------------------------------- fine-tuned models as diffusers folders

_PREFIXES = ("unet.", "model.", "transformer.")


def _strip_prefix(state: dict[str, Any]) -> dict[str, Any]:
    """The diffusers model's own keys from an adapter's state dict (`unet.` for the VP adapter, `model.` flow)."""
    for p in _PREFIXES:
        if state and all(k.startswith(p) for k in state):
            return {k[len(p) :]: v for k, v in state.items()}
    return state


def export_diffusers_folder(
    base_folder: str | os.PathLike[str], checkpoint_safetensors: str | os.PathLike[str], out_dir: str | os.PathLike[str]
) -> Path:
    """Write `out_dir`: the base diffusers folder with its model replaced by the fine-tuned weights.

    `base_folder` is the folder the study loaded (a pipeline with `unet/` or `transformer/` + `scheduler/`, or a
    model folder with `scheduler_config.json`); `checkpoint_safetensors` is Phase-2's state dict of the adapter
    module the loader returned (`DiffusersUNetDenoiser`: keys `unet.*`; `FlowMatchDenoiser`: `model.*`).
    The result is always the pipeline layout: `out_dir/<unet|transformer>/` (`save_pretrained`) and
    `out_dir/scheduler/scheduler_config.json`, plus the base's other components and `model_index.json` as they
    were. Written to a temporary folder and renamed, so a failure leaves no half folder; an existing non-empty
    `out_dir` is refused.
    """
    from safetensors.torch import load_file

    from fewstep_search.models.flow import diffusers_model_class, find_flow_layout

    base, out = Path(base_folder).expanduser(), Path(out_dir).expanduser()
    ckpt = Path(checkpoint_safetensors).expanduser()
    model_dir, scheduler_file = find_flow_layout(base)
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} does not exist")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not an empty folder; choose another --out")
    cls = diffusers_model_class(model_dir)
    try:
        state = _strip_prefix(load_file(str(ckpt)))
    except Exception as e:  # safetensors raises its own error types
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"cannot read checkpoint {ckpt}: {reason}") from e
    model = cls.from_pretrained(model_dir, local_files_only=True, low_cpu_mem_usage=False)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        first = (list(missing) + list(unexpected))[0]
        raise ValueError(
            f"checkpoint {ckpt} does not fit {cls.__name__} of {base}: {len(missing)} missing and "
            f"{len(unexpected)} unexpected keys (first: {first!r})"
        )
    sub = model_dir.name if model_dir != base else ("unet" if "UNet" in cls.__name__ else "transformer")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        if model_dir != base:  # a pipeline: keep its other components (vae, text encoders, model_index.json)
            for entry in base.iterdir():
                if entry.name in (sub, "scheduler"):
                    continue
                (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, tmp / entry.name)
        model.save_pretrained(tmp / sub)
        (tmp / "scheduler").mkdir()
        shutil.copy2(scheduler_file, tmp / "scheduler" / "scheduler_config.json")
        os.chmod(tmp, 0o755)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def dumps(obj: Any) -> str:
    """JSON text of an export (full float precision: Python's repr round-trips float64)."""
    return json.dumps(obj, indent=2) + "\n"
