"""The built-in `digits` model: a small U-Net on 8x8 digits with EDM preconditioning, shipped in the package.

Why a built-in model: the schedule search needs a real trained network that anyone can run on a laptop CPU in
seconds, with real data to judge sample quality against. The weights (float16, ~1 MB) and a JSON card ship in
`fewstep_search/assets/`; `load_digits()` needs no network and no training.

Preconditioning (Karras et al. 2022, "Elucidating the design space...", Table 1, sigma_data = 0.5):
    D(x, sigma) = c_skip x + c_out F(c_in x, c_noise),
    c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = log(sigma) / 4.
The coefficients and the skip combination are computed in float64; the network itself runs in float32.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor, nn

from fewstep_search.data import DIGITS_SHAPE

__all__ = [
    "SIGMA_DATA",
    "SIGMA_MIN",
    "SIGMA_MAX",
    "DigitsNetConfig",
    "DigitsUNet",
    "EDMDenoiser",
    "WeightsFileError",
    "load_digits",
    "from_file",
    "read_weights",
    "load_state_checked",
    "shipped_card",
]

SIGMA_DATA = 0.5
"""EDM's sigma_data: the std the preconditioning assumes for clean data in [-1, 1]."""
SIGMA_MIN = 0.002
"""Smallest noise level advertised (EDM's default range)."""
SIGMA_MAX = 80.0
"""Largest noise level advertised (EDM's default range)."""

CONFIG_METADATA_KEY = "fewstep_search.config"
"""safetensors metadata key holding the architecture config as JSON, so a weight file is self-describing."""
WEIGHTS_ASSET = "digits.safetensors"
CARD_ASSET = "digits.json"


class WeightsFileError(ValueError):
    """A weight file is missing, unreadable, or does not fit the architecture; the message names the file."""


@dataclass(frozen=True)
class DigitsNetConfig:
    """Architecture of `DigitsUNet`; stored in the model card and the weight file so loaders rebuild the net.

    `channels[k]` is the width at resolution 8 / 2**k (8x8, 4x4, 2x2 by default); `blocks` residual blocks per
    level on the way down (one more on the way up, as in the DDPM U-Net); `emb_dim` the noise-embedding width.
    """

    channels: tuple[int, ...] = (32, 64, 64)
    blocks: int = 2
    emb_dim: int = 128
    dropout: float = 0.1
    in_channels: int = DIGITS_SHAPE[0]

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> DigitsNetConfig:
        """Rebuild from a card; unknown keys are an error (a newer card should not load silently wrong)."""
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown DigitsNetConfig keys {sorted(unknown)}")
        kw = dict(d)
        if "channels" in kw:
            kw["channels"] = tuple(int(c) for c in kw["channels"])  # type: ignore[union-attr]
        return cls(**kw)  # type: ignore[arg-type]


_EMB_SCALE = 250.0
"""c_noise = log(sigma) / 4 spans only [-1.6, 1.1] over [sigma_min, sigma_max]; scaling it before the sinusoidal
embedding spreads the phases so the embedding tells nearby noise levels apart."""


def _groups(ch: int) -> int:
    """GroupNorm groups: up to 32, always dividing the channel count."""
    return math.gcd(32, ch)


class _ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the noise embedding added as a per-channel shift (DDPM style)."""

    def __init__(self, c_in: int, c_out: int, *, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity: stable early training
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.drop(nn.functional.silu(self.norm2(h))))
        return self.skip(x) + h


class DigitsUNet(nn.Module):
    """The raw network F(x_in, c_noise) of EDM: a 3-level U-Net for 1x8x8 inputs (8x8 -> 4x4 -> 2x2).

    Inputs: `x` [B, C, 8, 8] float32 (already scaled by c_in), `c_noise` [B]. Output has x's shape.
    """

    def __init__(self, config: DigitsNetConfig) -> None:
        super().__init__()
        self.config = config
        ch, e = config.channels, config.emb_dim
        self.freqs: Tensor
        freqs = torch.exp(-math.log(1e4) * torch.arange(e // 2) / (e // 2))
        self.register_buffer("freqs", freqs, persistent=False)
        self.emb_mlp = nn.Sequential(nn.Linear(e, 2 * e), nn.SiLU(), nn.Linear(2 * e, e))
        self.inp = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)

        def block(a: int, b: int) -> _ResBlock:
            return _ResBlock(a, b, emb_dim=e, dropout=config.dropout)

        self.down = nn.ModuleList()
        skips = [ch[0]]
        cur = ch[0]
        for level, width in enumerate(ch):
            for _ in range(config.blocks):
                self.down.append(block(cur, width))
                cur = width
                skips.append(cur)
            if level < len(ch) - 1:
                self.down.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))
                skips.append(cur)
        self.mid = nn.ModuleList([block(cur, cur), block(cur, cur)])
        self.up = nn.ModuleList()
        for level, width in reversed(list(enumerate(ch))):
            for _ in range(config.blocks + 1):
                self.up.append(block(cur + skips.pop(), width))
                cur = width
            if level > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.out_norm = nn.GroupNorm(_groups(cur), cur)
        self.out = nn.Conv2d(cur, config.in_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        arg = c_noise.float()[:, None] * self.freqs[None, :] * _EMB_SCALE
        emb = self.emb_mlp(torch.cat([arg.cos(), arg.sin()], dim=1))
        h = self.inp(x)
        hs = [h]
        for m in self.down:
            h = m(h, emb) if isinstance(m, _ResBlock) else m(h)
            hs.append(h)
        for m in self.mid:
            h = m(h, emb)
        for m in self.up:
            if isinstance(m, _ResBlock):
                h = m(torch.cat([h, hs.pop()], dim=1), emb)
            else:
                h = m(h)
        return self.out(nn.functional.silu(self.out_norm(h)))


@dataclass(frozen=True)
class EDMCoefficients:
    """EDM preconditioning coefficients for a batch of sigmas (float64, shape [B])."""

    c_skip: Tensor
    c_out: Tensor
    c_in: Tensor
    c_noise: Tensor

    @classmethod
    def at(cls, sigma: Tensor, sigma_data: float = SIGMA_DATA) -> EDMCoefficients:
        s = sigma.to(torch.float64)
        denom = s.square() + sigma_data**2
        # log(0) guard: at sigma = 0 c_out = 0, so the network output is ignored and D(x, 0) = x exactly.
        c_noise = torch.log(s.clamp_min(1e-20)) / 4
        return cls(sigma_data**2 / denom, s * sigma_data / denom.sqrt(), 1 / denom.sqrt(), c_noise)


class EDMDenoiser(nn.Module):
    """`D(x, sigma)` = E[x0 | x0 + sigma eps] for the digits model; satisfies the `Denoiser` contract.

    Accepts x of any float dtype ([B, 1, 8, 8]) and sigma as [B] (or a scalar, broadcast); returns x's dtype.

    Example:
        >>> D = load_digits()
        >>> x = 80.0 * torch.randn(4, 1, 8, 8, dtype=torch.float64)
        >>> D(x, torch.full((4,), 80.0, dtype=torch.float64)).shape
        torch.Size([4, 1, 8, 8])
    """

    sigma_min: float = SIGMA_MIN
    sigma_max: float = SIGMA_MAX
    prediction_type: str = "x0"
    sigma_data: float = SIGMA_DATA
    shape: tuple[int, ...] = DIGITS_SHAPE
    dataset: str = "digits"
    """Real samples exist (`fewstep_search.data`): sample quality (FD) can be measured."""

    def __init__(self, net: DigitsUNet, *, card: dict[str, object] | None = None) -> None:
        super().__init__()
        self.net = net
        self.card: dict[str, object] = card or {}

    def forward(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """Runs on the network's device whatever x's; the output has x's device and dtype."""
        dev = self.net.inp.weight.device
        sigma_t = torch.as_tensor(sigma, dtype=torch.float64, device=dev)
        if sigma_t.ndim == 0:
            sigma_t = sigma_t.expand(x.shape[0])
        if sigma_t.shape != (x.shape[0],):
            raise ValueError(f"sigma must have shape [B] = [{x.shape[0]}], got {tuple(sigma_t.shape)}")
        c = EDMCoefficients.at(sigma_t, self.sigma_data)
        bshape = (-1,) + (1,) * (x.ndim - 1)
        # float64 for the skip combination where the device has it (MPS does not): the sum of two large terms.
        wide = torch.float64 if dev.type != "mps" else torch.float32
        xw = x.to(device=dev, dtype=wide)
        c_in, c_skip, c_out = (v.view(bshape).to(wide) for v in (c.c_in, c.c_skip, c.c_out))
        f = self.net((c_in * xw).float(), c.c_noise.float())
        out = c_skip * xw + c_out * f.to(wide)
        return out.to(device=x.device, dtype=x.dtype)

    def sample_data(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n training digits [n, 1, 8, 8] in [-1, 1], drawn with replacement (data-based objectives, e.g. AYS)."""
        from fewstep_search.data import digits_split

        train = digits_split().train_x
        idx = torch.randint(0, train.shape[0], (n,), generator=generator, device="cpu")
        return train[idx].to(torch.float64)

    def raw_loss(self, x0: Tensor, sigma: Tensor, noise: Tensor) -> Tensor:
        """EDM training loss per example, lambda(sigma)-weighted so every sigma contributes at unit scale.

        Equals ||F(c_in x, c_noise) - (x0 - c_skip x) / c_out||^2 (mean over pixels); x = x0 + sigma * noise.
        """
        c = EDMCoefficients.at(sigma, self.sigma_data)
        bshape = (-1,) + (1,) * (x0.ndim - 1)
        x = x0 + sigma.view(bshape).to(x0.dtype) * noise
        f = self.net((c.c_in.view(bshape) * x).float(), c.c_noise.float())
        target = ((x0 - c.c_skip.view(bshape) * x) / c.c_out.view(bshape)).float()
        return (f - target).square().flatten(1).mean(dim=1)


def _asset(name: str) -> Path:
    return Path(str(resources.files("fewstep_search") / "assets" / name))


def shipped_card() -> dict[str, object]:
    """The JSON card of the shipped digits weights (data, split, architecture, training, metrics)."""
    return json.loads(_asset(CARD_ASSET).read_text())


def read_weights(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a safetensors file into (tensors on CPU, metadata); any failure is a `WeightsFileError` naming it.

    Shared by every built-in network (denoiser, metrics classifier) so all report load problems the same way.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(f"{path}: weight file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        state = load_file(str(path), device="cpu")
    except Exception as err:  # safetensors raises several types (SafetensorError, OSError, ...)
        raise WeightsFileError(f"{path}: not a readable safetensors file ({err})") from err
    return state, meta


def load_state_checked(module: nn.Module, state: dict[str, Tensor], path: str | Path) -> None:
    """`load_state_dict` with one clear message listing what does not match (first few of each kind).

    Why not plain `load_state_dict`: its error lists every key of a wrong file and never names the file.
    Tensors stored in float16 are cast to the module's dtype.
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensors (e.g. {', '.join(missing[:3])})")
    if extra:
        problems.append(f"{len(extra)} unexpected tensors (e.g. {', '.join(extra[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} wrong shapes (e.g. {'; '.join(wrong[:3])})")
    if problems:
        name = type(module).__name__
        raise WeightsFileError(f"{path}: weights do not match the {name} architecture: {', '.join(problems)}")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise WeightsFileError(f"{path}: non-finite values in {', '.join(bad[:3])}")
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})


def from_file(
    path: str | Path, *, config: DigitsNetConfig | None = None, device: str | torch.device = "cpu"
) -> EDMDenoiser:
    """Load digits weights from a safetensors file (e.g. one written by `pretrain_digits`).

    The architecture comes from `config`, else the file's own metadata (`fewstep_search.config`), else the
    shipped card. Any problem (missing file, unreadable file, missing / extra / wrong-shaped tensors) raises
    `WeightsFileError` whose message names the file and the problem.
    """
    state, meta = read_weights(path)
    if config is None:
        if CONFIG_METADATA_KEY in meta:
            try:
                config = DigitsNetConfig.from_dict(json.loads(meta[CONFIG_METADATA_KEY]))
            except (ValueError, TypeError) as err:
                raise WeightsFileError(f"{path}: bad architecture config in metadata ({err})") from err
        else:
            config = DigitsNetConfig.from_dict(shipped_card()["architecture"])  # type: ignore[arg-type]
    with torch.device(device):  # built where it will run, whatever torch's default device is
        model = EDMDenoiser(DigitsUNet(config))
    load_state_checked(model.net, state, path)
    return model.eval()


def load_digits(device: str | torch.device = "cpu") -> EDMDenoiser:
    """The shipped, pre-trained digits denoiser (eval mode; no network, no training, milliseconds).

    Advertises sigma_min = 0.002, sigma_max = 80, prediction_type = "x0" (EDM preconditioned).
    """
    card = shipped_card()
    config = DigitsNetConfig.from_dict(card["architecture"])  # type: ignore[arg-type]
    model = from_file(_asset(WEIGHTS_ASSET), config=config, device=device)
    model.card = card
    return model
