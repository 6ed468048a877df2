"""Prompt sets: read once, embedded once by the pipeline's own `encode_prompt`, cached as safetensors.

Why once: a pipeline's text encoders (T5-XXL alone is 9 GB) are needed only to turn prompts into embeddings. The
driver embeds the whole prompt set with the pipeline's own `encode_prompt` (so tokenization, clip skip, the
projection and padding are exactly the pipeline's), writes the tensors to the run folder, and every process that
later loads the denoiser (trials, Phase-2 workers, a resumed run) reads that file and never loads an encoder.

The file is keyed by what determines its contents (the folder, the pipeline class, the prompts, the negative
prompt and whether an unconditional branch is needed); a cache that does not match is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from fewstep_search.atomic import atomic_path
from fewstep_search.models.errors import ModelLoadError
from fewstep_search.models.t2i.folder import PipelineFolder

__all__ = ["PromptEmbeddings", "read_prompt_file", "encode_prompts", "cached_prompt_embeddings", "cached_prompts",
           "load_prompt_embeddings", "prompts_digest"]

_ENCODE_BATCH = 16


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt a line (blank lines skipped); a missing, unreadable or empty file is a one-line ValueError."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"prompts.file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"prompts.file {p} cannot be read: {e}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts.file {p} holds no prompts (one prompt a line)")
    return prompts


def prompts_digest(prompts: list[str], negative_prompt: str | None) -> str:
    """A short content hash of a prompt set and its negative prompt (run identities, cache keys)."""
    blob = json.dumps({"prompts": prompts, "negative": negative_prompt}, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class PromptEmbeddings:
    """What the denoiser needs of each prompt, in the pipeline's own layout.

    `embeds` [P, L, D] (the text encoders' sequence output), `pooled` [P, D'] (SDXL, SD3, Flux), `text_ids`
    [L, 3] (Flux's token positions); the negative prompt's `negative_embeds` / `negative_pooled` [1, ...] where the
    pipeline runs an unconditional branch (one negative prompt serves every prompt).
    """

    embeds: Tensor
    pooled: Tensor | None = None
    negative_embeds: Tensor | None = None
    negative_pooled: Tensor | None = None
    text_ids: Tensor | None = None

    def tensors(self) -> dict[str, Tensor]:
        return {k: v.contiguous().cpu() for k, v in vars(self).items() if v is not None}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> PromptEmbeddings:
        return cls(**{k: tensors.get(k) for k in ("embeds", "pooled", "negative_embeds", "negative_pooled",
                                                     "text_ids")})  # type: ignore[arg-type]

    def __len__(self) -> int:
        return int(self.embeds.shape[0])


def _load_text_pipeline(folder: PipelineFolder, device: str | torch.device):
    """The folder's pipeline without its denoiser and VAE (only the text encoders are needed here)."""
    try:
        from diffusers import DiffusionPipeline
    except ImportError as e:
        raise ModelLoadError("kind 'pipeline' needs diffusers and transformers: pip install "
                             "'fewstep-search[pipelines]'") from e
    try:
        pipe = DiffusionPipeline.from_pretrained(folder.root, local_files_only=True,
                                                 **{folder.denoiser_slot: None, "vae": None})
    except Exception:  # older diffusers' pipelines need every component at construction: load them all, once
        try:
            pipe = DiffusionPipeline.from_pretrained(folder.root, local_files_only=True)
        except Exception as e:  # diffusers / transformers raise many types; keep the cause chained
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelLoadError(f"could not load the text encoders of {folder.root}: {reason}") from e
    return pipe.to(device)


def _encode_batch(pipe, folder: PipelineFolder, prompts: list[str], negative: str | None, cfg: bool,
                  device: str | torch.device) -> dict[str, Tensor | None]:
    """One call of the pipeline's own `encode_prompt`, mapped to `PromptEmbeddings`' fields."""
    n = len(prompts)
    neg = None if negative is None else [negative] * n
    arch = folder.architecture
    if arch == "flux":
        embeds, pooled, text_ids = pipe.encode_prompt(prompts, prompt_2=None, device=device)
        return {"embeds": embeds, "pooled": pooled, "text_ids": text_ids}
    if arch == "sd3":
        embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
            prompts, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=cfg,
            negative_prompt=neg)
    elif folder.pipeline_class.startswith("StableDiffusionXL") or hasattr(pipe, "text_encoder_2"):
        embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
            prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=cfg, negative_prompt=neg)
    else:
        embeds, neg_embeds = pipe.encode_prompt(prompts, device, 1, cfg, negative_prompt=neg)
        pooled = neg_pooled = None
    return {"embeds": embeds, "pooled": pooled, "negative_embeds": neg_embeds if cfg else None,
            "negative_pooled": neg_pooled if cfg else None}


def encode_prompts(folder: PipelineFolder, prompts: list[str], *, negative_prompt: str | None, cfg: bool,
                   device: str | torch.device = "cpu") -> PromptEmbeddings:
    """Embed `prompts` (and the negative prompt when `cfg`) with the pipeline's own `encode_prompt`, in batches."""
    pipe = _load_text_pipeline(folder, device)
    parts: list[dict[str, Tensor | None]] = []
    with torch.no_grad():
        for lo in range(0, len(prompts), _ENCODE_BATCH):
            parts.append(_encode_batch(pipe, folder, prompts[lo:lo + _ENCODE_BATCH], negative_prompt, cfg, device))
    first = parts[0]

    def cat(key: str) -> Tensor | None:
        return None if first.get(key) is None else torch.cat([p[key] for p in parts]).cpu()  # type: ignore[misc]

    def one(key: str) -> Tensor | None:  # one negative prompt (or one token-position table) serves all prompts
        value = first.get(key)
        return None if value is None else value[:1].cpu() if key != "text_ids" else value.cpu()

    return PromptEmbeddings(embeds=cat("embeds"), pooled=cat("pooled"),  # type: ignore[arg-type]
                            negative_embeds=one("negative_embeds"), negative_pooled=one("negative_pooled"),
                            text_ids=one("text_ids"))


def cached_prompt_embeddings(cache: str | Path, folder: PipelineFolder, prompts: list[str], *,
                             negative_prompt: str | None, cfg: bool, device: str | torch.device = "cpu",
                             note: Callable[[str], None] | None = None) -> Path:
    """The safetensors file `cache`, (re)built with `encode_prompts` unless it holds this prompt set's embeddings.

    Returns the path; the file's metadata records its key (module docstring) and the prompts themselves."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = Path(cache)
    key = json.dumps({"folder": str(folder.root.resolve()), "pipeline": folder.pipeline_class,
                      "prompts": prompts_digest(prompts, negative_prompt), "cfg": bool(cfg)}, sort_keys=True)
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("key") == key:
                    return path
        except Exception:  # a truncated or foreign file is rebuilt below
            pass
        if note is not None:
            note(f"the cached prompt embeddings {path.name} are for another prompt set; embedding again")
    embeddings = encode_prompts(folder, prompts, negative_prompt=negative_prompt, cfg=cfg, device=device)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(embeddings.tensors(), str(tmp), metadata={"key": key, "prompts": json.dumps(prompts)})
    return path


def cached_prompts(path: str | Path) -> list[str]:
    """The prompt set a cache file was written for (its metadata), for commands that reload a run's model."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(json.loads((f.metadata() or {})["prompts"]))
    except Exception as e:  # missing file, foreign file, no metadata
        raise ModelLoadError(f"cannot read the prompt set of {path}: {e}") from e


def load_prompt_embeddings(path: str | Path) -> PromptEmbeddings:
    """Read a file written by `cached_prompt_embeddings` (one-line ValueError when it cannot be read)."""
    from safetensors.torch import load_file

    try:
        return PromptEmbeddings.from_tensors(load_file(str(path)))
    except Exception as e:  # safetensors raises several types
        raise ModelLoadError(f"cannot read the prompt embeddings {path}: {e}") from e
