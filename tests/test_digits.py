"""The built-in digits denoiser: shipped weights load and meet the Denoiser contract; bad files fail."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fewstep_search.data import DIGITS_SHAPE, N_HELDOUT, digits_split
from fewstep_search.denoiser import CheckedDenoiser, Denoiser
from fewstep_search.models.digits import (
    DigitsNetConfig,
    DigitsUNet,
    EDMDenoiser,
    WeightsFileError,
    from_file,
    load_digits,
    shipped_card,
)

TINY = DigitsNetConfig(channels=(8, 16), blocks=1, emb_dim=16, dropout=0.0)


@pytest.fixture(scope="module")
def model() -> EDMDenoiser:
    return load_digits()


def test_split_is_fixed_and_disjoint() -> None:
    a, b = digits_split(), digits_split()
    assert a.train_x.shape == (1797 - N_HELDOUT, *DIGITS_SHAPE) and a.heldout_x.shape == (
        N_HELDOUT,
        *DIGITS_SHAPE,
    )
    assert torch.equal(a.heldout_x, b.heldout_x) and torch.equal(a.train_y, b.train_y)
    assert float(a.train_x.min()) == -1.0 and float(a.train_x.max()) == 1.0
    train_rows = {tuple(r.tolist()) for r in a.train_x.flatten(1)}
    overlap = sum(tuple(r.tolist()) in train_rows for r in a.heldout_x.flatten(1))
    assert overlap <= 3  # load_digits has a few exact duplicate images; the split itself is by index


def test_shipped_model_satisfies_contract(model: EDMDenoiser) -> None:
    assert isinstance(model, Denoiser) and not model.training
    assert (model.sigma_min, model.sigma_max, model.prediction_type) == (0.002, 80.0, "x0")
    card = shipped_card()
    assert card["sigma_min"] == 0.002 and card["sigma_max"] == 80.0
    checked = CheckedDenoiser(model, name="digits")
    assert checked.sigma_max == 80.0
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for dtype in (torch.float32, torch.float64):
            for s in (0.002, 0.1, 1.0, 80.0):
                x = (digits_split().heldout_x[:5] + s * torch.randn(5, *DIGITS_SHAPE, generator=g)).to(dtype)
                out = checked(x, torch.full((5,), s, dtype=dtype))
                assert out.shape == x.shape and out.dtype == dtype and torch.isfinite(out).all()


def test_denoiser_limits(model: EDMDenoiser) -> None:
    x0 = digits_split().heldout_x[:8].double()
    with torch.no_grad():
        # At sigma -> 0 the EDM skip path dominates: D(x, 0) = x exactly, D(x, sigma_min) ~ x.
        assert torch.equal(model(x0, torch.zeros(8, dtype=torch.float64)), x0)
        assert torch.allclose(model(x0, torch.full((8,), 0.002, dtype=torch.float64)), x0, atol=0.02)
        # A scalar sigma is broadcast over the batch.
        assert torch.allclose(model(x0, torch.tensor(0.5)), model(x0, torch.full((8,), 0.5)))
        # At moderate noise the model actually denoises (closer to x0 than the noisy input).
        noisy = x0 + 0.5 * torch.randn_like(x0)
        d = model(noisy, torch.full((8,), 0.5, dtype=torch.float64))
        assert (d - x0).norm() < 0.5 * (noisy - x0).norm()
    with pytest.raises(ValueError, match="sigma must have shape"):
        model(x0, torch.ones(3))


def test_missing_file_names_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.safetensors"
    with pytest.raises(WeightsFileError, match="nope.safetensors.*not found"):
        from_file(path)


def test_corrupt_file_names_file(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(b"\x00\x01definitely not safetensors" * 10)
    with pytest.raises(WeightsFileError, match="corrupt.safetensors.*not a readable safetensors"):
        from_file(path)


def test_wrong_shapes_name_file_and_tensor(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file(DigitsUNet(TINY).state_dict(), str(path))  # no metadata: loader assumes the shipped architecture
    with pytest.raises(WeightsFileError, match="other.safetensors.*(wrong shapes|missing tensors)"):
        from_file(path)
    with pytest.raises(WeightsFileError, match="other.safetensors.*missing tensors"):
        from_file(path, config=DigitsNetConfig(channels=(8, 16, 16), blocks=1, emb_dim=16))


def test_self_describing_file_round_trip(tmp_path: Path) -> None:
    from fewstep_search.pretrain import _save_weights

    torch.manual_seed(3)
    net = DigitsUNet(TINY)
    torch.nn.init.normal_(net.out.weight, std=0.1)  # the output layer starts at zero; make outputs non-trivial
    path = tmp_path / "tiny.safetensors"
    _save_weights(path, net, TINY.to_dict(), dtype=torch.float32)
    loaded = from_file(path)
    assert loaded.net.config == TINY and not loaded.training
    x, s = torch.randn(4, *DIGITS_SHAPE), torch.full((4,), 1.3)
    with torch.no_grad():
        assert torch.equal(loaded(x, s), EDMDenoiser(net.eval())(x, s))


def test_pretrain_is_deterministic(tmp_path: Path) -> None:
    from fewstep_search.pretrain import pretrain_digits

    paths = [
        pretrain_digits(out_dir=tmp_path / name, steps=3, batch_size=16, config=TINY, progress=False)
        for name in ("a", "b")
    ]
    assert paths[0].read_bytes() == paths[1].read_bytes()
    model = from_file(paths[0])  # architecture read back from the file's metadata
    assert model.net.config == TINY
    assert (tmp_path / "a" / "digits.json").is_file()
    with pytest.raises(ValueError, match="steps"):
        pretrain_digits(out_dir=tmp_path / "c", steps=0, progress=False)
