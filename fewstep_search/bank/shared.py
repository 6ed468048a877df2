"""A bank in the form Ray shares between processes: numpy arrays, which its object store keeps out of band.

Why: `tune.with_parameters` stores the bank once in Ray's object store, but torch tensors are pickled in band, so
every trial worker deserializes a private copy of every tensor (at d = 16384, K = 1024: about 270 MiB per worker
beside the shared one). numpy arrays are read back as views of the store's shared memory, so the workers of a
node map one copy. `SharedBank.bank()` wraps those views as tensors without copying; they are read-only (Phase-1
trials never write to the bank: `part`, `subset` and `to` make new tensors).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fewstep_search.bank.container import Bank

__all__ = ["SharedBank"]


def _array(t: Tensor) -> Any:
    """numpy view of a CPU tensor; other tensors (another device, bfloat16) stay tensors (pickled in band)."""
    if t.device.type != "cpu" or t.dtype == torch.bfloat16 or t.requires_grad:
        return t
    return t.contiguous().numpy()


@dataclass(frozen=True)
class SharedBank:
    """`Bank` fields as numpy arrays (where numpy has the dtype) plus the metadata; `bank()` rebuilds it."""

    fields: dict[str, Any]

    @classmethod
    def of(cls, bank: Bank) -> SharedBank:
        return cls({f.name: _array(v) if isinstance(v := getattr(bank, f.name), Tensor) else v
                    for f in dataclasses.fields(bank)})

    def bank(self) -> Bank:
        with warnings.catch_warnings():  # arrays read from Ray's store are read-only views: no copy wanted
            warnings.filterwarnings("ignore", message=".*not writable.*")
            return Bank(**{k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in self.fields.items()})
