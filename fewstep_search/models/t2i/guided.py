"""The guided denoiser of a text-to-image pipeline: `D(x, sigma, prompt index)`, computed as the pipeline computes it.

A pipeline with classifier-free guidance calls its network once per step on a batch of two halves, the negative
prompt's and the prompt's, and combines the outputs as `u + g (c - u)` before its scheduler steps. That output map
is affine in the network output with weights summing to one, so the guided posterior mean is the same combination
of the two posterior means: the ODE a user samples is the ODE of this denoiser. The tool's bank, search and
Phase-2 therefore all work on the guided model, exactly as the pipeline runs it, batch layout included:

* SD 1.x / 2.x: `unet(x_t, t, encoder_hidden_states)`; SDXL adds `added_cond_kwargs` (the pooled text embeds
  and the time ids `(H, W, 0, 0, H, W)` the pipeline builds from the image size);
* SD3: `transformer(hidden_states, timestep, encoder_hidden_states, pooled_projections)`;
* Flux: the latents are packed into 2x2 tokens with their image ids, the timestep is t (not 1000 t), and a
  guidance-distilled model gets the guidance scale as its `guidance` input instead of a second pass.

The prompt embeddings are non-persistent buffers: a checkpoint of the denoiser holds the network's weights only.
At `guidance_scale = 1` the pipelines run the conditional half alone, and so does this denoiser.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fewstep_search.models.diffusers_adapter import DiffusersUNetDenoiser, vp_from_scheduler_config
from fewstep_search.models.errors import ModelLoadError
from fewstep_search.models.flow import FlowMatchDenoiser, trained_t_range
from fewstep_search.models.t2i.folder import PipelineFolder, read_pipeline_folder
from fewstep_search.models.t2i.prompts import PromptEmbeddings, load_prompt_embeddings

__all__ = ["PromptGuidance", "GuidedUNetDenoiser", "GuidedFlowDenoiser", "load_pipeline_denoiser",
           "check_guidance"]

Network = Callable[[Tensor, Tensor, dict[str, Tensor]], Tensor]
"""(model input [B, ...], timesteps [B], the batch's text conditions) -> network output [B, ...]."""


def check_guidance(folder: PipelineFolder, guidance_scale: float) -> None:
    """One line for a guidance scale the pipeline would not run as classifier-free guidance."""
    if folder.uses_classifier_free_guidance and guidance_scale < 1.0:
        raise ValueError(
            f"prompts.guidance_scale = {guidance_scale:g}: below 1 the {folder.pipeline_class or 'pipeline'} skips the "
            "unconditional branch and samples the conditional model alone; use 1 for that, or a scale above 1")
    if not guidance_scale >= 0:
        raise ValueError(f"prompts.guidance_scale must be >= 0, got {guidance_scale}")


class PromptGuidance(nn.Module):
    """The prompt set's embeddings (non-persistent buffers) and the guidance that combines the two halves."""

    def __init__(self, embeddings: PromptEmbeddings, guidance_scale: float, *, cfg: bool) -> None:
        """`cfg`: whether the pipeline runs the negative prompt's half (`PipelineFolder.runs_unconditional`)."""
        super().__init__()
        self.guidance_scale = float(guidance_scale)
        self.cfg = bool(cfg)
        if self.cfg and embeddings.negative_embeds is None:
            raise ModelLoadError("the prompt embeddings hold no negative prompt, which guidance above 1 needs")
        for name, value in embeddings.tensors().items():
            self.register_buffer(name, value, persistent=False)
        self.names = tuple(embeddings.tensors())

    def _conditions(self, cond: Tensor, dtype: torch.dtype, negative: bool) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for key in ("embeds", "pooled"):
            src = getattr(self, f"negative_{key}" if negative else key, None)
            if src is not None:
                out[key] = (src.expand(cond.shape[0], *src.shape[1:]) if negative else src[cond]).to(dtype)
        if "text_ids" in self.names:
            out["text_ids"] = self.text_ids.to(dtype)
        return out

    def forward(self, network: Network, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """The guided output: the conditional half alone, or both halves in one batch (negative first, as the
        pipelines order them) combined as `u + g (c - u)` in the network's dtype."""
        cond = cond.to(device=self.embeds.device, dtype=torch.long)
        positive = self._conditions(cond, x.dtype, negative=False)
        if not self.cfg:
            return network(x, t, positive)
        negative = self._conditions(cond, x.dtype, negative=True)
        both = {k: torch.cat([negative[k], positive[k]]) if k != "text_ids" else positive[k] for k in positive}
        out = network(torch.cat([x, x]), torch.cat([t, t]), both)
        uncond, text = out.chunk(2)
        return uncond + self.guidance_scale * (text - uncond)


# The calls take the network as an argument, read from the denoiser at each call (never captured in a closure): a
# deep copy of the denoiser (a Phase-2 student) then calls its own copy of the network.


def _unet_call(unet: nn.Module, time_ids: Tensor | None, x: Tensor, t: Tensor, text: dict[str, Tensor]) -> Tensor:
    added = None
    if time_ids is not None:  # SDXL: pooled text embeds and the size conditions
        added = {"text_embeds": text["pooled"], "time_ids": time_ids.to(x).expand(x.shape[0], -1)}
    return unet(x, t, encoder_hidden_states=text["embeds"], added_cond_kwargs=added, return_dict=False)[0]


def _sd3_call(transformer: nn.Module, x: Tensor, t: Tensor, text: dict[str, Tensor]) -> Tensor:
    return transformer(hidden_states=x, timestep=t, encoder_hidden_states=text["embeds"],
                       pooled_projections=text["pooled"], return_dict=False)[0]


def _flux_call(transformer: nn.Module, guidance: float | None, x: Tensor, t: Tensor, text: dict[str, Tensor]
               ) -> Tensor:
    """Flux packs (C, h, w) latents into (h/2 * w/2) tokens of 4C channels; the pipeline's own static helpers pack
    and index them, and the velocity is unpacked back, so the rest of the tool sees ordinary latents."""
    from diffusers import FluxPipeline

    b, c, h, w = x.shape
    packed = FluxPipeline._pack_latents(x, b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
    g = None if guidance is None else torch.full((b,), guidance, device=x.device, dtype=torch.float32)
    v = transformer(hidden_states=packed, timestep=t / 1000, guidance=g, pooled_projections=text["pooled"],
                    encoder_hidden_states=text["embeds"], txt_ids=text["text_ids"], img_ids=img_ids,
                    return_dict=False)[0]
    return v.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def _attach_prompts(den: nn.Module, folder: PipelineFolder, guidance: PromptGuidance, prompts: tuple[str, ...]
                    ) -> None:
    """What both guided denoisers advertise: the prompts as conditions (split by prompt in banks), the folder (its
    VAE decodes pictures), and the guidance module."""
    den.guidance = guidance
    den.conditions = prompts
    den.split_conditions = True
    den.pipeline_root = str(folder.root)


class GuidedUNetDenoiser(DiffusersUNetDenoiser):
    """A text-to-image UNet (SD 1.x / 2.x, SDXL) with its prompt set and guidance: `D(x, sigma, prompt index)`."""

    def __init__(self, unet: nn.Module, folder: PipelineFolder, guidance: PromptGuidance, *, prompts: tuple[str, ...],
                 shape: tuple[int, int, int], pixels: tuple[int, int], timestep_mode: str = "interpolate") -> None:
        config = folder.scheduler_config
        super().__init__(unet, vp_from_scheduler_config(config, source=folder.root / "scheduler"),
                         prediction_type=str(config.get("prediction_type", "epsilon")), timestep_mode=timestep_mode,
                         name=str(folder.root))
        _attach_prompts(self, folder, guidance, prompts)
        self.shape = shape
        sdxl = folder.denoiser_config.get("addition_embed_type") == "text_time"
        time_ids = torch.tensor([[*pixels, 0, 0, *pixels]], dtype=torch.float32) if sdxl else None
        self.register_buffer("time_ids", time_ids, persistent=False)

    def network_output(self, x_t: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        if cond is None:
            raise ValueError(f"{self.name} is a text-to-image model: its calls need prompt indices")
        return self.guidance(lambda x, s, text: _unet_call(self.unet, self.time_ids, x, s, text), x_t, t, cond)


class GuidedFlowDenoiser(FlowMatchDenoiser):
    """A text-to-image flow transformer (SD3, Flux) with its prompt set and guidance: `D(x, sigma, prompt index)`."""

    def __init__(self, transformer: nn.Module, folder: PipelineFolder, guidance: PromptGuidance, *,
                 prompts: tuple[str, ...], shape: tuple[int, int, int]) -> None:
        config = folder.scheduler_config
        n_train = int(config.get("num_train_timesteps", 1000))
        lo, hi = trained_t_range(n_train)
        super().__init__(transformer, t_min=lo, t_max=hi, shift=float(config.get("shift", 1.0)),
                         timestep_scale=float(n_train), shape=shape, scheduler_config=config, name=str(folder.root))
        _attach_prompts(self, folder, guidance, prompts)
        self.flux = folder.architecture == "flux"
        self.embedded_guidance = guidance.guidance_scale if folder.guidance_embedded else None

    def velocity(self, x_t: Tensor, t_model: Tensor, cond: Tensor | None) -> Tensor:
        if cond is None:
            raise ValueError(f"{self.name} is a text-to-image model: its calls need prompt indices")
        if self.flux:
            return self.guidance(lambda x, t, text: _flux_call(self.model, self.embedded_guidance, x, t, text),
                                 x_t, t_model, cond)
        return self.guidance(lambda x, t, text: _sd3_call(self.model, x, t, text), x_t, t_model, cond)


def _load_network(folder: PipelineFolder, *, device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    import diffusers

    cls = getattr(diffusers, folder.denoiser_class)
    path = folder.root / folder.denoiser_slot
    try:
        net = cls.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
    except Exception as e:  # diffusers / safetensors raise many types; keep the cause chained
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"could not load a {folder.denoiser_class} from {path}: {reason}") from e
    return net.to(device).eval().requires_grad_(False)


def load_pipeline_denoiser(path: str | Path, embeddings: str | Path | PromptEmbeddings, *, prompts: list[str],
                           guidance_scale: float, height: int | None, width: int | None,
                           device: str | torch.device = "cpu",
                           dtype: torch.dtype = torch.float32, timestep_mode: str = "interpolate") -> nn.Module:
    """The guided denoiser of a local pipeline folder for a prompt set already embedded (`cached_prompt_embeddings`).

    Loads only the denoiser network (no text encoder, no VAE). Raises `ModelLoadError` with one line."""
    folder = read_pipeline_folder(path)
    check_guidance(folder, guidance_scale)
    shape = folder.latent_shape(height, width)
    emb = embeddings if isinstance(embeddings, PromptEmbeddings) else load_prompt_embeddings(embeddings)
    if len(emb) != len(prompts):
        raise ModelLoadError(f"the prompt embeddings hold {len(emb)} prompts, the prompt set {len(prompts)}")
    guidance = PromptGuidance(emb, guidance_scale, cfg=folder.runs_unconditional(guidance_scale))
    net = _load_network(folder, device=device, dtype=dtype)
    den: Any
    if folder.family == "vp":
        den = GuidedUNetDenoiser(net, folder, guidance, prompts=tuple(prompts), shape=shape, pixels=(height, width),
                                 timestep_mode=timestep_mode)
    else:
        den = GuidedFlowDenoiser(net, folder, guidance, prompts=tuple(prompts), shape=shape)
    return den.to(device)
