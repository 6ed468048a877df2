"""Sample quality on the built-in digits: Frechet distance in a small classifier's feature space, confidence.

Why a project-trained classifier rather than Inception: 8x8 digits are far outside Inception's domain, and a
network trained on the same data (train split only, fixed seed, shipped as safetensors) gives a feature space
where distances mean "looks like a digit of the right kind". The Frechet distance (FD) is FID's formula,
    FD = ||mu_1 - mu_2||^2 + tr(C_1 + C_2 - 2 (C_1 C_2)^{1/2}),
on the classifier's penultimate features, against the held-out real digits (`fewstep_search.data`).
FD is biased upward for small sample counts, so compare FDs computed with the same N; the "real data floor"
(train split vs held-out split, `real_data_floor()`) shows what real digits score.
Confidence is the mean max-softmax probability: low when samples are ambiguous blobs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from torch import Tensor, nn

from fewstep_search.data import DIGITS_SHAPE, digits_split
from fewstep_search.models.digits import WeightsFileError, load_state_checked, read_weights

__all__ = [
    "ClassifierConfig",
    "DigitsClassifier",
    "SampleQuality",
    "load_classifier",
    "classifier_from_file",
    "classifier_card",
    "features",
    "feature_stats",
    "frechet_distance",
    "frechet_distance_from_stats",
    "mean_confidence",
    "heldout_accuracy",
    "real_data_floor",
    "sample_quality",
]

CLASSIFIER_ASSET = "digits_classifier.safetensors"
CLASSIFIER_CARD_ASSET = "digits_classifier.json"
_BATCH = 1024
_IMAG_TOL = 1e-3
"""Largest imaginary part of sqrtm(C1 C2), relative to its norm, treated as round-off (as in pytorch-fid)."""


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture of `DigitsClassifier`: conv widths (8x8, pooled to 4x4, 2x2), feature width."""

    widths: tuple[int, ...] = (32, 64, 64)
    feature_dim: int = 64
    n_classes: int = 10

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> ClassifierConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown ClassifierConfig keys {sorted(unknown)}")
        kw = dict(d)
        if "widths" in kw:
            kw["widths"] = tuple(int(w) for w in kw["widths"])  # type: ignore[union-attr]
        return cls(**kw)  # type: ignore[arg-type]


class DigitsClassifier(nn.Module):
    """Small CNN for [B, 1, 8, 8] digits in [-1, 1]: conv blocks with 2x max-pooling, then a feature layer.

    `features(x)` gives the penultimate pre-activations [B, feature_dim] the FD is computed in; `forward` the
    logits.
    """

    def __init__(self, config: ClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or ClassifierConfig()
        layers: list[nn.Module] = []
        c_in, side = DIGITS_SHAPE[0], DIGITS_SHAPE[1]
        for i, w in enumerate(config.widths):
            layers += [nn.Conv2d(c_in, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
            if i > 0:
                layers.append(nn.MaxPool2d(2))
                side //= 2
            c_in = w
        self.conv = nn.Sequential(*layers)
        self.feat = nn.Sequential(nn.Flatten(), nn.Linear(c_in * side * side, config.feature_dim))
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(config.feature_dim, config.n_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate layer before its ReLU: dead ReLU units would make the feature covariance singular."""
        return self.feat(self.conv(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.drop(nn.functional.relu(self.features(x))))


def _asset(name: str) -> Path:
    return Path(str(resources.files("fewstep_search") / "assets" / name))


def classifier_card() -> dict[str, object]:
    """The JSON card of the shipped classifier (architecture, training, held-out accuracy, data floor)."""
    return json.loads(_asset(CLASSIFIER_CARD_ASSET).read_text())


def classifier_from_file(path: str | Path, *, config: ClassifierConfig | None = None) -> DigitsClassifier:
    """Load classifier weights (safetensors); the architecture from `config`, else the file's metadata.

    Raises `WeightsFileError` naming the file for a missing, unreadable or mismatched file.
    """
    state, meta = read_weights(path)
    if config is None:
        try:
            config = ClassifierConfig.from_dict(json.loads(meta.get("fewstep_search.config", "{}")))
        except (ValueError, TypeError) as err:
            raise WeightsFileError(f"{path}: bad architecture config in metadata ({err})") from err
    with torch.device("cpu"):  # metrics run on the CPU, whatever torch's default device is
        model = DigitsClassifier(config)
    load_state_checked(model, state, path)
    return model.eval()


@lru_cache(maxsize=1)
def load_classifier() -> DigitsClassifier:
    """The shipped classifier (CPU, eval mode), loaded once per process. Do not modify the returned module."""
    card = classifier_card()
    config = ClassifierConfig.from_dict(card["architecture"])  # type: ignore[arg-type]
    return classifier_from_file(_asset(CLASSIFIER_ASSET), config=config)


def _check_images(x: Tensor) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != DIGITS_SHAPE:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"expected digit images of shape [N, 1, 8, 8], got {got}")
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 images for feature statistics, got {x.shape[0]}")
    if not torch.isfinite(x).all():
        raise ValueError("images contain NaN/inf")
    return x


@torch.no_grad()
def _apply(fn_name: str, x: Tensor, classifier: DigitsClassifier | None) -> Tensor:
    """Run the classifier in batches on clamped float32 CPU images (real data lies in [-1, 1])."""
    clf = classifier if classifier is not None else load_classifier()
    x = _check_images(x).detach().to("cpu", torch.float32).clamp(-1.0, 1.0)
    fn = getattr(clf, fn_name)
    return torch.cat([fn(x[i : i + _BATCH]) for i in range(0, x.shape[0], _BATCH)])


def features(x: Tensor, *, classifier: DigitsClassifier | None = None) -> Tensor:
    """Penultimate classifier features [N, feature_dim] of images [N, 1, 8, 8] in [-1, 1]."""
    return _apply("features", x, classifier)


def feature_stats(x: Tensor, *, classifier: DigitsClassifier | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of the features, float64 (FD subtracts nearly equal numbers)."""
    f = features(x, classifier=classifier).numpy().astype(np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance_from_stats(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """FD between two Gaussians, via scipy.linalg.sqrtm of C1 C2.

    sqrtm of a product of two PSD matrices is real in exact arithmetic; round-off gives tiny imaginary parts
    (dropped) and, for near-singular covariances, non-finite results (retried with a small ridge, as
    pytorch-fid does). An imaginary part that is not tiny means the statistics are broken, and raises.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape:
        raise ValueError(f"statistics differ in shape: {mu1.shape}/{cov1.shape} vs {mu2.shape}/{cov2.shape}")
    covmean = scipy.linalg.sqrtm(cov1 @ cov2)
    if not np.isfinite(covmean).all():
        ridge = 1e-6 * np.eye(cov1.shape[0])
        covmean = scipy.linalg.sqrtm((cov1 + ridge) @ (cov2 + ridge))
    if np.iscomplexobj(covmean):
        scale = max(float(np.abs(covmean).max()), 1e-12)
        if float(np.abs(covmean.imag).max()) > _IMAG_TOL * scale:
            raise ValueError(
                f"sqrtm(C1 C2) has a large imaginary part ({np.abs(covmean.imag).max():.3g}); "
                "the feature statistics are degenerate (too few samples?)"
            )
        covmean = covmean.real
    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(covmean))
    return max(fd, 0.0)  # round-off can give -1e-12 for identical sets


@lru_cache(maxsize=1)
def _heldout_stats() -> tuple[np.ndarray, np.ndarray]:
    return feature_stats(digits_split().heldout_x)


def frechet_distance(
    samples: Tensor, *, reference: Tensor | None = None, classifier: DigitsClassifier | None = None
) -> float:
    """FD between `samples` [N, 1, 8, 8] (model space, [-1, 1]) and `reference` (default: held-out digits).

    Example:
        >>> from fewstep_search.data import digits_split
        >>> round(frechet_distance(digits_split().heldout_x), 6)
        0.0
    """
    mu1, cov1 = feature_stats(samples, classifier=classifier)
    if reference is None and classifier is None:
        mu2, cov2 = _heldout_stats()
    else:
        ref = digits_split().heldout_x if reference is None else reference
        mu2, cov2 = feature_stats(ref, classifier=classifier)
    return frechet_distance_from_stats(mu1, cov1, mu2, cov2)


def mean_confidence(samples: Tensor, *, classifier: DigitsClassifier | None = None) -> float:
    """Mean max-softmax probability of the classifier on `samples` (1.0 = every sample is a clear digit)."""
    logits = _apply("forward", samples, classifier).double()
    return float(torch.softmax(logits, dim=1).max(dim=1).values.mean())


def heldout_accuracy(classifier: DigitsClassifier | None = None) -> float:
    """Accuracy of the classifier on the held-out split (the shipped one scores >= 0.97)."""
    split = digits_split()
    pred = _apply("forward", split.heldout_x, classifier).argmax(dim=1)
    return float((pred == split.heldout_y).double().mean())


def real_data_floor(classifier: DigitsClassifier | None = None) -> float:
    """FD of the real train split against the held-out split: what real digits score (the floor to aim at)."""
    return frechet_distance(digits_split().train_x, classifier=classifier)


@dataclass(frozen=True)
class SampleQuality:
    """Quality of a set of generated digits against the held-out real ones.

    fd: Frechet distance in classifier feature space (lower is better; compare at equal n).
    confidence: mean max-softmax probability (higher is better).
    class_counts: samples per predicted class, to spot missing digits (mode collapse).
    n: number of samples.
    """

    fd: float
    confidence: float
    class_counts: tuple[int, ...]
    n: int

    def to_dict(self) -> dict[str, object]:
        return {
            "fd": self.fd,
            "confidence": self.confidence,
            "class_counts": list(self.class_counts),
            "n": self.n,
        }


def sample_quality(samples: Tensor, *, classifier: DigitsClassifier | None = None) -> SampleQuality:
    """FD against held-out real digits, mean confidence, predicted-class counts of `samples` [N, 1, 8, 8]."""
    logits = _apply("forward", samples, classifier).double()
    probs = torch.softmax(logits, dim=1)
    counts = torch.bincount(probs.argmax(dim=1), minlength=probs.shape[1])
    return SampleQuality(
        fd=frechet_distance(samples, classifier=classifier),
        confidence=float(probs.max(dim=1).values.mean()),
        class_counts=tuple(int(c) for c in counts),
        n=int(samples.shape[0]),
    )
