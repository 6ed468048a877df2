"""`fewstep-search export RUN_DIR [--format json|k-diffusion|diffusers|diffusers-folder|lora] [--out FILE]`.

Turns a run's kept pair (RUN_DIR/best/schedule.json with its solver, and best/model.safetensors when a Phase-2
round was kept) into what a sampler takes, spending exactly the budget: sigma_min is replaced by 0, so N steps
are N model calls, and every score of the run used that same sampler. Without --format it lists the formats that
work for this run. Formats:

  json              {"nfe": N, "sigmas": [N + 1 values ending in 0], "solver", "family", ...}
  k-diffusion       a Python snippet: sigmas = torch.tensor([...]) and the sampler in k-diffusion's signature
                    that runs the solver (k-diffusion's own, or the package's sample_ipndm)
  diffusers         what EulerDiscreteScheduler / FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=...) take
                    (first-order solvers; the flow scheduler's own shift undone, integer timesteps for DDPMs)
  diffusers-folder  a complete pipeline folder (--out DIR): the pair's weights and the package's FewstepScheduler,
                    which runs every solver but Heun; load it after `import fewstep_search.integrations.
                    diffusers_scheduler` with DiffusionPipeline.from_pretrained(DIR)
  lora              a LoRA round's adapters in diffusers' format (--out DIR), for pipe.load_lora_weights(DIR)

The model's family (EDM, VP, flow) comes from RUN_DIR/config.json: folder models are read from their scheduler
config, a user factory is loaded to ask it (or pass --family). Prints to stdout unless --out is given.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

_FAMILY_OF_KIND = {"digits": "edm", "mixture": "edm", "edm": "edm"}
# The same tuples as fewstep_search.export.FORMATS / FAMILIES (a test checks), kept here so that building the
# parser does not import torch (`fewstep-search --help` stays fast).
FORMATS = ("json", "k-diffusion", "diffusers", "diffusers-folder", "lora")
FAMILIES = ("edm", "vp", "flow")
FOLDER_FORMATS = ("diffusers-folder", "lora")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a run's best schedule for k-diffusion / diffusers (exactly N model calls)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory written by `run` or `search`")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="what to export (default: list the formats that work for this run)")
    p.add_argument("--out", type=Path, default=None, help="write to this file (a folder for diffusers-folder)")
    p.add_argument("--family", choices=FAMILIES, default=None, help="the model's family, instead of asking it")
    p.add_argument(
        "--mu", type=float, default=None, help="FlowMatch dynamic shifting: the pipeline's mu (resolution shift)"
    )
    p.add_argument(
        "--base-dir", type=Path, default=None, help="folder that relative model paths in config.json are relative to"
    )
    p.set_defaults(handler=run)


def kept_pair(args: argparse.Namespace) -> Any:
    """The run's kept pair (`RunDir.kept_pair`) with its model family: the one the run recorded, else --family,
    else asked of the model (runs from before the family was recorded)."""
    import dataclasses

    from fewstep_search.rundir import RunDir

    run = RunDir(args.run_dir)
    pair = run.kept_pair()
    recorded = run.kept_family()
    if recorded is not None:
        if args.family is not None and args.family != recorded:
            raise ValueError(f"--family {args.family} contradicts the run, whose model is {recorded}")
        return pair
    family = args.family
    if family is None:
        config = run_config(args.run_dir)
        family = model_info_of(config["model"], _base_dir(args, config)).family
    return dataclasses.replace(pair, schedule=dataclasses.replace(pair.schedule, family=family))


def run_config(run_dir: Path) -> dict[str, Any]:
    """RUN_DIR/config.json (the resolved study), checked to hold a model table with a kind."""
    from fewstep_search.rundir import RunDir

    path = run_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (the run's resolved study); pass --family for json/k-diffusion")
    config = RunDir(run_dir).recorded_config()
    if config is None:
        raise ValueError(f"cannot read the run config {path}")
    if not isinstance(config.get("model"), dict) or "kind" not in config["model"]:
        raise ValueError(f"{path} has no model table with a kind")
    return config


def _base_dir(args: argparse.Namespace, config: dict[str, Any]) -> Path | None:
    """Where relative model paths start: --base-dir, else the study folder the run recorded, else the cwd."""
    if args.base_dir is not None:
        return args.base_dir
    from fewstep_search.rundir import RunDir

    study = RunDir(args.run_dir).recorded_study_file()
    if study is not None:
        return study.parent
    return Path(config["study_dir"]) if isinstance(config.get("study_dir"), str) else None


def _model_path(model: dict[str, Any], base_dir: Path | None) -> Path | None:
    if not model.get("path"):
        return None
    p = Path(model["path"]).expanduser()
    return base_dir / p if base_dir is not None and not p.is_absolute() else p


def _load(model: dict[str, Any], base_dir: Path | None, run_dir: Path | None = None, *,
          prompts: dict[str, Any] | None = None) -> Any:
    """The run's model; a pipeline's with the prompt set the run embedded (its run folder's cache: no encoder) and
    the run config's `prompts` table (read from the run folder unless given)."""
    from fewstep_search.models import loading

    kind = model["kind"]
    options = dict(model.get("options") or {})
    if kind == "pipeline" and run_dir is not None:
        from fewstep_search.models.t2i.prompts import cached_prompts
        from fewstep_search.models.t2i.setup import PROMPT_EMBEDDINGS_FILE
        from fewstep_search.rundir import RunDir

        cache = run_dir / PROMPT_EMBEDDINGS_FILE
        if prompts is None:
            prompts = (RunDir(run_dir).recorded_config() or {}).get("prompts") or {}
        options.update(conditions=cached_prompts(cache), prompt_embeddings=str(cache),
                       guidance_scale=float(prompts.get("guidance_scale", 1.0)))
    args = dict(path=model.get("path"), factory=model.get("factory"), options=options)
    return loading.load_model(kind, device="cpu", base_dir=base_dir, **args)


def model_info_of(model: dict[str, Any], base_dir: Path | None) -> Any:
    """What the run's model advertises; folder models from their scheduler config, without loading weights."""
    from fewstep_search.export import ModelInfo, model_info

    kind = model["kind"]
    if kind in _FAMILY_OF_KIND:
        return ModelInfo(family=_FAMILY_OF_KIND[kind])
    path = _model_path(model, base_dir)
    if kind == "diffusers" and path is not None:
        from fewstep_search.models.diffusers_adapter import find_layout, read_scheduler_config, vp_from_scheduler_config

        scheduler_file = find_layout(path)[1]
        return ModelInfo(family="vp", vp=vp_from_scheduler_config(read_scheduler_config(scheduler_file)))
    if kind == "pipeline" and path is not None:
        from fewstep_search.models.diffusers_adapter import vp_from_scheduler_config
        from fewstep_search.models.t2i.folder import read_pipeline_folder

        folder = read_pipeline_folder(path)
        if folder.family == "vp":
            return ModelInfo(family="vp", vp=vp_from_scheduler_config(folder.scheduler_config))
        return ModelInfo(family="flow", shift=float(folder.scheduler_config.get("shift", 1.0)),
                         scheduler_config=folder.scheduler_config)
    if kind == "flow" and path is not None:
        from fewstep_search.models.diffusers_adapter import read_scheduler_config
        from fewstep_search.models.flow import FLOW_SCHEDULER, find_flow_layout

        config = read_scheduler_config(find_flow_layout(path)[1])
        if config.get("_class_name") != FLOW_SCHEDULER:
            raise ValueError(f"{path}: the scheduler is a {config.get('_class_name')}, not a {FLOW_SCHEDULER}")
        return ModelInfo(family="flow", shift=float(config.get("shift", 1.0)), scheduler_config=config)
    return model_info(_load(model, base_dir))


def _statuses(args: argparse.Namespace) -> tuple[Any, str, list[Any]]:
    """(the kept pair with its family, the model kind, every format's status for this run), read once."""
    from fewstep_search import export

    pair = kept_pair(args)
    config = run_config(args.run_dir) if (args.run_dir / "config.json").is_file() else {"model": {"kind": "?"}}
    kind = str(config["model"].get("kind"))
    from fewstep_search.rundir import adapters_beside

    rows = export.format_statuses(pair.schedule, kind=kind, has_folder=kind in export.FOLDER_KINDS and
                                  bool(config["model"].get("path")),
                                  has_adapters=pair.weights is not None and adapters_beside(pair.weights) is not None)
    return pair, kind, rows


def refuse_unless_it_works(args: argparse.Namespace, rows: list[Any]) -> None:
    """One line naming why --format cannot honour this run's pair and the formats that can."""
    status = next(r for r in rows if r.name == args.format)
    if not status.works:
        working = ", ".join(r.name for r in rows if r.works) or "none"
        raise ValueError(f"--format {args.format}: {status.line}; this run exports as: {working}")


def listing(args: argparse.Namespace) -> str:
    """What `export RUN_DIR` without --format prints: every format, whether it works here, and the command."""
    pair, kind, rows = _statuses(args)
    schedule = pair.schedule
    lines = [f"{args.run_dir}: {schedule.nfe} steps, solver {schedule.solver}, {schedule.family} model ({kind})"]
    for row in rows:
        cmd = f"fewstep-search export {args.run_dir} --format {row.name}" + (
            " --out DIR" if row.name in FOLDER_FORMATS else "")
        lines.append(f"  {'yes' if row.works else 'no ':3}  {row.name:17} {row.line}")
        if row.works:
            lines.append(f"       {cmd}")
    lines.append(f"  ...  {'comfyui':17} the FewstepSigmas node (integrations/comfyui) reads "
                 f"{args.run_dir / 'best' / 'schedule.json'} and names ComfyUI's matching sampler")
    return "\n".join(lines) + "\n"


def render(args: argparse.Namespace) -> str | None:
    """The export's text (None for diffusers-folder, which writes a folder)."""
    from fewstep_search import export

    if args.format is None:
        if args.out is not None or args.mu is not None:
            raise ValueError("--out and --mu go with a --format; run `export RUN_DIR` alone to list the formats")
        return listing(args)
    pair, _, rows = _statuses(args)  # json / k-diffusion of a run that records its family need no config.json
    refuse_unless_it_works(args, rows)
    schedule, solver, family = pair.schedule, pair.solver, pair.schedule.family
    if args.format in FOLDER_FORMATS:
        config = run_config(args.run_dir)
        return _folder(args, pair, config, _base_dir(args, config))
    if args.format == "diffusers":
        config = run_config(args.run_dir)
        info = model_info_of(config["model"], _base_dir(args, config))
        if info.family != family:
            raise ValueError(f"--family {family} contradicts the model, which is {info.family}")
        return export.dumps(export.export_diffusers(schedule, info, solver=solver, mu=args.mu))
    if args.mu is not None:
        raise ValueError("--mu is for --format diffusers (a FlowMatch scheduler with dynamic shifting)")
    if args.format == "json":
        return export.dumps(export.export_json(schedule, family=family, solver=solver))
    return export.export_k_diffusion(schedule, family=family, solver=solver)


def _folder(args: argparse.Namespace, pair: Any, config: dict[str, Any], base_dir: Path | None) -> None:
    """Write the kept pair as a pipeline folder (the base model the study named, with the pair's weights), or a LoRA
    round's adapters in diffusers' LoRA format."""
    from fewstep_search.integrations.pipeline_folder import export_diffusers_folder, export_lora_folder
    from fewstep_search.rundir import adapters_beside

    model = config["model"]
    path = _model_path(model, base_dir)
    if args.out is None:
        raise ValueError(f"--format {args.format} writes a folder: pass --out DIR")
    den = _load(model, base_dir, args.run_dir, prompts=config.get("prompts") or {})
    if args.format == "lora":
        phase2 = config.get("phase2") or {}
        out = export_lora_folder(den, path, adapters_beside(pair.weights), args.out, rank=int(phase2["lora_rank"]),
                                 alpha=phase2.get("lora_alpha"))
        print(f"wrote {out}: round {pair.round}'s LoRA adapters; pipe.load_lora_weights({str(out)!r}) on the base "
              f"pipeline, then num_inference_steps={pair.schedule.nfe} with the exported scheduler")
        return None
    out = export_diffusers_folder(den, path, args.out, pair=pair)
    what = f"round {pair.round}'s fine-tuned weights" if pair.weights else "the untouched weights"
    print(f"wrote {out}: {what}, {pair.schedule.nfe} steps of {pair.solver} (FewstepScheduler)")
    from fewstep_search.denoiser import advertised

    guidance = advertised(den, "guidance")
    if guidance is not None:
        negative = (config.get("prompts") or {}).get("negative_prompt")
        also = "" if negative is None else f", negative_prompt={negative!r}"
        print(f"searched for guidance_scale={guidance.guidance_scale:g}{also}: call the pipeline with "
              f"num_inference_steps={pair.schedule.nfe} and these")
    return None


def run(args: argparse.Namespace) -> int:
    text = render(args)
    if text is None:
        return 0
    if args.out is None:
        print(text, end="")
    else:
        from fewstep_search.atomic import atomic_write_text

        if args.out.is_dir():
            raise ValueError(f"--out {args.out} is a folder; name a file")
        atomic_write_text(args.out, text)
        print(f"wrote {args.out}")
    return 0
