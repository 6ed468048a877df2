"""A diffusers `UNet2DModel` (a discrete-time VP model) as an EDM-convention `Denoiser`.

The map (docs/design.md section 1): the VP model sees `x_t = alpha_t x0 + sigma_t eps` with
`alpha_t^2 + sigma_t^2 = 1`. With `x~ = x_t / alpha_t` and `sigma~ = sigma_t / alpha_t` this is exactly
`x~ = x0 + sigma~ eps`, so

    alpha = 1 / sqrt(1 + sigma~^2),   x_t = alpha x~,   t = DiscreteVP.t(sigma~)   (fractional or nearest),

and the network output turns into the posterior mean of x0 by the prediction type:

    epsilon:       D = (x_t - sigma_t eps) / alpha          = x~ - sigma~ eps
    v_prediction:  D = alpha x_t - sigma_t v                 = alpha^2 x~ - sigma~ alpha v
    sample:        D = the output itself.

(k-diffusion's `DiscreteEpsDDPMDenoiser` / `DiscreteVDDPMDenoiser` use the same coefficients.) The input
scaling is exact for every sigma~; only the timestep is approximate between trained timesteps (interpolated by
default) and clamped outside the trained range, which the adapter advertises as `sigma_min` / `sigma_max`.

diffusers is imported only inside `from_pretrained`, so importing this module stays cheap.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fewstep_search.models.errors import ModelLoadError
from fewstep_search.noise import DiscreteVP, ddpm_alphas_cumprod

__all__ = [
    "PREDICTION_TYPES",
    "TIMESTEP_MODES",
    "DiffusersUNetDenoiser",
    "find_layout",
    "read_scheduler_config",
    "FEWSTEP_SCHEDULER",
    "BASE_CONFIG_KEY",
    "vp_from_scheduler_config",
    "vp_output_to_x0",
]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_MODES = ("interpolate", "nearest")
_SCHEDULER_CONFIG = "scheduler_config.json"
# out_channels = 2 x in_channels with one of these scheduler variance types: the second half is a variance.
_LEARNED_VARIANCE = ("learned", "learned_range")


def find_layout(root: Path) -> tuple[Path, Path]:
    """(UNet folder, scheduler config file) of a local diffusers folder.

    Two layouts are accepted: a pipeline folder (`root/unet/` + `root/scheduler/scheduler_config.json`) or a
    model folder (`root/config.json` + weights, with `root/scheduler_config.json` beside them; a `scheduler/`
    subfolder also works). The first existing candidate wins, in that order.
    """
    if not root.exists():
        raise ModelLoadError(f"diffusers model folder {root} does not exist")
    if not root.is_dir():
        raise ModelLoadError(
            f"diffusers model path {root} is not a folder (expected a saved pipeline or UNet)"
        )
    unet_dir = root / "unet" if (root / "unet").is_dir() else root
    if not (unet_dir / "config.json").is_file():
        raise ModelLoadError(f"no UNet config.json in {unet_dir} (expected a UNet2DModel saved by diffusers)")
    candidates = (root / "scheduler" / _SCHEDULER_CONFIG, root / _SCHEDULER_CONFIG)
    for cand in candidates:
        if cand.is_file():
            return unet_dir, cand
    raise ModelLoadError(
        f"no scheduler config in {root}: expected scheduler/{_SCHEDULER_CONFIG} or {_SCHEDULER_CONFIG}"
    )


FEWSTEP_SCHEDULER = "FewstepScheduler"
"""The `_class_name` of an exported folder's scheduler (`fewstep_search.integrations.diffusers_scheduler`); its
config keeps the model's own scheduler config under `BASE_CONFIG_KEY`."""
BASE_CONFIG_KEY = "base_config"


def read_scheduler_config(path: Path) -> dict[str, Any]:
    """The JSON object in a `scheduler_config.json`, with a clear error naming the file.

    An exported folder's `FewstepScheduler` config stands for the model's own scheduler config, which it keeps:
    that one is returned, so a fine-tuned export loads as a model again (its noise schedule, shift, ...).
    """
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read scheduler config {path}: {e}") from e
    if not isinstance(config, dict):
        raise ModelLoadError(f"scheduler config {path} is not a JSON object")
    if config.get("_class_name") == FEWSTEP_SCHEDULER:
        base = config.get(BASE_CONFIG_KEY)
        if not isinstance(base, dict):
            raise ModelLoadError(f"{path}: a {FEWSTEP_SCHEDULER} config without the model's own ({BASE_CONFIG_KEY})")
        return base
    return config


def vp_from_scheduler_config(
    config: dict[str, Any], *, source: Path | str = "scheduler config"
) -> DiscreteVP:
    """The trained `alphas_cumprod` table of a DDPM-family scheduler config (DDPM, DDIM, PNDM, Euler, ...).

    Uses `trained_betas` when present, otherwise `noise.ddpm_alphas_cumprod` (computed in float64; diffusers
    computes the same table in float32, within ~1e-6 relative). VE / EDM schedulers (no beta schedule) and
    zero-terminal-SNR tables (`sigma_max` would be infinite) are refused.
    """
    if "beta_schedule" not in config and config.get("trained_betas") is None:
        kind = config.get("_class_name", "unknown class")
        raise ModelLoadError(
            f"scheduler config {source} has no beta_schedule: not a VP (DDPM-family) scheduler ({kind})"
        )
    if config.get("rescale_betas_zero_snr"):
        raise ModelLoadError(
            f"scheduler config {source}: rescale_betas_zero_snr (sigma_max = inf) is not supported"
        )
    try:
        if config.get("trained_betas") is not None:
            betas = np.asarray(config["trained_betas"], dtype=np.float64)
            return DiscreteVP(np.cumprod(1.0 - betas))
        table = ddpm_alphas_cumprod(
            int(config.get("num_train_timesteps", 1000)),
            beta_start=float(config.get("beta_start", 1e-4)),
            beta_end=float(config.get("beta_end", 0.02)),
            beta_schedule=str(config["beta_schedule"]),
        )
        return DiscreteVP(table)
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"unsupported noise schedule in {source}: {e}") from e


def vp_output_to_x0(out: Tensor, *, x: Tensor, sigma: Tensor, prediction_type: str) -> Tensor:
    """Posterior mean `D(x~, sigma~)` from a VP network output (see the module docstring for the equations).

    `x` is the EDM-convention input x~ [B, *shape], `sigma` is sigma~ [B]; all three in the same dtype.
    """
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    if prediction_type == "epsilon":
        return x - s * out
    if prediction_type == "v_prediction":
        alpha2 = 1.0 / (1.0 + s**2)
        return alpha2 * x - s * alpha2.sqrt() * out
    return out  # sample


class DiffusersUNetDenoiser(nn.Module):
    """`D(x~, sigma~)` of a diffusers `UNet2DModel` trained as a discrete VP model (epsilon, v or sample).

    Advertises `sigma_min` / `sigma_max` (the trained table's ends, in the EDM sigma~), `prediction_type`,
    `shape` ((C, H, W) from the UNet config) and `vp` (the `DiscreteVP` table, for exporting schedules as
    timesteps). Accepts float32 or float64 input: the coefficients are applied in float64, the network runs in
    its own dtype, and the output has x's dtype and device.
    Differentiable in x and sigma (with `timestep_mode="interpolate"`, also through the timestep embedding).
    The weights are frozen on load; call `denoiser.unet.requires_grad_(True)` to fine-tune.

    Scheduler options that belong to a sampler, not to the model (`clip_sample`, `thresholding`,
    `timestep_spacing`), are ignored: the denoiser is the raw network.

    Example:
        >>> den = DiffusersUNetDenoiser.from_pretrained("path/to/ddpm-folder")  # doctest: +SKIP
        >>> s = torch.full((4,), den.sigma_max)  # doctest: +SKIP
        >>> x0 = den(torch.randn(4, 3, 32, 32) * s.view(-1, 1, 1, 1), s)  # doctest: +SKIP
    """

    def __init__(
        self,
        unet: nn.Module,
        vp: DiscreteVP,
        *,
        prediction_type: str = "epsilon",
        timestep_mode: str = "interpolate",
        learned_variance: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__()
        _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        _check_choice("timestep_mode", timestep_mode, TIMESTEP_MODES)
        self.unet = unet
        self.vp = vp
        self.prediction_type = prediction_type
        self.timestep_mode = timestep_mode
        self.learned_variance = learned_variance
        self.name = name or type(unet).__name__
        self.sigma_min = vp.sigma_min
        self.sigma_max = vp.sigma_max
        self.shape = _sample_shape(unet)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        timestep_mode: str = "interpolate",
        prediction_type: str | None = None,
    ) -> DiffusersUNetDenoiser:
        """Load a `UNet2DModel` and its scheduler config from a LOCAL folder (never the Hub).

        Layouts: see `find_layout`. `prediction_type` overrides the scheduler config's (default "epsilon").
        Raises `ModelLoadError` (a ValueError) with a one-line reason naming the folder or file.
        """
        root = Path(path).expanduser()
        unet_dir, scheduler_file = find_layout(root)
        config = read_scheduler_config(scheduler_file)
        vp = vp_from_scheduler_config(config, source=scheduler_file)
        ptype = prediction_type if prediction_type is not None else config.get("prediction_type", "epsilon")
        _check_choice("prediction_type", ptype, PREDICTION_TYPES, source=scheduler_file)
        _check_choice("timestep_mode", timestep_mode, TIMESTEP_MODES)
        unet = _load_unet(unet_dir, device=device, dtype=dtype)
        learned = _check_unet(unet, unet_dir, variance_type=str(config.get("variance_type", "fixed_small")))
        return cls(
            unet,
            vp,
            prediction_type=ptype,
            timestep_mode=timestep_mode,
            learned_variance=learned,
            name=str(root),
        )

    def forward(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        """`x` [B, C, H, W] in the EDM convention (x~), `sigma` [B] (or one value) sigma~ -> [B, C, H, W]; `cond`
        [B] condition indices for a conditional subclass (`fewstep_search.models.t2i`)."""
        param = next(self.unet.parameters())
        dev, model_dtype = param.device, param.dtype
        x64 = x.to(device=dev, dtype=torch.float64)
        sig = sigma.to(device=dev, dtype=torch.float64).reshape(-1)
        if sig.numel() == 1:
            sig = sig.expand(x.shape[0])
        elif sig.numel() != x.shape[0]:
            raise ValueError(f"sigma has {sig.numel()} values for a batch of {x.shape[0]}")
        alpha = torch.rsqrt(1.0 + sig**2).reshape(-1, *([1] * (x.ndim - 1)))
        out = self.network_output((x64 * alpha).to(model_dtype), self.model_timesteps(sig), cond)
        if self.learned_variance:
            out = out[:, : x.shape[1]]
        d = vp_output_to_x0(out.to(torch.float64), x=x64, sigma=sig, prediction_type=self.prediction_type)
        return d.to(device=x.device, dtype=x.dtype)

    def network_output(self, x_t: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        """The network's output at the VP state x_t and timesteps t: the one call a subclass replaces (a text-to-image
        UNet's prompts and guidance)."""
        if cond is not None:
            raise ValueError(f"{self.name} is unconditional: it takes no condition indices")
        return self.unet(x_t, t, return_dict=False)[0]

    def model_timesteps(self, sigma: Tensor) -> Tensor:
        """The timesteps the network is called with at sigma~: fractional (differentiable, float32) or the nearest
        trained integer timestep. An exported scheduler calls the network with these same values."""
        if self.timestep_mode == "nearest":
            t = self.vp.t(sigma.detach().cpu().numpy(), nearest=True)
            return torch.as_tensor(t, device=sigma.device).long()
        return self.vp.t_torch(sigma).to(torch.float32)


def _check_choice(what: str, value: object, choices: tuple[str, ...], *, source: Path | None = None) -> None:
    """ModelLoadError (a ValueError) naming the value, where it came from, and the supported choices."""
    if value not in choices:
        where = f" (from {source})" if source is not None else ""
        raise ModelLoadError(f"unsupported {what} {value!r}{where}; expected one of {', '.join(choices)}")


def _load_unet(unet_dir: Path, *, device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    """`UNet2DModel.from_pretrained(path, local_files_only=True)`, eval, frozen; errors name the folder."""
    try:
        from diffusers import UNet2DModel
    except ImportError as e:
        raise ModelLoadError(
            "the diffusers adapter needs diffusers: pip install 'fewstep-search[diffusers]'"
        ) from e
    cls_name = _read_json_field(unet_dir / "config.json", "_class_name")
    if cls_name not in (None, "UNet2DModel"):
        raise ModelLoadError(
            f"{unet_dir} holds a {cls_name}; only UNet2DModel is supported (wrap other models with a factory)"
        )
    try:
        unet = UNet2DModel.from_pretrained(
            unet_dir, local_files_only=True, torch_dtype=dtype, low_cpu_mem_usage=False
        )
    except Exception as e:  # diffusers / safetensors raise many types; keep the cause chained
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"could not load a UNet2DModel from {unet_dir}: {reason}") from e
    return unet.to(device).eval().requires_grad_(False)


def _read_json_field(path: Path, key: str) -> Any:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read UNet config {path}: {e}") from e
    return data.get(key) if isinstance(data, dict) else None


def _check_unet(unet: nn.Module, unet_dir: Path, *, variance_type: str) -> bool:
    """Refuse UNets this adapter cannot drive; return whether the output carries a learned variance half."""
    cfg = unet.config  # type: ignore[attr-defined]
    if cfg.get("time_embedding_type", "positional") == "fourier":
        raise ModelLoadError(
            f"{unet_dir}: a Fourier-time (score-SDE VE) UNet is not a VP model; use a factory"
        )
    if cfg.get("num_class_embeds") is not None or cfg.get("class_embed_type") is not None:
        raise ModelLoadError(
            f"{unet_dir}: class-conditional UNets need labels; wrap the model with a factory"
        )
    c_in, c_out = int(cfg["in_channels"]), int(cfg["out_channels"])
    if c_out == c_in:
        return False
    if c_out == 2 * c_in and variance_type in _LEARNED_VARIANCE:
        return True
    raise ModelLoadError(f"{unet_dir}: out_channels {c_out} does not match in_channels {c_in}")


def _sample_shape(unet: nn.Module) -> tuple[int, ...] | None:
    """(C, H, W) the UNet was configured for, or None when its config does not say."""
    cfg = getattr(unet, "config", None)
    if cfg is None or cfg.get("sample_size") is None:
        return None
    size = cfg["sample_size"]
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (int(cfg["in_channels"]), int(h), int(w))
