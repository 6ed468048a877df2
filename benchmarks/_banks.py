"""The benchmark models and their banks, shared by the benchmark scripts (a bank is cached by its settings).

digits: the bank the CLI built by default for the built-in model until 2026-12-05 (K = 128, M = 64, float32; kept
here so the published tables stay comparable; the default is now K = 192 in thirds); mixture: the exact
Gaussian-mixture denoiser in d = 64 with studies/mixture64.toml's bank (K = 512, M = 128, float64).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

from fewstep_search.bank import Bank, BankMismatchError, build_bank, load_bank
from fewstep_search.models.source import ModelSource

__all__ = ["MODELS", "cached_bank"]

MODELS: dict[str, dict[str, Any]] = {
    "digits": {"source": ModelSource(kind="digits"), "bank": {"n_trajectories": 128, "grid_size": 64,
                                                              "dtype": torch.float32, "probes": 1}},
    "mixture": {"source": ModelSource(kind="mixture", options={"dim": 64}),
                "bank": {"n_trajectories": 512, "grid_size": 128, "dtype": torch.float64, "probes": 2}},
}


def cached_bank(kind: str, den: Any, cache: Path) -> Bank:
    """The bank of `kind` from `cache` when its settings match, else built (with a progress bar) and saved."""
    opts = MODELS[kind]["bank"]
    path = cache / f"{kind}_K{opts['n_trajectories']}_M{opts['grid_size']}.safetensors"
    expect = {"model_id": kind, "n_trajectories": opts["n_trajectories"], "grid_size": opts["grid_size"]}
    if path.exists():
        try:
            return load_bank(path, expect=expect)
        except (BankMismatchError, ValueError) as exc:
            print(f"[{kind}] cached bank not reused ({exc}); rebuilding", file=sys.stderr)
    t = time.perf_counter()
    bank = build_bank(den, shape=tuple(den.shape), sigma_min=den.sigma_min, sigma_max=den.sigma_max,
                      model_id=kind, progress=True, **opts)
    print(f"[{kind}] bank built in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    bank.save(path)
    return bank
