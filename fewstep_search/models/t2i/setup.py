"""From a study's `[model] kind = "pipeline"` and `[prompts]` to the options every process loads the denoiser with.

Runs once, in the driver, before any denoiser is loaded: every bad input of a text-to-image study (a folder that is
not a supported pipeline, a size the VAE cannot decode, a guidance scale the pipeline would not run as guidance, a
missing or empty prompt file) is refused here in one line, and the prompt set is embedded (or its cache reused).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fewstep_search.models.t2i.folder import read_pipeline_folder
from fewstep_search.models.t2i.guided import check_guidance
from fewstep_search.models.t2i.prompts import cached_prompt_embeddings, prompts_digest, read_prompt_file

__all__ = ["PROMPT_EMBEDDINGS_FILE", "default_prompt_cache", "pipeline_options"]

PROMPT_EMBEDDINGS_FILE = "prompt_embeddings.safetensors"


def default_prompt_cache(folder: Path, prompts: list[str], negative_prompt: str | None) -> Path:
    """Where a command without a run folder (`eval`) caches a prompt set's embeddings: the user's cache folder."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fewstep-search" / "prompt_embeddings"
    return base / f"{prompts_digest([str(folder.resolve()), *prompts], negative_prompt)}.safetensors"


def pipeline_options(path: str | Path, options: Mapping[str, Any], *, prompts_file: str | Path,
                     guidance_scale: float, negative_prompt: str | None, cache: Path | None,
                     device: str = "cpu", note: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The `[model] options` with the prompt set added (`conditions`, `guidance_scale`, `prompt_embeddings`).

    `cache` is the embeddings file (a run folder's `PROMPT_EMBEDDINGS_FILE`); None uses `default_prompt_cache`.
    """
    folder = read_pipeline_folder(path)
    folder.latent_shape(options.get("height"), options.get("width"))
    check_guidance(folder, guidance_scale)
    if negative_prompt is not None and not folder.uses_classifier_free_guidance:
        raise ValueError(f"prompts.negative_prompt: a {folder.denoiser_class} pipeline runs no unconditional branch; "
                         "leave it out")
    prompts = read_prompt_file(prompts_file)
    target = cache if cache is not None else default_prompt_cache(folder.root, prompts, negative_prompt)
    embeddings = cached_prompt_embeddings(target, folder, prompts, negative_prompt=negative_prompt,
                                          cfg=folder.runs_unconditional(guidance_scale), device=device, note=note)
    return {**options, "conditions": prompts, "guidance_scale": float(guidance_scale),
            "prompt_embeddings": str(embeddings)}
