from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fewstep_search.bank import BankMismatchError, build_bank, load_bank
from fewstep_search.models.base import ModelOutputError
from fewstep_search.solvers import get_solver


def test_bank_contents_match_an_independent_reference_solve(bank8, mixture8) -> None:
    k, m = bank8.n_trajectories, bank8.grid.numel()
    assert bank8.denoised.shape == (k, m, 8) and bank8.phi.shape == (k, m) and bank8.states.shape == (k, m, 8)
    assert set(bank8.fit_idx.tolist()).isdisjoint(bank8.heldout_idx.tolist())
    assert len(bank8.fit_idx) + len(bank8.heldout_idx) == k
    end = get_solver("reference")(mixture8, bank8.x_start, bank8.grid, substeps=4)
    assert float((end - bank8.x_end).norm() / end.norm()) < 1e-4  # coarse test grid: 48 cells x 2 sub-steps
    torch.testing.assert_close(bank8.denoised[:, 5], mixture8(bank8.states[:, 5], bank8.grid[5].expand(k)))


def test_gain_is_one_at_sigma_min_and_tracks_the_linear_flow() -> None:
    """For a denoiser that ignores x the flow is x(sigma_0) = (sigma_0/sigma) x + const: phi = sigma_0/sigma."""

    def const(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return torch.tanh(torch.log(sigma))[:, None].expand_as(x) * 0.5

    b = build_bank(const, shape=(3,), sigma_min=0.01, sigma_max=10.0, n_trajectories=8, grid_size=40, gain_substeps=4)
    torch.testing.assert_close(b.phi[:, -1], torch.ones(8, dtype=torch.float64))
    expect = (0.01 / b.grid).expand(8, -1)
    torch.testing.assert_close(b.phi, expect, rtol=1e-5, atol=0)


def test_save_load_roundtrip_and_metadata_check(bank8, tmp_path: Path) -> None:
    path = bank8.save(tmp_path / "b.safetensors")
    back = load_bank(path, expect={"model_id": "mixture8", "sigma_max": 80.0, "shape": [8]})
    for name in ("grid", "x_start", "x_end", "denoised", "phi", "states", "fit_idx", "heldout_idx"):
        assert torch.equal(getattr(back, name), getattr(bank8, name)), name
    assert back.meta["grid_size"] == 48
    with pytest.raises(BankMismatchError, match="model_id='mixture8'.*'other'"):
        load_bank(path, expect={"model_id": "other"})
    with pytest.raises(BankMismatchError, match="sigma_max"):
        load_bank(path, expect={"sigma_max": 1.0})


def test_load_rejects_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_bank(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="could not be read"):
        load_bank(bad)


def test_compressed_bank_preserves_distances(mixture8) -> None:
    kw = dict(shape=(8,), sigma_min=0.002, sigma_max=80.0, n_trajectories=16, grid_size=24)
    full = build_bank(mixture8, **kw)
    small = build_bank(mixture8, store_float16=True, project_dim=6, keep_states=False, **kw)
    assert small.denoised.dtype == torch.float16 and small.denoised.shape[-1] == 6 and small.states is None
    d_full = torch.cdist(full.denoised.double(), full.denoised.double())
    d_small = torch.cdist(small.denoised.double(), small.denoised.double())
    ratio = (d_small.sum() / d_full.sum()).item()
    assert 0.5 < ratio < 1.5  # JL keeps distances on average (6 of 8 dims: loose)


def test_nan_from_the_model_is_a_clear_error() -> None:
    def broken(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return torch.where(sigma[:, None] < 1.0, torch.nan, 0.0) * x

    with pytest.raises(ModelOutputError, match="NaN/inf at sigma="):
        build_bank(broken, shape=(2,), sigma_min=0.01, sigma_max=10.0, n_trajectories=4, grid_size=16)


def test_bad_bank_arguments() -> None:
    with pytest.raises(ValueError, match="sigma_min must be <"):
        build_bank(lambda x, s: x, shape=(2,), sigma_min=1.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="n_trajectories"):
        build_bank(lambda x, s: x, shape=(2,), sigma_min=0.1, sigma_max=1.0, n_trajectories=1)
