"""Flow-matching (rectified-flow) models as EDM-convention `Denoiser`s: the SD3 / Flux / Wan family.

The model sees `x_t = (1 - t) x0 + t eps` and predicts the velocity `v(x_t, t) ~ E[eps - x0 | x_t]`. Dividing by
`1 - t` gives exactly our convention `x = x0 + sigma eps` (docs/design.md section 1):

    sigma = t / (1 - t),   t = sigma / (1 + sigma),   x = x_t / (1 - t),   x_t = x / (1 + sigma),
    D(x, sigma) = E[x0 | x_t] = x_t - t v(x_t, t).

No approximation is involved (unlike a discrete VP table, t is continuous), and Euler in t on the flow ODE
`dx_t/dt = v` is the same step as our DDIM step in sigma, so every bound, schedule and export carries over.

**The range.** t = 1 is sigma = infinity, which no schedule can start from. The advertised range ends at the
scheduler's last trained t below 1: diffusers' `FlowMatchEulerDiscreteScheduler` trains on the grid
`t = n / T`, n = 1..T (T = `num_train_timesteps`), so `t_min = 1/T` and `t_max = 1 - 1/T`, i.e.
`sigma_min = 1/(T - 1)` and `sigma_max = T - 1` (0.001001 and 999 for T = 1000). A sampler started there from
`x_t ~ N(0, t_max^2 I)` differs from one started at t = 1 from N(0, I) only by the data's weight `1/T` in `x_t`.
Both ends can be overridden (`t_min`, `t_max`).

**The shift.** `FlowMatchEulerDiscreteScheduler(shift=s)` warps every t it is given as `s t / (1 + (s - 1) t)`
(i.e. sigma -> s sigma). It is a property of the sampler, not of the network: `D` does not depend on it. The
denoiser advertises it so exports can undo it (`unshift_t`) and the family's default schedule can be rebuilt.

diffusers is imported only when a folder is loaded, so importing this module stays cheap.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from fewstep_search.models.diffusers_adapter import read_scheduler_config
from fewstep_search.models.errors import ModelLoadError

if TYPE_CHECKING:  # the loader registry imports this module lazily; no import cycle at run time
    from fewstep_search.models.loading import _Request

__all__ = [
    "FLOW_SCHEDULER",
    "DEFAULT_NUM_TRAIN_TIMESTEPS",
    "FlowMatchDenoiser",
    "sigma_to_t",
    "t_to_sigma",
    "shift_t",
    "unshift_t",
    "trained_t_range",
    "flow_output_to_x0",
    "find_flow_layout",
    "diffusers_model_class",
    "read_json_object",
    "load_flow",
    "load_flow_folder",
    "mixture_flow",
    "load_flow_factory",
]

FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"
DEFAULT_NUM_TRAIN_TIMESTEPS = 1000
_SCHEDULER_CONFIG = "scheduler_config.json"
_MODEL_SUBFOLDERS = ("transformer", "unet")
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------- coordinates


def sigma_to_t(sigma: np.ndarray | float) -> np.ndarray:
    """Flow time of an EDM sigma: `t = sigma / (1 + sigma)` (sigma = 0 -> t = 0)."""
    s = np.asarray(sigma, dtype=np.float64)
    return s / (1.0 + s)


def t_to_sigma(t: np.ndarray | float) -> np.ndarray:
    """EDM sigma of a flow time t in [0, 1): `sigma = t / (1 - t)`."""
    t = np.asarray(t, dtype=np.float64)
    if np.any((t < 0) | (t >= 1)):
        raise ValueError("flow times must lie in [0, 1) (t = 1 is sigma = infinity)")
    return t / (1.0 - t)


def shift_t(t: np.ndarray | float, shift: float) -> np.ndarray:
    """What `FlowMatchEulerDiscreteScheduler(shift=s)` does to a t it is given: `s t / (1 + (s - 1) t)`."""
    t = np.asarray(t, dtype=np.float64)
    return shift * t / (1.0 + (shift - 1.0) * t)


def unshift_t(t: np.ndarray | float, shift: float) -> np.ndarray:
    """Inverse of `shift_t`: the value to hand the scheduler so that it runs t, `t / (s - (s - 1) t)`."""
    t = np.asarray(t, dtype=np.float64)
    return t / (shift - (shift - 1.0) * t)


def flow_output_to_x0(v: Tensor, *, x_t: Tensor, sigma: Tensor) -> Tensor:
    """`D = x_t - t v` (t = sigma / (1 + sigma)): the posterior mean from a velocity `v = eps - x0` at the flow state
    x_t [B, *shape], sigma [B]; the one place the flow map is written (the adapter and the exported scheduler)."""
    t = sigma / (1.0 + sigma)
    return x_t - t.reshape((-1,) + (1,) * (x_t.ndim - 1)) * v


def trained_t_range(num_train_timesteps: int) -> tuple[float, float]:
    """(t_min, t_max) = (1/T, 1 - 1/T): the ends of diffusers' FlowMatch training grid below t = 1."""
    n = int(num_train_timesteps)
    if n < 3:
        raise ValueError(f"num_train_timesteps must be >= 3, got {num_train_timesteps}")
    return 1.0 / n, 1.0 - 1.0 / n


# ---------------------------------------------------------------- the denoiser


class FlowMatchDenoiser(nn.Module):
    """`D(x, sigma)` of a velocity model `v(x_t, t_model)` (see the module docstring for the map).

    Args:
        velocity: an `nn.Module` (held as the submodule `model`, so Phase-2 can fine-tune exactly it; its state
            dict keys start with `model.`) or any callable `(x_t [B, *shape], t_model [B]) -> v`. An output with
            a `.sample` attribute or a tuple (diffusers models) is unwrapped.
        t_min, t_max: the trained flow-time range, 0 < t_min < t_max < 1 (advertised as sigma_min / sigma_max).
        shift: the sampler's shift (`FlowMatchEulerDiscreteScheduler.shift`), advertised for exports.
        timestep_scale: the model is called with `t_model = t * timestep_scale` (diffusers: num_train_timesteps).
        shape: the per-sample shape, where known.
        scheduler_config: the diffusers scheduler config the model came with (exports check it).

    Coefficients are applied in float64; a module runs in its own dtype and device, a plain function in x's
    dtype. Differentiable in x, sigma and the module's weights.

    Example:
        >>> den = FlowMatchDenoiser(lambda xt, t: torch.zeros_like(xt), t_min=0.001, t_max=0.999)
        >>> round(den.sigma_max, 3), den.family
        (999.0, 'flow')
    """

    family = "flow"
    prediction_type = "flow_velocity"

    def __init__(
        self,
        velocity: nn.Module | Callable[[Tensor, Tensor], Any],
        *,
        t_min: float,
        t_max: float,
        shift: float = 1.0,
        timestep_scale: float = 1.0,
        shape: tuple[int, ...] | None = None,
        scheduler_config: Mapping[str, Any] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        if not callable(velocity):
            raise ValueError(f"FlowMatchDenoiser needs a velocity model v(x_t, t), got {type(velocity).__name__}")
        lo, hi = float(t_min), float(t_max)
        if not (0.0 < lo < hi < 1.0):
            raise ValueError(f"need 0 < t_min < t_max < 1, got t_min={lo}, t_max={hi} (t = 1 is sigma = infinity)")
        for what, val in (("shift", shift), ("timestep_scale", timestep_scale)):
            if not (math.isfinite(float(val)) and float(val) > 0):
                raise ValueError(f"{what} must be a positive number, got {val}")
        if isinstance(velocity, nn.Module):
            self.model: nn.Module | None = velocity
            self._fn = None
        else:
            self.model = None
            self._fn = velocity
        self.t_min, self.t_max = lo, hi
        self.sigma_min = float(t_to_sigma(lo))
        self.sigma_max = float(t_to_sigma(hi))
        self.shift = float(shift)
        self.timestep_scale = float(timestep_scale)
        self.shape = tuple(int(s) for s in shape) if shape else None
        self.scheduler_config = dict(scheduler_config) if scheduler_config is not None else None
        self.name = name or type(velocity).__name__

    def _placement(self, x: Tensor) -> tuple[torch.device, torch.dtype]:
        if self.model is not None:
            p = next(self.model.parameters(), None)
            if p is not None:
                return p.device, p.dtype
        return x.device, x.dtype

    def forward(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        """`x` [B, *shape] in the EDM convention, `sigma` [B] (or one value), finite and >= 0 -> D [B, *shape];
        `cond` [B] condition indices for a conditional subclass (`fewstep_search.models.t2i`)."""
        dev, run_dtype = self._placement(x)
        x64 = x.to(device=dev, dtype=torch.float64)
        sig = sigma.to(device=dev, dtype=torch.float64).reshape(-1)
        if sig.numel() == 1:
            sig = sig.expand(x.shape[0])
        elif sig.numel() != x.shape[0]:
            raise ValueError(f"sigma has {sig.numel()} values for a batch of {x.shape[0]}")
        view = (-1,) + (1,) * (x.ndim - 1)
        x_t = x64 / (1.0 + sig).reshape(view)  # (1 - t) x, without forming 1 - t
        v = self.velocity(x_t.to(run_dtype), self.model_timesteps(sig).to(run_dtype), cond)
        if not isinstance(v, Tensor) or v.shape != x.shape:
            got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"velocity model {self.name} returned {got} for input shape {tuple(x.shape)}")
        d = flow_output_to_x0(v.to(torch.float64), x_t=x_t, sigma=sig)
        return d.to(device=x.device, dtype=x.dtype)

    def velocity(self, x_t: Tensor, t_model: Tensor, cond: Tensor | None) -> Tensor:
        """The model's velocity at the flow state x_t and model timesteps: the one call a subclass replaces (a
        text-to-image transformer's prompts and guidance)."""
        if cond is not None:
            raise ValueError(f"{self.name} is unconditional: it takes no condition indices")
        return _unwrap((self.model if self.model is not None else self._fn)(x_t, t_model))  # type: ignore[misc]

    def model_timesteps(self, sigma: Tensor) -> Tensor:
        """The timesteps the network is called with at sigma: `t * timestep_scale`, t = sigma / (1 + sigma) (float64;
        cast to the network's dtype at the call). An exported scheduler calls the network with these values."""
        return sigma / (1.0 + sigma) * self.timestep_scale

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        t_min: float | None = None,
        t_max: float | None = None,
    ) -> FlowMatchDenoiser:
        """Load a LOCAL diffusers folder whose scheduler is `FlowMatchEulerDiscreteScheduler` (never the Hub).

        Layouts: a pipeline folder (`transformer/` or `unet/` + `scheduler/scheduler_config.json`) or a model
        folder (`config.json` + weights + `scheduler_config.json`). The model class is the one named by the
        model config's `_class_name`; it must take `(sample, timestep)` and return the velocity (a UNet2DModel
        does; a text-conditioned transformer needs a factory that binds its prompts). The scheduler's `shift`
        and `num_train_timesteps` set `shift`, `timestep_scale` and the default range (`trained_t_range`).
        Raises `ModelLoadError` (a ValueError) with one line naming the folder or file.
        """
        root = Path(path).expanduser()
        model_dir, scheduler_file = find_flow_layout(root)
        config = read_scheduler_config(scheduler_file)
        if config.get("_class_name") != FLOW_SCHEDULER:
            raise ModelLoadError(
                f"{scheduler_file} configures a {config.get('_class_name', 'unknown scheduler')}, not a "
                f"{FLOW_SCHEDULER}; a DDPM-family model is kind 'diffusers'"
            )
        n_train = int(config.get("num_train_timesteps", DEFAULT_NUM_TRAIN_TIMESTEPS))
        lo, hi = trained_t_range(n_train)
        model = _load_diffusers_model(model_dir, device=device, dtype=dtype)
        return cls(
            model,
            t_min=lo if t_min is None else t_min,
            t_max=hi if t_max is None else t_max,
            shift=float(config.get("shift", 1.0)),
            timestep_scale=float(n_train),
            shape=_sample_shape(model),
            scheduler_config=config,
            name=str(root),
        )


def _unwrap(out: Any) -> Any:
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)) and out:
        return out[0]
    return out


# ---------------------------------------------------------------- diffusers folders


def find_flow_layout(root: Path) -> tuple[Path, Path]:
    """(model folder, scheduler config file) of a local flow-matching diffusers folder."""
    if not root.is_dir():
        raise ModelLoadError(f"flow model folder {root} does not exist or is not a folder")
    model_dir = next((root / s for s in _MODEL_SUBFOLDERS if (root / s / "config.json").is_file()), root)
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"no model config.json in {root} (expected transformer/, unet/ or a model folder)")
    for cand in (root / "scheduler" / _SCHEDULER_CONFIG, root / _SCHEDULER_CONFIG):
        if cand.is_file():
            return model_dir, cand
    raise ModelLoadError(
        f"no scheduler config in {root}: expected scheduler/{_SCHEDULER_CONFIG} or {_SCHEDULER_CONFIG}"
    )


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in a model folder's file; `ModelLoadError` naming `what` and the file otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path} does not exist ({what})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {what} {path}: {e}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{what} {path} is not a JSON object")
    return data


def diffusers_model_class(model_dir: Path) -> type:
    """The diffusers model class named by `model_dir/config.json`'s `_class_name` (refused unless it is one)."""
    try:
        import diffusers
    except ImportError as e:
        raise ModelLoadError("flow-matching folders need diffusers: pip install 'fewstep-search[diffusers]'") from e
    name = read_json_object(model_dir / "config.json", "model config").get("_class_name")
    cls = getattr(diffusers, str(name), None) if name else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise ModelLoadError(f"{model_dir}/config.json names {name!r}, which is not a diffusers model class")
    return cls


def _load_diffusers_model(model_dir: Path, *, device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    cls = diffusers_model_class(model_dir)
    required = [
        p.name
        for p in list(inspect.signature(cls.forward).parameters.values())[1:]
        if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(required) > 2:
        raise ModelLoadError(
            f"{model_dir}: {cls.__name__} needs {', '.join(required)}, more than (sample, timestep); "
            "bind its conditions in a factory (model.factory)"
        )
    try:
        model = cls.from_pretrained(model_dir, local_files_only=True, torch_dtype=dtype, low_cpu_mem_usage=False)
    except Exception as e:  # diffusers / safetensors raise many types; keep the cause chained
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"could not load a {cls.__name__} from {model_dir}: {reason}") from e
    cfg = getattr(model, "config", {})
    if cfg.get("num_class_embeds") is not None or cfg.get("class_embed_type") is not None:
        raise ModelLoadError(f"{model_dir}: class-conditional models need labels; wrap the model with a factory")
    return model.to(device).eval().requires_grad_(False)


def _sample_shape(model: nn.Module) -> tuple[int, ...] | None:
    cfg = getattr(model, "config", None)
    if cfg is None or cfg.get("sample_size") is None or cfg.get("in_channels") is None:
        return None
    size = cfg["sample_size"]
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (int(cfg["in_channels"]), int(h), int(w))


# ---------------------------------------------------------------- loaders (registry shape: _Request -> Denoiser)

_FOLDER_OPTIONS = ("dtype", "t_min", "t_max")
_FACTORY_OPTIONS = ("t_min", "t_max", "shift", "timestep_scale", "num_train_timesteps", "shape")


def load_flow(req: _Request) -> FlowMatchDenoiser:
    """Kind 'flow': a diffusers folder (`path`) or a user factory (`factory`), exactly one of them."""
    if (req.path is None) == (req.factory is None):
        raise ValueError("model kind 'flow' needs exactly one of path (a diffusers folder) or factory")
    return load_flow_folder(req) if req.path is not None else load_flow_factory(req)


def load_flow_folder(req: _Request) -> FlowMatchDenoiser:
    """`FlowMatchDenoiser.from_pretrained(path)`; options: dtype ("float32", ...), t_min, t_max."""
    opts = dict(req.options)
    unknown = sorted(set(opts) - set(_FOLDER_OPTIONS))
    if unknown:
        raise ValueError(f"model kind 'flow' (folder): unknown options {unknown}; known: {', '.join(_FOLDER_OPTIONS)}")
    dtype_name = opts.pop("dtype", "float32")
    if dtype_name not in _DTYPES:
        raise ValueError(f"model kind 'flow': dtype {dtype_name!r} is not one of {', '.join(_DTYPES)}")
    if req.path is None:
        raise ValueError("model kind 'flow' (folder) needs a path")
    return FlowMatchDenoiser.from_pretrained(req.path, device=req.device, dtype=_DTYPES[dtype_name], **opts)


def load_flow_factory(req: _Request) -> FlowMatchDenoiser:
    """A user factory returning a velocity function or module `v(x_t, t_model)` (or a ready FlowMatchDenoiser).

    Options taken here: `t_min`, `t_max` (default `trained_t_range(num_train_timesteps)`), `num_train_timesteps`
    (1000), `shift` (1.0), `timestep_scale` (1.0: the function gets t in [0, 1]; 1000 for diffusers-style
    timesteps), `shape`; every other option goes to the factory as a keyword argument, with `device`.
    Runs the user's own code (see `fewstep_search.models.factory`).
    """
    from fewstep_search.models.factory import load_factory

    if req.factory is None:
        raise ValueError("model kind 'flow' (factory) needs factory = 'module:function'")
    opts = dict(req.options)
    own = {k: opts.pop(k) for k in _FACTORY_OPTIONS if k in opts}
    fn = load_factory(req.factory, kwargs={"device": req.device, **opts}, base_dir=req.base_dir)
    if isinstance(fn, FlowMatchDenoiser):
        if own:
            raise ValueError(f"factory {req.factory!r} returned a FlowMatchDenoiser; options {sorted(own)} are its own")
        return fn
    lo, hi = trained_t_range(int(own.get("num_train_timesteps", DEFAULT_NUM_TRAIN_TIMESTEPS)))
    return FlowMatchDenoiser(
        fn,
        t_min=float(own.get("t_min", lo)),
        t_max=float(own.get("t_max", hi)),
        shift=float(own.get("shift", 1.0)),
        timestep_scale=float(own.get("timestep_scale", 1.0)),
        shape=tuple(own["shape"]) if own.get("shape") else getattr(fn, "shape", None),
        name=req.factory,
    )


def mixture_flow(*, dim: int = 8, seed: int = 0, n_components: int = 6, device: str = "cpu") -> Callable[..., Tensor]:
    """Factory of an exact flow-matching model: the velocity `v(x_t, t)` of a seeded Gaussian mixture.

    For studies and examples (`kind = "flow"`, `factory = "fewstep_search.models.flow:mixture_flow"`): the exact
    posterior mean of `fewstep_search.models.mixture.GaussianMixture` at sigma = t / (1 - t), turned into the
    velocity `v = (x_t - x0_hat) / t` of the rectified-flow convention. The function advertises `shape`.
    """
    from fewstep_search.models.mixture import GaussianMixture

    mix = GaussianMixture.random(dim, n_components=n_components, seed=seed)

    def velocity(x_t: Tensor, t: Tensor) -> Tensor:
        tt = t.to(torch.float64).reshape(-1, *([1] * (x_t.ndim - 1)))
        x0 = mix(x_t.double() / (1 - tt), (tt / (1 - tt)).flatten())
        return ((x_t.double() - x0) / tt).to(x_t.dtype)

    velocity.shape = (dim,)  # type: ignore[attr-defined]
    return velocity
