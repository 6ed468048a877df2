"""Tiny trainable denoisers for the Phase-2 tests, and a factory file any process (a Ray worker) can load.

`TinyDenoiser` is an EDM-preconditioned MLP on 8-dim vectors (~5k weights): a real `torch.nn.Module` whose
outputs depend on x and sigma, fast enough that a round of a few dozen steps runs in seconds on one thread.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

DIM = 8
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0

FACTORY_SOURCE = '''
import torch
from torch import nn


class TinyDenoiser(nn.Module):
    sigma_min, sigma_max = 0.002, 80.0
    shape = (8,)

    def __init__(self, dim=8, width=48, scale=3.0, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(dim + 1, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, dim))
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(scale * (torch.rand(p.shape, generator=g) - 0.5) / p.shape[-1] ** 0.5)

    def forward(self, x, sigma):
        s = sigma.to(x.dtype).reshape(-1, 1)
        c_in = 1 / (s ** 2 + 0.25).sqrt()
        c_skip = 0.25 / (s ** 2 + 0.25)
        c_out = 0.5 * s / (s ** 2 + 0.25).sqrt()
        dev = self.net[0].weight.device
        f = self.net(torch.cat([c_in * x, torch.log(s) / 4], 1).to(dev, self.net[0].weight.dtype)).to(x)
        return c_skip * x + c_out * f


def make(device="cpu", frozen=False, **kwargs):
    model = TinyDenoiser(**kwargs).to(device).eval()
    if frozen:
        model.requires_grad_(False)
    return model
'''

_namespace: dict[str, object] = {"__name__": "tiny_denoiser"}
exec(compile(FACTORY_SOURCE, "<tiny-denoiser>", "exec"), _namespace)  # noqa: S102 (our own constant source)
TinyDenoiser = _namespace["TinyDenoiser"]
make_tiny = _namespace["make"]


def write_factory(folder: Path) -> str:
    """Write the factory module into `folder` and return its spec 'path.py:make' (for kind = 'factory')."""
    path = Path(folder) / "tiny_denoiser.py"
    path.write_text(FACTORY_SOURCE)
    return f"{path}:make"


class NaNAfter(nn.Module):
    """Wraps a module; after `after` calls in grad mode (training), its outputs are NaN (a diverging student)."""

    sigma_min, sigma_max = SIGMA_MIN, SIGMA_MAX

    def __init__(self, inner: nn.Module, after: int) -> None:
        super().__init__()
        self.inner, self.after = inner, after
        self.calls = 0

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        out = self.inner(x, sigma)
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls > self.after:
                return out * float("nan")
        return out


def test_tiny_factory_builds_a_trainable_module(tmp_path: Path) -> None:
    from fewstep_search.models.loading import load_model
    from fewstep_search.models.source import trainable_module

    den = load_model("factory", factory=write_factory(tmp_path), options={"seed": 1})
    module = trainable_module(den)
    assert isinstance(module, nn.Module)
    x = torch.randn(3, DIM)
    out = den(x, torch.full((3,), 1.0))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, den(x, torch.full((3,), 2.0)))  # depends on sigma
