"""The built-in data set: scikit-learn's bundled 8x8 digits, with the project's one train / held-out split.

Why one place: the digits denoiser, the metrics classifier and the Frechet-distance reference set must all
agree on which images are held out, or the "real data floor" and the classifier accuracy would be measured on
images a network was trained on. Everything reads the split from `digits_split()` below.

The images ship with scikit-learn (no network). Pixels 0..16 are mapped to [-1, 1] by `x / 8 - 1`, the range
the EDM preconditioning (sigma_data = 0.5) is tuned for.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DIGITS_SHAPE",
    "SPLIT_SEED",
    "N_HELDOUT",
    "DigitsSplit",
    "digits_split",
]

DIGITS_SHAPE: tuple[int, int, int] = (1, 8, 8)
"""Shape of one image (channels, height, width)."""

SPLIT_SEED = 0
"""Seed of the permutation that defines the split. Changing it invalidates the shipped weights' cards."""

N_HELDOUT = 297
"""Held-out images (the rest, 1,500 of 1,797, are for training)."""

_PIXEL_MAX = 16.0


@dataclass(frozen=True)
class DigitsSplit:
    """Images as float32 tensors [N, 1, 8, 8] in [-1, 1] and integer labels [N]."""

    train_x: Tensor
    train_y: Tensor
    heldout_x: Tensor
    heldout_y: Tensor

    def describe(self) -> dict[str, object]:
        """A JSON-ready description for model cards (so a card says exactly which data it was trained on)."""
        return {
            "source": "sklearn.datasets.load_digits (bundled, 1797 images 8x8, pixels 0..16)",
            "scaling": "x / 8 - 1 -> [-1, 1]",
            "split_seed": SPLIT_SEED,
            "n_train": int(self.train_x.shape[0]),
            "n_heldout": int(self.heldout_x.shape[0]),
            "split": "numpy.random.default_rng(split_seed).permutation(1797); first n_heldout are held out",
        }


@lru_cache(maxsize=1)
def _split_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # local import: keeps `import fewstep_search` cheap

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / (_PIXEL_MAX / 2) - 1.0
    labels = np.asarray(bunch.target, dtype=np.int64)
    perm = np.random.default_rng(SPLIT_SEED).permutation(images.shape[0])
    return images[:, None, :, :], labels, perm


def digits_split() -> DigitsSplit:
    """The fixed, seeded split: 1,500 training and 297 held-out digits (fresh tensors on each call).

    Example:
        >>> s = digits_split(); s.train_x.shape, s.heldout_x.shape
        (torch.Size([1500, 1, 8, 8]), torch.Size([297, 1, 8, 8]))
    """
    images, labels, perm = _split_arrays()
    held, train = perm[:N_HELDOUT], perm[N_HELDOUT:]
    return DigitsSplit(
        train_x=torch.from_numpy(images[train].copy()),
        train_y=torch.from_numpy(labels[train].copy()),
        heldout_x=torch.from_numpy(images[held].copy()),
        heldout_y=torch.from_numpy(labels[held].copy()),
    )
