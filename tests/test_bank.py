from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fewstep_search.bank import BankMismatchError, BankPlan, build_bank, estimate_bank_bytes, load_bank
from fewstep_search.bank.memory import refuse_if_too_big
from fewstep_search.denoiser import ModelOutputError
from fewstep_search.solvers import get_solver


def test_bank_contents_match_an_independent_reference_solve(bank8, mixture8) -> None:
    k, m = bank8.n_trajectories, bank8.grid.numel()
    assert bank8.denoised.shape == (k, m, 8) and bank8.phi.shape == (k, m) and bank8.states.shape == (k, m, 8)
    # the reference end point is the clean x*(0): the accurate solve to sigma_min, then the step into 0
    end = get_solver("reference")(mixture8, bank8.x_start, torch.cat([bank8.grid, bank8.grid.new_zeros(1)]), substeps=4)
    assert float((end - bank8.x_end).norm() / end.norm()) < 1e-4  # coarse test grid: 48 cells x 2 sub-steps
    torch.testing.assert_close(bank8.denoised[:, 5], mixture8(bank8.states[:, 5], bank8.grid[5].expand(k)))


def test_three_disjoint_sets_with_the_requested_sizes(bank8) -> None:
    sets = {name: set(bank8.indices(name).tolist()) for name in ("fit", "select", "test")}
    assert sets["fit"].isdisjoint(sets["select"]) and sets["fit"].isdisjoint(sets["test"])
    assert sets["select"].isdisjoint(sets["test"])
    assert sum(len(s) for s in sets.values()) == bank8.n_trajectories
    assert bank8.sizes() == {"fit": 32, "select": 16, "test": 16}
    assert bank8.test().n_trajectories == 16 and bool((bank8.test().split == 2).all())


def test_split_and_starts_do_not_move_with_probes_or_chunking(mixture8) -> None:
    kw = dict(shape=(8,), sigma_min=0.002, sigma_max=80.0, n_trajectories=12, grid_size=12)
    a = build_bank(mixture8, probes=1, batch_size=12, **kw)
    b = build_bank(mixture8, probes=3, batch_size=5, **kw)
    assert torch.equal(a.split, b.split)
    assert torch.equal(a.x_start, b.x_start)
    torch.testing.assert_close(a.x_end, b.x_end)  # the same trajectories, solved in other chunks
    c = build_bank(mixture8, probes=1, batch_size=5, **kw)
    torch.testing.assert_close(a.phi, c.phi)  # same probes per trajectory, whatever the chunk
    d = build_bank(mixture8, probes=1, batch_size=12, seed=1, **kw)
    assert not torch.equal(a.split, d.split) and not torch.equal(a.x_start, d.x_start)


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
    assert (path.stat().st_mode & 0o777) == 0o644
    back = load_bank(path, expect={"model_id": "mixture8", "sigma_max": 80.0, "shape": [8]})
    for name in ("grid", "x_start", "x_end", "denoised", "phi", "states", "split"):
        assert torch.equal(getattr(back, name), getattr(bank8, name)), name
    assert back.meta["grid_size"] == 48 and back.meta["split_sizes"] == bank8.sizes()
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


def test_projection_bounds_the_distance_distortion() -> None:
    """Johnson-Lindenstrauss: with r = 256 every pairwise distance of grid outputs is kept within 25%."""
    gen = torch.Generator().manual_seed(0)
    dirs = torch.randn(6, 4096, generator=gen, dtype=torch.float64)

    def den(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:  # outputs move through a 6-D subspace
        w = torch.stack([torch.cos(k * torch.log(sigma)) for k in range(6)], 1)
        return (w @ dirs).to(x) + 0.01 * x

    kw = dict(shape=(4096,), sigma_min=0.01, sigma_max=10.0, n_trajectories=4, grid_size=16, keep_states=False)
    full = build_bank(den, **kw)
    small = build_bank(den, project_dim=256, store_float16=True, **kw)
    assert small.denoised.dtype == torch.float16 and small.denoised.shape[-1] == 256 and small.states is None
    d_full = torch.cdist(full.denoised.double(), full.denoised.double())
    d_small = torch.cdist(small.denoised.double(), small.denoised.double())
    off = d_full > 1e-6
    ratio = d_small[off] / d_full[off]
    assert float(ratio.min()) > 0.75 and float(ratio.max()) < 1.25
    assert abs(float(ratio.mean()) - 1.0) < 0.05


def test_nan_from_the_model_is_a_clear_error() -> None:
    def broken(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return torch.where(sigma[:, None] < 1.0, torch.nan, 0.0) * x

    with pytest.raises(ModelOutputError, match="NaN/inf at sigma="):
        build_bank(broken, shape=(2,), sigma_min=0.01, sigma_max=10.0, n_trajectories=4, grid_size=16)


def test_bad_bank_arguments() -> None:
    with pytest.raises(ValueError, match="sigma_min must be <"):
        build_bank(lambda x, s: x, shape=(2,), sigma_min=1.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="n_trajectories"):
        build_bank(lambda x, s: x, shape=(2,), sigma_min=0.1, sigma_max=1.0, n_trajectories=2)
    with pytest.raises(ValueError, match="leave trajectories to fit"):
        build_bank(lambda x, s: x, shape=(2,), sigma_min=0.1, sigma_max=1.0, select_fraction=0.5, test_fraction=0.5)


def test_a_bank_too_big_for_the_machine_is_refused_before_any_work() -> None:
    plan = BankPlan(shape=(4, 128, 128), sigma_min=0.002, sigma_max=80.0, n_trajectories=1024, grid_size=256,
                    keep_states=False)
    need = estimate_bank_bytes(plan, chunk=8)["total"]
    assert need > 16 * 2**30  # full-size outputs: K x M x d float64
    with pytest.raises(MemoryError, match="project_dim"):
        refuse_if_too_big(plan, chunk=8, available=8 * 2**30)
    small = BankPlan(shape=(4, 128, 128), sigma_min=0.002, sigma_max=80.0, n_trajectories=1024, grid_size=256,
                     keep_states=False, project_dim=256, store_float16=True, dtype="float32")
    assert estimate_bank_bytes(small, chunk=8)["total"] < 2 * 2**30
    refuse_if_too_big(small, chunk=8, available=8 * 2**30)


def test_the_default_chunk_bounds_a_large_models_working_set() -> None:
    """d = 16384, K = 1024, M = 256: a chunk of 64 would hold 4 GiB of states; the default stays under 512 MiB."""
    from fewstep_search.bank.memory import chunk_bytes, default_chunk

    big = BankPlan(shape=(4, 64, 64), sigma_min=0.002, sigma_max=80.0, n_trajectories=1024, grid_size=256,
                   dtype="float32", project_dim=256, store_float16=True, keep_states=False)
    chunk = default_chunk(big)
    assert 1 <= chunk < 64 and chunk_bytes(big, chunk) <= 512 * 2**20
    assert estimate_bank_bytes(big, chunk=chunk)["total"] < 1 * 2**30
    small = BankPlan(shape=(8,), sigma_min=0.002, sigma_max=80.0, n_trajectories=100, grid_size=48)
    assert default_chunk(small) == 64


def test_chunks_assemble_in_any_order_and_gaps_are_refused(mixture8) -> None:
    from fewstep_search.bank.build import assemble, solve_chunk

    plan = BankPlan(shape=(8,), sigma_min=0.002, sigma_max=80.0, n_trajectories=9, grid_size=8, substeps=1)
    parts = [solve_chunk(mixture8, plan, lo, hi) for lo, hi in ((4, 9), (0, 4))]
    bank = assemble(plan, parts)
    ref = build_bank(mixture8, shape=(8,), sigma_min=0.002, sigma_max=80.0, n_trajectories=9, grid_size=8,
                     substeps=1, batch_size=9)
    torch.testing.assert_close(bank.denoised, ref.denoised)
    torch.testing.assert_close(bank.states, ref.states)
    with pytest.raises(ValueError, match="gap or overlap at 0"):
        assemble(plan, parts[:1])


def test_a_shared_bank_travels_out_of_band_and_is_rebuilt_without_a_copy(bank8) -> None:
    """What Ray does with the bank of a Tune search (pickle protocol 5 with out-of-band buffers): the arrays
    travel as buffers, not inside the pickle, and the rebuilt bank's tensors are views of those buffers."""
    import pickle

    from fewstep_search.bank.shared import SharedBank

    buffers: list[pickle.PickleBuffer] = []
    payload = pickle.dumps(SharedBank.of(bank8), protocol=5, buffer_callback=buffers.append)
    assert len(payload) < bank8.denoised.numel() * bank8.denoised.element_size()  # the data is not in the pickle
    raw = [bytearray(b.raw()) for b in buffers]  # stands for the object store's shared memory
    back = pickle.loads(payload, buffers=raw).bank()
    for name in ("grid", "x_start", "x_end", "denoised", "phi", "split"):
        torch.testing.assert_close(getattr(back, name), getattr(bank8, name), rtol=0, atol=0)
    assert any(back.denoised.data_ptr() == torch.frombuffer(r, dtype=torch.uint8).data_ptr() for r in raw if r)
    assert back.meta == bank8.meta and back.sizes() == bank8.sizes()


def test_a_students_bank_recomputes_outputs_in_bounded_calls_on_a_fit_subsample(mixture8) -> None:
    from fewstep_search.bank.student import student_bank

    bank = build_bank(mixture8, shape=(8,), sigma_min=0.002, sigma_max=80.0, n_trajectories=48, grid_size=24,
                      keep_states=True, model_id="mixture8")
    calls: list[int] = []

    def counted(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return mixture8(x, sigma)

    whole = student_bank(bank, counted, model_id="again", samples_per_call=100)
    assert whole is not None and max(calls) <= 100 and sum(calls) == 48 * 24
    torch.testing.assert_close(whole.denoised, bank.denoised, rtol=1e-6, atol=1e-9)  # the teacher is its own student
    assert whole.meta["outputs_of"] == "again"
    cut = student_bank(bank, mixture8, model_id="cut", max_fit=5)
    assert cut is not None
    sizes, full = cut.sizes(), bank.sizes()
    assert sizes == {"fit": 5, "select": full["select"], "test": full["test"]}
    kept = [i for i in range(48) if any(torch.equal(bank.x_start[i], row) for row in cut.x_start)]
    torch.testing.assert_close(cut.denoised, bank.denoised[kept], rtol=1e-6, atol=1e-9)
    assert student_bank(bank.lean(), mixture8, model_id="x") is None


def test_the_fit_subsample_barely_moves_the_bound_dp_schedule(mixture8) -> None:
    """What `STUDENT_MAX_FIT` costs: the B_w-DP schedule from 256 of 512 fit trajectories against the one from
    all 512, compared by true error on the test trajectories (docs/scale.md quotes this test: the same E at
    N = 6, +4% at N = 10, +11.5% at N = 4, where B_w's grid DP flips between two near-tied schedules)."""
    from fewstep_search.bank.student import STUDENT_MAX_FIT, student_bank
    from fewstep_search.dp import dp_optimal
    from fewstep_search.objectives import grid_cost_matrix, true_error

    bank = build_bank(mixture8, shape=(8,), sigma_min=0.002, sigma_max=80.0, n_trajectories=1024, grid_size=48,
                      keep_states=True, model_id="mixture8")
    sub = student_bank(bank, mixture8, model_id="sub")
    assert sub is not None and sub.sizes()["fit"] == STUDENT_MAX_FIT < bank.sizes()["fit"]
    test = bank.test()
    errors = {}
    for name, b in (("all", bank), ("sub", sub)):
        for nfe in (4, 6, 10):
            idx, _ = dp_optimal(grid_cost_matrix(b.fit(), "bw"), nfe)
            errors[name, nfe] = float(true_error(mixture8, test, b.grid[torch.as_tensor(idx)]))
    for nfe in (4, 6, 10):
        assert errors["sub", nfe] <= 1.15 * errors["all", nfe], errors
