"""Samplers in k-diffusion's signature for the solvers k-diffusion does not have (iPNDM).

k-diffusion's samplers are `sample_x(model, x, sigmas, extra_args=None, callback=None, disable=None)`, with
`model(x, sigma * s_in, **extra_args)` the denoiser in the EDM convention and `sigmas` descending, last 0. The
project's DDIM / Euler, Heun and DPM-Solver++(2M) compute the same steps as k-diffusion's own `sample_euler`,
`sample_heun` and `sample_dpmpp_2m` on such sigmas, so an export names those (`K_DIFFUSION_SAMPLERS`); iPNDM has no
k-diffusion sampler, so it is here, running the project's own steps (`fewstep_search.solvers.ipndm`). No import of
k-diffusion is needed.

    >>> from fewstep_search.integrations.k_diffusion import sample_ipndm
    >>> # x0 = sample_ipndm(model, sigmas[0] * torch.randn(...), sigmas)   (sigmas: an export's, last 0)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from fewstep_search.solvers import get_solver

__all__ = ["sample_ipndm", "K_DIFFUSION_SAMPLERS"]

K_DIFFUSION_SAMPLERS: dict[str, str] = {
    "ddim": "k_diffusion.sampling.sample_euler",
    "euler": "k_diffusion.sampling.sample_euler",
    "heun": "k_diffusion.sampling.sample_heun",
    "dpmpp_2m": "k_diffusion.sampling.sample_dpmpp_2m",
    "ipndm": "fewstep_search.integrations.k_diffusion.sample_ipndm",
}
"""The sampler in k-diffusion's signature that computes each solver's steps (on sigmas that end in 0)."""


def _run(solver: str, model: Callable[..., Tensor], x: Tensor, sigmas: Tensor, extra_args: dict[str, Any] | None,
         callback: Callable[[dict[str, Any]], None] | None) -> Tensor:
    extra = extra_args or {}

    def denoiser(xv: Tensor, sigma: Tensor) -> Tensor:
        return model(xv, sigma, **extra)

    def report(info: dict[str, Any]) -> None:  # k-diffusion's callback keys
        if callback is not None:
            callback({**info, "sigma_hat": info["sigma"]})

    return get_solver(solver)(denoiser, x, sigmas, callback=report if callback is not None else None)


def sample_ipndm(model: Callable[..., Tensor], x: Tensor, sigmas: Tensor, extra_args: dict[str, Any] | None = None,
                 callback: Callable[[dict[str, Any]], None] | None = None, disable: bool | None = None) -> Tensor:
    """iPNDM in k-diffusion's sampler signature: one model call per sigma before the final 0 (`disable`, the
    progress switch of k-diffusion's samplers, is accepted and unused)."""
    return _run("ipndm", model, x, sigmas, extra_args, callback)
