"""Shared fixtures: small exact models and banks, built once per session (the banks are the slow part)."""

from __future__ import annotations

import pytest
import torch

from fewstep_search.bank import Bank, build_bank
from fewstep_search.models.mixture import GaussianMixture, builtin_mixture

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


@pytest.fixture(scope="session")
def mixture2() -> GaussianMixture:
    return builtin_mixture(dim=2, seed=0)


@pytest.fixture(scope="session")
def mixture8() -> GaussianMixture:
    return GaussianMixture.random(8, n_components=6, seed=1)


@pytest.fixture(scope="session")
def bank8(mixture8: GaussianMixture) -> Bank:
    return build_bank(mixture8, shape=(8,), sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, n_trajectories=64,
                      grid_size=48, seed=0, model_id="mixture8")


# Tests use small tensors: one intra-op thread avoids oversubscribing CI's 2 cores (Ray workers, pytest).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
