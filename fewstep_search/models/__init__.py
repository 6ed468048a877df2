"""Model adapters: everything that turns a network (or an exact model) into a `Denoiser`."""

from fewstep_search.denoiser import CheckedDenoiser, Denoiser, ModelOutputError, sigma_range

__all__ = ["CheckedDenoiser", "Denoiser", "ModelOutputError", "sigma_range"]
