"""Tiny text-to-image pipeline folders laid out like local copies of SD1.5, SDXL, SD3 and Flux (no downloads).

Every component is a diffusers or transformers class with a tiny config and seeded random weights; the tokenizers
are built from a small vocabulary written here (characters, so any lower-case prompt tokenizes). Each folder is
saved with `save_pretrained`, exactly as a user's local copy is laid out, and samples at 16 x 16 pixels
(8 x 8 latents).
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path
from typing import Any

import torch

MAX_TOKENS = 16
PIXELS = 16


def _perturb(module: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """diffusers zero-initialises output layers; perturb every weight so outputs depend on inputs and prompts."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module.eval()


CHARS = string.ascii_lowercase + string.digits + ".,!?'-"


def clip_tokenizer() -> Any:
    """A CLIP BPE tokenizer over single characters (no merges): every lower-case word is a token sequence. Built
    from files written here (vocab.json, merges.txt), which every transformers version reads."""
    from transformers import CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(specials + list(CHARS) + [c + "</w>" for c in CHARS])}
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.json").write_text(json.dumps(vocab))
        (Path(d) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(str(Path(d) / "vocab.json"), str(Path(d) / "merges.txt"), model_max_length=MAX_TOKENS)


def t5_tokenizer() -> Any:
    """A T5 unigram tokenizer over single characters, from a tokenizer.json written here with `tokenizers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [(c, -3.0) for c in CHARS]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    with tempfile.TemporaryDirectory() as d:
        tok.save(str(Path(d) / "tokenizer.json"))
        return T5TokenizerFast(tokenizer_file=str(Path(d) / "tokenizer.json"), extra_ids=0, pad_token="<pad>",
                               eos_token="</s>", unk_token="<unk>", model_max_length=MAX_TOKENS)


def _clip_config(hidden: int, projection: int | None = None) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden,
                          intermediate_size=2 * hidden, num_attention_heads=2, num_hidden_layers=2, vocab_size=80,
                          max_position_embeddings=MAX_TOKENS, projection_dim=projection or hidden, hidden_act="gelu")


def _clip(hidden: int, *, projection: int | None = None) -> Any:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if projection is not None else CLIPTextModel
    return _perturb(cls(_clip_config(hidden, projection)), 0.0)


def _t5(d_model: int) -> Any:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=48, d_model=d_model, d_ff=2 * d_model, d_kv=8, num_layers=1, num_heads=2,
                                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0)).eval()


def _vae(latent_channels: int = 4, **extra: Any) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=4, sample_size=PIXELS, **extra).eval()


def _sd_unet(*, cross_attention_dim: int, **extra: Any) -> Any:
    from diffusers import UNet2DConditionModel

    return _perturb(UNet2DConditionModel(
        sample_size=PIXELS // 2, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, norm_num_groups=4, attention_head_dim=2, **extra))


def _vp_scheduler(cls_name: str = "PNDMScheduler", **extra: Any) -> Any:
    import diffusers

    settings = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}
    if cls_name == "PNDMScheduler":
        settings.update(skip_prk_steps=True, steps_offset=1)
    return getattr(diffusers, cls_name)(**settings, **extra)


def save_sd15(folder: Path, *, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """An SD1.5-style `StableDiffusionPipeline` folder (UNet2DConditionModel, CLIP text encoder, PNDM)."""
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline(
        vae=_vae(), text_encoder=_clip(16), tokenizer=clip_tokenizer(), unet=_sd_unet(cross_attention_dim=16),
        scheduler=_vp_scheduler(prediction_type=prediction_type), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def save_sdxl(folder: Path, *, seed: int = 0) -> Path:
    """An SDXL-style folder: two CLIP encoders (the second with a projection), added text/time conditions."""
    from diffusers import StableDiffusionXLPipeline

    torch.manual_seed(seed)
    unet = _sd_unet(cross_attention_dim=32, addition_embed_type="text_time", addition_time_embed_dim=8,
                    projection_class_embeddings_input_dim=6 * 8 + 16, transformer_layers_per_block=1)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=_clip(16), text_encoder_2=_clip(16, projection=16), tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(), unet=unet, scheduler=_vp_scheduler("EulerDiscreteScheduler"))
    pipe.save_pretrained(folder)
    return folder


def save_sd3(folder: Path, *, seed: int = 0) -> Path:
    """An SD3-style folder: SD3Transformer2DModel, three text encoders (two CLIP, T5), FlowMatch scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = _perturb(SD3Transformer2DModel(
        sample_size=PIXELS // 2, patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
        pos_embed_max_size=16))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(shift_factor=0.06, scaling_factor=1.5, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=_clip(16, projection=16), tokenizer=clip_tokenizer(),
        text_encoder_2=_clip(16, projection=16), tokenizer_2=clip_tokenizer(),
        text_encoder_3=_t5(32), tokenizer_3=t5_tokenizer())
    pipe.save_pretrained(folder)
    return folder


def save_flux(folder: Path, *, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """A Flux-style folder: FluxTransformer2DModel on packed latents, CLIP + T5, the guidance embedding."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = _perturb(FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 4, 8),
        guidance_embeds=guidance_embeds))
    pipe = FluxPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True),
        vae=_vae(shift_factor=0.06, scaling_factor=1.5, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=_clip(16), tokenizer=clip_tokenizer(), text_encoder_2=_t5(32), tokenizer_2=t5_tokenizer())
    pipe.save_pretrained(folder)
    return folder


SAVERS = {"sd15": save_sd15, "sdxl": save_sdxl, "sd3": save_sd3, "flux": save_flux}
