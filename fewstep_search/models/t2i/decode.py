"""Latents to pictures with the pipeline's own VAE (for the run's sample grid)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from fewstep_search.models.errors import ModelLoadError

__all__ = ["vae_decoder"]


def vae_decoder(root: str | Path, *, device: str | torch.device = "cpu") -> Callable[[Tensor], Tensor]:
    """A function from latents [B, C, h, w] (what the tool samples) to images [B, 3, H, W] in [-1, 1], decoded as
    the pipelines decode: `vae.decode(latents / scaling_factor + shift_factor)` (SD3 and Flux have a shift)."""
    from diffusers import AutoencoderKL

    path = Path(root) / "vae"
    try:
        vae = AutoencoderKL.from_pretrained(path, local_files_only=True).to(device).eval()
    except Exception as e:  # diffusers / safetensors raise many types; keep the cause chained
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"could not load the VAE in {path}: {reason}") from e
    scale = float(vae.config.get("scaling_factor") or 1.0)
    shift = float(vae.config.get("shift_factor") or 0.0)

    def decode(latents: Tensor) -> Tensor:
        with torch.no_grad():
            z = latents.to(device=device, dtype=vae.dtype) / scale + shift
            return vae.decode(z, return_dict=False)[0].float().clamp(-1.0, 1.0).cpu()

    return decode
