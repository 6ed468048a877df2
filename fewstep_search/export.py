"""Exports: a searched `Schedule` in the form users paste into samplers, spending exactly the budget.

A schedule `sigma_N > ... > sigma_1 > sigma_0 = sigma_min > 0` costs N model calls with a first-order solver.
Samplers stop at sigma = 0, so every export REPLACES sigma_min by 0 (the last step then lands on
`D(x_1, sigma_1)`): N model calls, not N + 1 (appending a 0 would add a step). Every score of the tool ran the
same sampler (`fewstep_search.solvers.sampling_sigmas`), so an export's E is the E the run reported.

What each target does with the values (read in diffusers 0.42's source):
- k-diffusion `sample_euler(model, x, sigmas)`: the N + 1 sigmas as given (last 0).
- diffusers `EulerDiscreteScheduler.set_timesteps(sigmas=...)`: N + 1 values used as given (last 0); the model is
  called at the fractional timesteps diffusers interpolates in log sigma (what `DiffusersUNetDenoiser` does by
  default). For a VP model the scheduler's sigma is `sigma_t / alpha_t`, which is our sigma. DDPM-trained models
  also get integer `timesteps` for `set_timesteps(timesteps=...)`, which snap the schedule to trained steps.
- diffusers `FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=...)`: N values of t; it applies its own shift
  to them and appends the final 0 itself, so the export undoes the shift and drops the 0. Configurations that
  change the values in ways that cannot be undone exactly are refused (`flow_scheduler_sigmas`).

Everything here is a pure function of the schedule and what the model advertises (`ModelInfo`). The pair
(weights, sigmas, solver) as a diffusers pipeline folder, whose scheduler runs every solver but Heun, is written by
`fewstep_search.integrations.pipeline_folder`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fewstep_search.denoiser import advertised, family_of
from fewstep_search.integrations.k_diffusion import K_DIFFUSION_SAMPLERS
from fewstep_search.models.flow import FLOW_SCHEDULER, sigma_to_t, unshift_t
from fewstep_search.noise import DiscreteVP
from fewstep_search.schedules import MODEL_FAMILIES, Schedule, prior_scale
from fewstep_search.solvers import FIRST_ORDER_SOLVERS, nfe_of, sampling_sigmas

__all__ = [
    "FAMILIES",
    "FORMATS",
    "FOLDER_KINDS",
    "ModelInfo",
    "model_info",
    "export_sigmas",
    "calls_of",
    "export_json",
    "export_k_diffusion",
    "vp_timesteps",
    "flow_scheduler_sigmas",
    "export_diffusers",
    "FormatStatus",
    "format_statuses",
    "dumps",
]

FAMILIES = MODEL_FAMILIES
FORMATS = ("json", "k-diffusion", "diffusers", "diffusers-folder", "lora")
FOLDER_KINDS = ("diffusers", "flow", "pipeline")
"""Model kinds loaded from a diffusers folder, which `diffusers-folder` exports (with a `path`)."""
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


def model_info(denoiser: object) -> ModelInfo:
    """What a denoiser advertises for its exports: its family (`denoiser.family_of`) and that family's data."""
    vp = advertised(denoiser, "vp")
    return ModelInfo(
        family=family_of(denoiser),
        vp=vp if isinstance(vp, DiscreteVP) else None,
        shift=float(advertised(denoiser, "shift") or 1.0),
        scheduler_config=advertised(denoiser, "scheduler_config"),
    )


def export_sigmas(schedule: Schedule) -> np.ndarray:
    """The N + 1 sigmas with sigma_min replaced by 0 (`solvers.sampling_sigmas`, the sampler every score ran)."""
    return sampling_sigmas(schedule.tensor()).numpy()


def calls_of(solver: str, nfe: int) -> int:
    """Model calls of `solver` on the exported sigmas (Heun takes an Euler step into 0)."""
    if solver not in K_DIFFUSION_SAMPLERS:
        raise ValueError(f"no export for solver {solver!r}; known: {', '.join(K_DIFFUSION_SAMPLERS)}")
    return 2 * nfe - 1 if solver == "heun" else nfe_of(solver, nfe)


def _floats(values: np.ndarray) -> list[float]:
    return [float(v) for v in values]


def export_json(schedule: Schedule, *, family: str = "edm", solver: str = "ddim") -> dict[str, Any]:
    """`{"nfe", "sigmas" (N + 1, last 0), "solver", "family", ...}`; flow models also get their t values.

    `k_diffusion_sampler` names the sampler that computes the solver's steps on these sigmas."""
    _check_family(family)
    out: dict[str, Any] = {
        "nfe": schedule.nfe,
        "sigmas": _floats(export_sigmas(schedule)),
        "solver": solver,
        "family": family,
        "calls": calls_of(solver, schedule.nfe),
        "k_diffusion_sampler": K_DIFFUSION_SAMPLERS[solver],
        "name": schedule.name,
        "sigma_min_replaced": schedule.sigma_min,
        "start_scale": prior_scale(family, schedule.sigma_max),
    }
    if family == "flow":
        out["t"] = _floats(sigma_to_t(export_sigmas(schedule)))
    return out


def export_k_diffusion(schedule: Schedule, *, family: str = "edm", solver: str = "ddim") -> str:
    """A Python snippet defining `sigmas` (torch, descending, last 0) and naming the k-diffusion-signature sampler
    that computes `solver`'s steps (k-diffusion's own, or the package's where it has none)."""
    sampler = K_DIFFUSION_SAMPLERS.get(solver)
    if sampler is None:
        raise ValueError(f"no k-diffusion sampler for solver {solver!r}; known: {', '.join(K_DIFFUSION_SAMPLERS)}")
    _check_family(family)
    vals = ", ".join(repr(v) for v in _floats(export_sigmas(schedule)))
    module, name = sampler.rsplit(".", 1)
    scale = prior_scale(family, schedule.sigma_max)
    lines = [
        "import torch",
        f"from {module} import {name}",
        "",
        f"# fewstep-search schedule {schedule.name!r} (solver {solver}): {calls_of(solver, schedule.nfe)} model calls",
        f"# with {name}(model, x, sigmas), x = {scale!r} * torch.randn(...) (the start the search used)",
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
        raise ValueError(f"diffusers' Euler schedulers are first order and this schedule is for {solver!r}: use "
                         "--format diffusers-folder (the package's scheduler runs it), json or k-diffusion")
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


@dataclass(frozen=True)
class FormatStatus:
    """Whether a format can honour a run's pair, and the one line that says how (or why not)."""

    name: str
    works: bool
    line: str


def format_statuses(schedule: Schedule, *, kind: str, has_folder: bool, has_adapters: bool = False
                    ) -> list[FormatStatus]:
    """Every export format for a pair (`schedule` with its solver and family) of a model of `kind`, in order of
    how much of the pair it carries; `has_folder`: the model is a diffusers folder (kinds diffusers, flow,
    pipeline); `has_adapters`: the pair's weights are a LoRA round's (`fewstep_search.phase2.lora`)."""
    from fewstep_search.solvers import STEPS

    solver, family = schedule.solver, schedule.family
    known = solver in K_DIFFUSION_SAMPLERS
    out = [FormatStatus("json", known, f"sigmas ending in 0, solver {solver}" if known
                        else f"no export for solver {solver!r}")]
    out.append(FormatStatus("k-diffusion", known, f"a snippet for {K_DIFFUSION_SAMPLERS[solver]}" if known
                            else f"no k-diffusion sampler for {solver!r}"))
    first = solver in FIRST_ORDER_SOLVERS
    out.append(FormatStatus("diffusers", first, "sigmas for diffusers' Euler / FlowMatch schedulers" if first
                            else f"diffusers' Euler schedulers are first order, this schedule is for {solver}"))
    if not has_folder:
        why = f"model kind {kind!r} is not a diffusers folder (kinds {', '.join(FOLDER_KINDS)} are)"
    elif family not in ("vp", "flow"):
        why = f"a {family} model has no diffusers pipeline"
    elif solver not in STEPS:
        why = f"the package's scheduler runs {', '.join(STEPS)}, not {solver}"
    else:
        why = ""
    out.append(FormatStatus("diffusers-folder", not why, why or "a pipeline folder: weights, sigmas and the "
                            "package's scheduler for " + solver))
    lora = has_adapters and kind == "pipeline"
    out.append(FormatStatus("lora", lora, "the round's LoRA adapters, for pipe.load_lora_weights" if lora else
                            "the kept pair has no LoRA adapters (phase2.lora_rank on a pipeline)"))
    return out


def dumps(obj: Any) -> str:
    """JSON text of an export (full float precision: Python's repr round-trips float64)."""
    return json.dumps(obj, indent=2) + "\n"
