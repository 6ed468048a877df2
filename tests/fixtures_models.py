"""Tiny models saved to temporary folders, for adapter and loading tests (no network, no downloads).

A tiny diffusers `UNet2DModel` (1 channel, 8x8, channels (8, 16), one layer per block: ~40k parameters, a
few ms per call on CPU) is created with a fixed seed and saved in one of the two layouts the diffusers
adapter reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

TINY_SHAPE = (1, 8, 8)
SCHEDULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "timestep_spacing": "leading",
}


def tiny_unet(*, seed: int = 0, out_channels: int = 1) -> torch.nn.Module:
    """A seeded, randomly initialized tiny UNet2DModel (float32)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=TINY_SHAPE[1],
        in_channels=TINY_SHAPE[0],
        out_channels=out_channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    # The default init leaves the output conv near zero; perturb every weight so outputs depend on x and t.
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet.eval()


def ddim_scheduler(**overrides: Any) -> Any:
    """A diffusers DDIMScheduler with the test defaults (eta-0 DDIM, no clipping, final alpha 1)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**{**SCHEDULER_DEFAULTS, **overrides})


def save_model(
    root: Path,
    *,
    layout: str = "pipeline",
    seed: int = 0,
    scheduler: dict[str, Any] | None = None,
    out_channels: int = 1,
) -> Path:
    """Save a tiny UNet and a scheduler config under `root`; returns `root`.

    layout "pipeline": `root/unet/` + `root/scheduler/scheduler_config.json` (what `pipeline.save_pretrained`
    writes); "model": the UNet files in `root` with `root/scheduler_config.json` beside them.
    """
    unet = tiny_unet(seed=seed, out_channels=out_channels)
    unet_dir = root / "unet" if layout == "pipeline" else root
    unet.save_pretrained(unet_dir)
    sched_dir = root / "scheduler" if layout == "pipeline" else root
    sched_dir.mkdir(parents=True, exist_ok=True)
    ddim_scheduler().save_config(sched_dir)
    config_file = sched_dir / "scheduler_config.json"
    config = {
        **json.loads(config_file.read_text()),
        **(scheduler or {}),
    }  # overrides may be invalid on purpose
    config_file.write_text(json.dumps(config))
    return root
