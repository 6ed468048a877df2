"""ComfyUI custom node: a fewstep-search result as SIGMAS plus the built-in sampler that computes the same steps.

Install: copy (or link) this folder into ComfyUI's `custom_nodes/`. It needs nothing beyond ComfyUI itself (torch);
fewstep-search need not be installed there. Wiring: `FewstepSigmas` -> `SamplerCustom` (its `sigmas` and `sampler`
inputs), with the model, positive / negative conditioning and latent as usual.

What it reads: a run's `best/schedule.json` (`{"sigmas": [N + 1 values, last sigma_min], "solver", "family"}`), as
`fewstep-search run` writes it. What it outputs: the sigmas the tool scored, with sigma_min replaced by 0 (the last
step lands on the model's output, as every ComfyUI sampler ends; N model calls), in ComfyUI's coordinates (EDM
sigma for EDM and VP models, flow time t for flow models), and the sampler of `COMFYUI_SAMPLERS`.

Why each sampler matches (read in ComfyUI's `comfy/k_diffusion/sampling.py`; the repository's docs/export.md):
on EDM / VP models ComfyUI works in EDM sigma, and `euler` (x + (sigma' - sigma)(x - D)/sigma) is DDIM,
`dpmpp_2m` is DPM-Solver++(2M) with the same h_last / h ratio and a plain step into 0, `ipndm` is the same
equal-step Adams-Bashforth table on (x - D)/sigma, `heun` takes Euler into 0. Flow models run in t, where only the
first-order step is the same (Euler in t = DDIM in sigma); a flow schedule searched for another solver is refused.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

COMFYUI_SAMPLERS = {"ddim": "euler", "euler": "euler", "heun": "heun", "dpmpp_2m": "dpmpp_2m", "ipndm": "ipndm"}
"""fewstep-search solver -> ComfyUI sampler name (`KSamplerSelect`) with the same steps on EDM / VP models."""
FLOW_SOLVERS = ("ddim", "euler")
"""Solvers whose steps ComfyUI's samplers reproduce on flow models (which ComfyUI runs in t)."""


def read_result(path: str | Path) -> tuple[list[float], str, str]:
    """(sampler sigmas ending in 0, in ComfyUI's coordinates; ComfyUI sampler name; solver) of a schedule file,
    with one-line errors."""
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / "best" / "schedule.json" if (file / "best").is_dir() else file / "schedule.json"
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read a fewstep-search schedule from {file}: {e}") from None
    sigmas = data.get("sigmas") if isinstance(data, dict) else None
    if not isinstance(sigmas, list) or len(sigmas) < 2 or not all(isinstance(s, (int, float)) for s in sigmas):
        raise ValueError(f"{file} has no 'sigmas' list (a run's best/schedule.json has one)")
    values = [float(s) for s in sigmas]
    decreasing = all(b < a for a, b in zip(values, values[1:], strict=False))
    if any(not math.isfinite(s) or s <= 0 for s in values) or not decreasing:
        raise ValueError(f"{file}: sigmas must be positive and strictly decreasing, got {values}")
    solver, family = str(data.get("solver", "ddim")), str(data.get("family", "edm"))
    if solver not in COMFYUI_SAMPLERS:
        raise ValueError(f"ComfyUI has no built-in sampler for solver {solver!r}; known: {', '.join(COMFYUI_SAMPLERS)}")
    if family == "flow" and solver not in FLOW_SOLVERS:
        raise ValueError(f"ComfyUI runs flow models in t, where its {COMFYUI_SAMPLERS[solver]} is another sampler than "
                         f"the {solver} this schedule was searched for; search with solver ddim for ComfyUI")
    run = values[:-1] + [0.0]  # the last step into 0: N model calls, the scored sampler
    if family == "flow":
        run = [s / (1.0 + s) for s in run]
    return run, COMFYUI_SAMPLERS[solver], solver


class FewstepSigmas:
    """Load a fewstep-search result: SIGMAS, the matching SAMPLER, and its name."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:  # noqa: N802 - ComfyUI's node contract
        return {"required": {"schedule_json": ("STRING", {"default": "runs/demo/best/schedule.json",
                                                          "multiline": False})}}

    RETURN_TYPES = ("SIGMAS", "SAMPLER", "STRING")
    RETURN_NAMES = ("sigmas", "sampler", "sampler_name")
    FUNCTION = "load"
    CATEGORY = "sampling/custom_sampling/schedulers"
    DESCRIPTION = "A fewstep-search result (best/schedule.json): its sigmas and the sampler it was scored with."

    def load(self, schedule_json: str) -> tuple:
        import comfy.samplers  # ComfyUI's own module: present where the node runs
        import torch

        sigmas, name, _ = read_result(schedule_json)
        return torch.tensor(sigmas, dtype=torch.float32), comfy.samplers.sampler_object(name), name


NODE_CLASS_MAPPINGS = {"FewstepSigmas": FewstepSigmas}
NODE_DISPLAY_NAME_MAPPINGS = {"FewstepSigmas": "fewstep-search sigmas"}
