"""Where a data-based peer (AYS's KLUB) gets its data samples x_0.

| source    | samples                                                                                  |
|-----------|------------------------------------------------------------------------------------------|
| "model"   | `sample_data(n, generator)` of the model (or of a model it wraps, through `.inner`)      |
| "mixture" | `.sample(n, generator=...)` of the `GaussianMixture` the denoiser is (or wraps)         |
| "digits"  | the built-in digits' training images (`fewstep_search.data.digits_split().train_x`)      |
| "auto"    | "model" where the model has `sample_data`, else "mixture" where it is one, else an error |

Only training data is used (never the digits' held-out images, which the quality metrics are measured on).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["DATA_SOURCES", "find_in_wrappers", "data_samples"]

DATA_SOURCES = ("auto", "model", "mixture", "digits")
_MAX_DEPTH = 8


def find_in_wrappers(denoiser: object, predicate: Any) -> object | None:
    """The first object in `denoiser`, `denoiser.inner`, `denoiser.inner.inner`, ... that satisfies `predicate`."""
    obj = denoiser
    for _ in range(_MAX_DEPTH):
        if obj is None:
            return None
        if predicate(obj):
            return obj
        obj = getattr(obj, "inner", None)
    return None


def _mixture(denoiser: object) -> object | None:
    from fewstep_search.models.mixture import GaussianMixture

    return find_in_wrappers(denoiser, lambda o: isinstance(o, GaussianMixture))


def data_samples(source: str, denoiser: object, n: int, *, seed: int = 0) -> Tensor:
    """n data samples [n, *shape] from `source` (see the table), drawn with a generator seeded by `seed`."""
    if source not in DATA_SOURCES:
        raise ValueError(f"unknown data source {source!r}; known: {', '.join(DATA_SOURCES)}")
    if n < 1:
        raise ValueError(f"need at least one data sample, got n={n}")
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    if source == "auto":
        if find_in_wrappers(denoiser, lambda o: callable(getattr(o, "sample_data", None))) is not None:
            source = "model"
        elif _mixture(denoiser) is not None:
            source = "mixture"
        else:
            raise ValueError("this model offers no data samples (no `sample_data(n, generator)` method and not a "
                             "Gaussian mixture); pass data='digits' for the built-in digits model")
    if source == "model":
        owner = find_in_wrappers(denoiser, lambda o: callable(getattr(o, "sample_data", None)))
        if owner is None:
            raise ValueError("data='model' needs a model with a `sample_data(n, generator)` method")
        return owner.sample_data(n, g)  # type: ignore[attr-defined]
    if source == "mixture":
        mix = _mixture(denoiser)
        if mix is None:
            raise ValueError("data='mixture' needs the model to be a fewstep_search GaussianMixture")
        return mix.sample(n, generator=g)  # type: ignore[attr-defined]
    from fewstep_search.data import digits_split

    train = digits_split().train_x
    idx = torch.randperm(train.shape[0], generator=g, device="cpu")[:n] if n <= train.shape[0] else \
        torch.randint(train.shape[0], (n,), generator=g, device="cpu")
    return train[idx]
