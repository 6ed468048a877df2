"""Sample-quality metrics (classifier, Frechet distance, confidence) and the sample-grid writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fewstep_search.data import digits_split
from fewstep_search.metrics import (
    classifier_card,
    classifier_from_file,
    frechet_distance,
    frechet_distance_from_stats,
    heldout_accuracy,
    load_classifier,
    mean_confidence,
    real_data_floor,
    sample_quality,
)
from fewstep_search.models.digits import WeightsFileError
from fewstep_search.pictures import grid_size, save_sample_grid


def test_classifier_accuracy_on_heldout() -> None:
    clf = load_classifier()
    assert not clf.training
    acc = heldout_accuracy()
    assert acc >= 0.97
    assert acc == pytest.approx(classifier_card()["metrics"]["heldout_accuracy"], abs=1e-4)


def test_fd_of_set_with_itself_is_zero() -> None:
    held = digits_split().heldout_x
    assert frechet_distance(held) == pytest.approx(0.0, abs=1e-6)
    x = digits_split().train_x[:400]
    assert frechet_distance(x, reference=x) == pytest.approx(0.0, abs=1e-6)


def test_fd_grows_with_noise() -> None:
    held = digits_split().heldout_x
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(held.shape, generator=g)
    fds = [frechet_distance(held + s * eps) for s in (0.0, 0.1, 0.3, 1.0)]
    assert all(a < b for a, b in zip(fds, fds[1:], strict=False)), fds
    assert real_data_floor() == pytest.approx(classifier_card()["metrics"]["fd_train_vs_heldout"], rel=1e-3)
    # Noise also makes the classifier less sure.
    assert mean_confidence(held + 1.0 * eps) < mean_confidence(held)


def test_fd_matches_closed_form_for_diagonal_gaussians() -> None:
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([4.0, 1.0, 0.25])
    expected = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum())
    assert frechet_distance_from_stats(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="shape"):
        frechet_distance_from_stats(mu1, np.diag(v1), mu2[:2], np.diag(v2[:2]))


def test_sample_quality_of_real_digits() -> None:
    held = digits_split().heldout_x
    q = sample_quality(held)
    assert q.n == held.shape[0] and sum(q.class_counts) == q.n and len(q.class_counts) == 10
    assert q.fd == pytest.approx(0.0, abs=1e-6) and q.confidence > 0.9
    assert min(q.class_counts) > 15  # every digit is present in the held-out split
    with pytest.raises(ValueError, match=r"\[N, 1, 8, 8\]"):
        sample_quality(torch.zeros(10, 64))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(torch.full((10, 1, 8, 8), float("nan")))


def test_classifier_bad_file_names_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsFileError, match="missing.safetensors.*not found"):
        classifier_from_file(tmp_path / "missing.safetensors")


def test_pretrain_classifier_writes_loadable_weights(tmp_path: Path) -> None:
    from fewstep_search.pretrain import pretrain_classifier

    path = pretrain_classifier(out_dir=tmp_path, epochs=1, progress=False)
    clf = classifier_from_file(path)  # config read back from the file's metadata
    assert 0.0 <= heldout_accuracy(clf) <= 1.0
    assert (tmp_path / "digits_classifier.json").is_file()


def test_sample_grid_png(tmp_path: Path) -> None:
    from PIL import Image

    split = digits_split()
    rows = {"real": split.heldout_x[:10], "noisy": split.heldout_x[:7] + 0.3 * torch.randn(7, 1, 8, 8)}
    path = save_sample_grid(tmp_path / "sub" / "grid.png", rows, max_cols=8, scale=5, pad=3, label_width=60)
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG" and im.mode == "L"
        assert im.size == grid_size(n_rows=2, n_cols=8, image_hw=(8, 8), scale=5, pad=3, label_width=60)
        # A real digit's background pixel (-1) is black, the padding white.
        assert im.getpixel((60 + 3, 3)) == 0 and im.getpixel((0, 0)) == 255
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no temp file left behind
    with pytest.raises(ValueError, match="share one image shape"):
        save_sample_grid(tmp_path / "bad.png", {"a": torch.zeros(2, 1, 8, 8), "b": torch.zeros(2, 1, 4, 4)})
    with pytest.raises(ValueError, match="empty"):
        save_sample_grid(tmp_path / "bad.png", {})
