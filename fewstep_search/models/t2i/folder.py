"""What a local text-to-image pipeline folder holds, read from its JSON files before any weight is loaded.

A diffusers pipeline folder (`save_pretrained`, or a local copy of a Hub repository) names its components in
`model_index.json`. The tool drives the denoiser of three families of them:

| denoiser class          | pipelines                     | family | latents the denoiser sees           |
|-------------------------|-------------------------------|--------|-------------------------------------|
| `UNet2DConditionModel`  | SD 1.x / 2.x, SDXL            | vp     | (C, H/f, W/f), f the VAE's factor   |
| `SD3Transformer2DModel` | SD3, SD3.5                    | flow   | (C, H/f, W/f), divisible by patches |
| `FluxTransformer2DModel`| Flux.1 (dev, schnell, ...)    | flow   | (C, H/f, W/f), packed in 2x2 tokens |

Everything that can be refused (no model_index.json, another denoiser class, a size the VAE cannot decode, a
scheduler of the wrong family) is refused here, in one line, before the network is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fewstep_search.models.diffusers_adapter import read_scheduler_config
from fewstep_search.models.errors import ModelLoadError
from fewstep_search.models.flow import read_json_object

__all__ = ["ARCHITECTURES", "PipelineFolder", "read_pipeline_folder"]

ARCHITECTURES = {
    "UNet2DConditionModel": "unet",
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
}
"""Denoiser class -> how the tool calls it (`fewstep_search.models.t2i.guided`)."""
_SUPPORTED = "UNet2DConditionModel (SD 1.x / 2.x, SDXL), SD3Transformer2DModel (SD3) and FluxTransformer2DModel (Flux)"
_DENOISER_SLOTS = ("unet", "transformer")


@dataclass(frozen=True)
class PipelineFolder:
    """The parts of a pipeline folder the tool needs (see the module docstring)."""

    root: Path
    pipeline_class: str
    denoiser_slot: str
    """`unet` or `transformer`: the denoiser's subfolder and the pipeline's component name."""
    denoiser_class: str
    denoiser_config: dict[str, Any]
    scheduler_config: dict[str, Any]
    vae_scale_factor: int

    @property
    def architecture(self) -> str:
        return ARCHITECTURES[self.denoiser_class]

    @property
    def family(self) -> str:
        return "vp" if self.architecture == "unet" else "flow"

    @property
    def uses_classifier_free_guidance(self) -> bool:
        """Whether the pipeline's guidance is a second, unconditional pass (False: Flux's guidance embedding)."""
        return self.architecture != "flux"

    def runs_unconditional(self, guidance_scale: float) -> bool:
        """Whether the pipeline computes the negative prompt's half at this scale: with classifier-free guidance
        above 1 (the pipelines skip it at 1 and below)."""
        return self.uses_classifier_free_guidance and guidance_scale > 1.0

    @property
    def guidance_embedded(self) -> bool:
        """A guidance-distilled model (Flux dev): the guidance scale is an input of the network."""
        return self.architecture == "flux" and bool(self.denoiser_config.get("guidance_embeds"))

    @property
    def latent_channels(self) -> int:
        channels = int(self.denoiser_config.get("in_channels", 4))
        return channels // 4 if self.architecture == "flux" else channels

    def latent_shape(self, height: int | None, width: int | None) -> tuple[int, int, int]:
        """(C, h, w) of the latents for an image of height x width pixels; one line when the size is missing or
        does not fit."""
        f = self.vae_scale_factor
        multiple = {"unet": f, "sd3": f * int(self.denoiser_config.get("patch_size", 1)), "flux": 2 * f}
        m = multiple[self.architecture]
        for what, size in (("height", height), ("width", width)):
            if size is None:
                raise ModelLoadError(f"model kind 'pipeline' needs options.{what}, the image {what} in pixels "
                                     "(e.g. options = { height = 512, width = 512 })")
            if not isinstance(size, int) or size <= 0:
                raise ModelLoadError(f"options.{what} must be a positive number of pixels, got {size!r}")
            if size % m:
                why = {"unet": "", "sd3": " times the patch size", "flux": " times the 2x2 packing"}[self.architecture]
                raise ModelLoadError(f"options.{what} = {size} is not divisible by {m} (the VAE's factor {f}{why}); "
                                     f"try {m * round(size / m) or m}")
        return (self.latent_channels, height // f, width // f)


def read_pipeline_folder(path: str | Path) -> PipelineFolder:
    """Read and check a local pipeline folder (its `model_index.json`, the denoiser's and VAE's configs, the
    scheduler config). Raises `ModelLoadError` with one line naming the file or the class."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ModelLoadError(f"pipeline folder {root} does not exist or is not a folder")
    index = read_json_object(root / "model_index.json", "pipeline index (a pipeline folder saved by diffusers has one)")
    slot = next((s for s in _DENOISER_SLOTS if isinstance(index.get(s), list) and index[s][-1]), None)
    if slot is None:
        raise ModelLoadError(f"{root}/model_index.json names no unet or transformer; kind 'pipeline' drives "
                             f"{_SUPPORTED}")
    cls = str(index[slot][-1])
    if cls not in ARCHITECTURES:
        raise ModelLoadError(f"{root}: the {index.get('_class_name', 'pipeline')}'s {slot} is a {cls}; kind 'pipeline' "
                             f"drives {_SUPPORTED}")
    denoiser_config = read_json_object(root / slot / "config.json", f"{slot} config")
    if denoiser_config.get("time_cond_proj_dim") is not None:
        raise ModelLoadError(f"{root}/{slot}: a UNet with a guidance embedding (time_cond_proj_dim, LCM-style) is "
                             "not driven; its pipeline skips classifier-free guidance")
    vae = read_json_object(root / "vae" / "config.json", "VAE config")
    factor = 2 ** (len(vae.get("block_out_channels", (0,) * 4)) - 1)
    scheduler_file = root / "scheduler" / "scheduler_config.json"
    scheduler = read_scheduler_config(scheduler_file) if scheduler_file.is_file() else None
    if scheduler is None:
        raise ModelLoadError(f"{root}: no scheduler/scheduler_config.json")
    folder = PipelineFolder(root=root, pipeline_class=str(index.get("_class_name", "")), denoiser_slot=slot,
                            denoiser_class=cls, denoiser_config=denoiser_config, scheduler_config=scheduler,
                            vae_scale_factor=factor)
    is_flow = "FlowMatch" in str(scheduler.get("_class_name", ""))
    if is_flow != (folder.family == "flow"):
        raise ModelLoadError(f"{scheduler_file}: a {cls} pipeline with a {scheduler.get('_class_name')} is not "
                             "a combination the tool knows")
    return folder
