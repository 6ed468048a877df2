"""The pair (weights, sigmas, solver) as a complete diffusers pipeline folder, whose scheduler is the package's
`FewstepScheduler` (`fewstep_search.integrations.diffusers_scheduler`): `DiffusionPipeline.from_pretrained(DIR)`
called with `num_inference_steps=N` makes exactly N network calls and gives the tool's samples.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fewstep_search.candidate import Candidate
from fewstep_search.models.source import trainable_module

__all__ = ["SCHEDULER_LIBRARY", "export_diffusers_folder", "export_lora_folder"]

SCHEDULER_LIBRARY = "fewstep_search.integrations.diffusers_scheduler"
"""The module `model_index.json` names for the exported scheduler (diffusers resolves it among imported modules)."""


def _network(adapter: object) -> Any:
    """The diffusers model inside the tool's adapter (`unet` of the VP adapter, `model` of the flow adapter)."""
    from diffusers import ModelMixin

    for attr in ("unet", "model"):
        net = getattr(adapter, attr, None)
        if isinstance(net, ModelMixin):
            return net
    raise ValueError(f"{type(adapter).__name__} wraps no diffusers model: only folder models export as a folder")


def _pipeline_index(base: Path, sub: str, network: Any) -> dict[str, Any] | None:
    """model_index.json of the export: the base's with the scheduler replaced; a DDPMPipeline for a bare
    UNet2DModel folder; None for another bare model (no pipeline class to name)."""
    import diffusers

    index_file = base / "model_index.json"
    if index_file.is_file():
        index = json.loads(index_file.read_text(encoding="utf-8"))
    elif type(network).__name__ == "UNet2DModel":
        index = {"_class_name": "DDPMPipeline", "_diffusers_version": diffusers.__version__,
                 sub: ["diffusers", "UNet2DModel"]}
    else:
        return None
    return {**index, "scheduler": [SCHEDULER_LIBRARY, "FewstepScheduler"]}


def _write_folder(out: Path, write: Callable[[Path], object]) -> Path:
    """`write` fills a temporary folder beside `out`, which is then renamed to `out` (a failure leaves no half
    folder); `out` must be absent or empty (checked by the callers first, before any work)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        write(tmp)
        os.chmod(tmp, 0o755)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def export_diffusers_folder(
    denoiser: object, base_folder: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, pair: Candidate
) -> Path:
    """Write `out_dir`: a complete diffusers pipeline folder that samples with the pair (weights, sigmas, solver).

    `denoiser` is the tool's adapter for `base_folder` (`DiffusersUNetDenoiser` or `FlowMatchDenoiser`, through
    `CheckedDenoiser` or not); the pair's weights, when it has its own (a Phase-2 round's), are loaded into it
    first. The pair's schedule carries its solver and family. The folder
    holds the base's other components (VAE, text encoders) as they were, the adapter's network saved with
    `save_pretrained`, and `scheduler/`: a `FewstepScheduler` (`fewstep_search.integrations.diffusers_scheduler`)
    with the sigmas, the solver and the timesteps the adapter calls the network with, so the pipeline called with
    `num_inference_steps=N` makes exactly N calls and gives the tool's samples. Written to a temporary folder and
    renamed (a failure leaves no half folder); an existing non-empty `out_dir` is refused. A bare model folder
    other than a UNet2DModel has no pipeline class: its export holds the components without `model_index.json`.
    """
    import torch

    from fewstep_search.integrations.diffusers_scheduler import FLOW_PREDICTION, SCHEDULER_FAMILIES, FewstepScheduler
    from fewstep_search.models.diffusers_adapter import read_scheduler_config
    from fewstep_search.models.flow import find_flow_layout
    from fewstep_search.models.source import load_checkpoint_into
    from fewstep_search.solvers import STEPS

    schedule = pair.schedule
    base, out = Path(base_folder).expanduser(), Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not an empty folder; choose another --out")
    if schedule.family not in SCHEDULER_FAMILIES:
        raise ValueError(f"a {schedule.family} model has no diffusers pipeline; use --format json or k-diffusion")
    if schedule.solver not in STEPS:
        raise ValueError(f"the exported scheduler runs {', '.join(STEPS)}; a {schedule.solver} schedule exports as "
                         "--format json or k-diffusion")
    model_dir, scheduler_file = find_flow_layout(base)
    adapter = trainable_module(denoiser) or denoiser
    network = _network(adapter)
    if pair.weights is not None:
        load_checkpoint_into(adapter, pair.weights)  # type: ignore[arg-type]  # a folder model is a module
    with torch.no_grad():
        steps = adapter.model_timesteps(torch.tensor(schedule.sigmas[:-1], dtype=torch.float64))  # type: ignore
    base_config = read_scheduler_config(scheduler_file)
    scheduler = FewstepScheduler(
        sigmas=[float(s) for s in schedule.sigmas], solver=schedule.solver, family=schedule.family,
        timesteps=[float(t) for t in steps.float()],
        prediction_type=FLOW_PREDICTION if schedule.family == "flow" else str(adapter.prediction_type),
        num_train_timesteps=int(base_config.get("num_train_timesteps", 1000)), name=schedule.name,
        base_config=base_config,
    )
    sub = model_dir.name if model_dir != base else ("unet" if "UNet" in type(network).__name__ else "transformer")
    index = _pipeline_index(base, sub, network)

    def write(tmp: Path) -> None:
        if model_dir != base:  # a pipeline: keep its other components (vae, text encoders, tokenizers)
            for entry in base.iterdir():
                if entry.name in (sub, "scheduler", "model_index.json"):
                    continue
                (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, tmp / entry.name)
        network.save_pretrained(tmp / sub)
        scheduler.save_pretrained(tmp / "scheduler")
        if index is not None:
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

    return _write_folder(out, write)


def export_lora_folder(denoiser: object, base_folder: str | os.PathLike[str], adapters: str | os.PathLike[str],
                       out_dir: str | os.PathLike[str], *, rank: int, alpha: float | None = None) -> Path:
    """Write a LoRA round's adapters in diffusers' LoRA format: `pipe.load_lora_weights(out_dir)` on the base
    pipeline (with the exported `FewstepScheduler`, or any sampler) applies exactly the round's weights.

    `adapters` is the round's `adapters.safetensors` (peft keys under the tool's denoiser); they are written with
    the base pipeline class's own `save_lora_weights`, with the rank and alpha as adapter metadata.
    """
    import diffusers
    from safetensors.torch import load_file

    base, out = Path(base_folder).expanduser(), Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not an empty folder; choose another --out")
    index_file = base / "model_index.json"
    if not index_file.is_file():
        raise ValueError(f"{base} is not a pipeline folder (no model_index.json): LoRA weights load into a pipeline")
    pipeline_cls = getattr(diffusers, str(json.loads(index_file.read_text(encoding="utf-8")).get("_class_name")), None)
    if pipeline_cls is None or not hasattr(pipeline_cls, "save_lora_weights"):
        raise ValueError(f"{base}: this pipeline class loads no LoRA weights")
    adapter = trainable_module(denoiser) or denoiser  # type: ignore[arg-type]
    network = _network(adapter)
    prefix = next(name for name, module in adapter.named_children() if module is network) + "."  # type: ignore
    slot = "unet" if "UNet" in type(network).__name__ else "transformer"
    layers = {key[len(prefix):].replace(".default.", "."): value for key, value in load_file(str(adapters)).items()
              if key.startswith(prefix)}
    if not layers:
        raise ValueError(f"{adapters} holds no adapters of the {type(network).__name__}")
    targets = sorted({key.split(".lora_")[0] for key in layers})  # full module paths: peft matches them exactly
    metadata = {"r": int(rank), "lora_alpha": float(alpha if alpha is not None else rank), "target_modules": targets,
                "rank_pattern": {}, "alpha_pattern": {}}  # a whole LoraConfig's keys: diffusers 0.34 reads them all
    save = {f"{slot}_lora_layers": layers, f"{slot}_lora_adapter_metadata": metadata}
    return _write_folder(out, lambda tmp: pipeline_cls.save_lora_weights(tmp, **save))
