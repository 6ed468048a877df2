"""The bank built as shards by Ray workers: the same bank as `build_bank`, resumable, refusing foreign shards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fewstep_search.bank import BankPlan, build_bank
from fewstep_search.bank_shards import (
    ShardedStates,
    ShardMismatchError,
    assemble_from_shards,
    build_bank_sharded,
    build_shards,
    finished_shards,
    shard_path,
    solve_shard,
)
from fewstep_search.denoiser import ModelOutputError
from fewstep_search.models.mixture import GaussianMixture
from fewstep_search.models.source import ModelSource

KW = dict(sigma_min=0.002, sigma_max=80.0, n_trajectories=14, grid_size=12, substeps=1, probes=2, seed=3)


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    from fewstep_search.ray_runtime import ray_session

    with ray_session(workers=2):
        yield


@pytest.fixture(scope="module")
def model() -> GaussianMixture:
    return GaussianMixture.random(8, n_components=4, seed=2)


def _plan(**over: object) -> BankPlan:
    kw = {**KW, "shape": (8,), "model_id": "mix8", **over}
    return BankPlan(**kw)  # type: ignore[arg-type]


def _reference(model: GaussianMixture, plan: BankPlan):  # noqa: ANN202
    return build_bank(model, shape=plan.shape, model_id=plan.model_id, keep_states=plan.keep_states,
                      project_dim=plan.project_dim, store_float16=plan.store_float16, dtype=plan.dtype,
                      **{k: v for k, v in KW.items()})


def _same_bank(a, b, *, states: bool = True) -> None:  # noqa: ANN001
    for name in ("grid", "x_start", "split"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in ("x_end", "denoised", "phi") + (("states",) if states else ()):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), msg=name)
    assert a.meta == b.meta


def test_sharded_build_gives_the_single_process_bank(ray_local, model, tmp_path: Path) -> None:
    plan = _plan()
    bank = build_bank_sharded(ModelSource.of(model), plan, tmp_path, shard_size=5)
    assert [p.name for p in sorted(tmp_path.glob("shard-*"))] == [shard_path(tmp_path, lo, hi).name
                                                                  for lo, hi in ((0, 5), (5, 10), (10, 14))]
    _same_bank(bank, _reference(model, plan))
    lean = assemble_from_shards(plan, tmp_path, states=False)
    assert lean.states is None
    _same_bank(lean, bank, states=False)
    rows = ShardedStates(plan, tmp_path)[[13, 0, 6]]
    torch.testing.assert_close(rows, bank.states[[13, 0, 6]])


def test_projected_float16_shards_match_too(ray_local, model, tmp_path: Path) -> None:
    plan = _plan(project_dim=4, store_float16=True, keep_states=False, dtype="float32")
    bank = build_bank_sharded(model, plan, tmp_path, shard_size=4, batch_size=3)
    assert bank.denoised.dtype == torch.float16 and bank.denoised.shape == (14, 12, 4) and bank.states is None
    _same_bank(bank, _reference(model, plan), states=False)


def test_a_resumed_build_keeps_its_finished_shards(ray_local, model, tmp_path: Path) -> None:
    plan = _plan()
    first = Path(solve_shard(ModelSource.of(model), plan, 3, 9, str(tmp_path)))
    stamp = first.stat().st_mtime_ns
    (tmp_path / ".shard-0000000-0000003.safetensors.x.tmp").write_bytes(b"half")  # a killed write
    paths = build_shards(model, plan, tmp_path, shard_size=4)
    assert first.stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in paths] == [shard_path(tmp_path, lo, hi).name
                                       for lo, hi in ((0, 3), (3, 9), (9, 13), (13, 14))]
    assert not list(tmp_path.glob(".shard-*.tmp"))
    _same_bank(assemble_from_shards(plan, tmp_path), _reference(model, plan))


def test_a_shard_of_another_plan_is_refused_in_one_line(model, tmp_path: Path) -> None:
    solve_shard(ModelSource.of(model), _plan(seed=4), 0, 2, str(tmp_path))
    with pytest.raises(ShardMismatchError, match=r"shard-0000000-0000002.*seed=4.*seed=3") as info:
        finished_shards(_plan(), tmp_path)
    assert "\n" not in str(info.value)
    with pytest.raises(ShardMismatchError, match="seed=4"):
        build_shards(model, _plan(), tmp_path)
    lean = _plan(keep_states=False)
    solve_shard(ModelSource.of(model), lean, 0, 2, str(tmp_path / "lean"))
    with pytest.raises(ShardMismatchError, match="without states"):
        finished_shards(_plan(), tmp_path / "lean")
    with pytest.raises(ValueError, match="cover 2 of 14 trajectories"):
        assemble_from_shards(lean, tmp_path / "lean")


def test_overlapping_shards_are_refused(model, tmp_path: Path) -> None:
    plan = _plan(keep_states=False)
    for lo, hi in ((0, 4), (2, 6)):
        solve_shard(ModelSource.of(model), plan, lo, hi, str(tmp_path))
    with pytest.raises(ShardMismatchError, match="overlap"):
        finished_shards(plan, tmp_path)


def _dies_once(marker: Path, inner: GaussianMixture):  # noqa: ANN202
    class DiesOnce:  # local class: Ray pickles it by value, so the workers need no import of this test module
        def __init__(self) -> None:
            self.inner, self.marker = inner, str(marker)

        def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            if not os.path.exists(self.marker):
                Path(self.marker).write_text(str(os.getpid()))
                os._exit(1)  # the worker process dies (as on OOM or SIGKILL), no Python exception
            return self.inner(x, sigma)

    return DiesOnce()


def test_a_dead_worker_is_retried_and_its_shard_rebuilt(ray_local, model, tmp_path: Path) -> None:
    plan = _plan(keep_states=False)
    marker = tmp_path / "died"
    bank = build_bank_sharded(_dies_once(marker, model), plan, tmp_path / "shards", shard_size=7, max_retries=2)
    assert marker.exists()  # one worker really died
    _same_bank(bank, _reference(model, plan), states=False)


def test_a_model_error_names_the_shard_in_one_line(ray_local, tmp_path: Path) -> None:
    def broken(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return x * torch.nan

    with pytest.raises(ModelOutputError, match=r"^bank shard \d+\.\.\d+: .*NaN/inf") as info:
        build_shards(broken, _plan(keep_states=False), tmp_path, shard_size=7)
    assert "\n" not in str(info.value)


def test_bad_arguments(model, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="threads >= 1"):
        build_shards(model, _plan(), tmp_path, threads=0)
    with pytest.raises(ValueError, match="keeps no states"):
        ShardedStates(_plan(keep_states=False), tmp_path)
    with pytest.raises(ValueError, match="states=True needs"):
        assemble_from_shards(_plan(keep_states=False), tmp_path, states=True)


_KILLED_BUILD = textwrap.dedent("""
    import sys, time, torch
    from fewstep_search.bank import BankPlan
    from fewstep_search.bank_shards import build_shards
    from fewstep_search.models.mixture import GaussianMixture

    class Slow(GaussianMixture):
        def __call__(self, x, sigma):
            time.sleep(0.002)
            return super().__call__(x, sigma)

    m = GaussianMixture.random(8, n_components=4, seed=2)
    plan = BankPlan(shape=(8,), sigma_min=0.002, sigma_max=80.0, n_trajectories=14, grid_size=12, substeps=1,
                    probes=2, seed=3, model_id="mix8", keep_states=False)
    build_shards(Slow(m.means, m.stds, m.weights), plan, sys.argv[1], workers=1, shard_size=2)
""")


@pytest.mark.slow
def test_a_sigkilled_build_resumes_from_its_finished_shards(model, tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_BUILD, str(folder)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while len(list(folder.glob("shard-*"))) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, its Ray and its workers: no cleanup runs
        proc.wait()
    plan = _plan(keep_states=False)
    kept = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*")}
    assert 2 <= len(kept) < 7
    from fewstep_search.ray_runtime import ray_session

    with ray_session(workers=2):
        build_shards(model, plan, folder, shard_size=2)
    assert all((folder / n).stat().st_mtime_ns == t for n, t in kept.items())
    _same_bank(assemble_from_shards(plan, folder), _reference(model, plan), states=False)


def test_a_study_with_bank_sharded_builds_through_shards_and_gets_the_same_bank(ray_local, tmp_path: Path,
                                                                                 monkeypatch) -> None:
    """What the loop does with `bank.sharded = true` (inside its Ray session): the shards folder is built,
    assembled into the bank the in-process build gives, and removed once the bank is saved."""
    import fewstep_search.bank_shards as shards_mod
    from fewstep_search.models.loading import load_model
    from fewstep_search.resolve import cached_or_built_bank
    from fewstep_search.study import StudyConfig

    calls: list[Path] = []
    real = shards_mod.build_bank_sharded
    monkeypatch.setattr(shards_mod, "build_bank_sharded", lambda *a, **k: calls.append(Path(a[2])) or real(*a, **k))
    banks = {}
    for sharded in (False, True):
        config = StudyConfig.model_validate({
            "nfe": 3, "model": {"kind": "mixture", "options": {"dim": 8}},
            "bank": {"n_trajectories": 20, "grid_size": 12, "substeps": 1, "probes": 1, "sharded": sharded}})
        saved: list = []
        source = ModelSource(kind="mixture", options={"dim": 8})
        banks[sharded], built = cached_or_built_bank(
            load_model("mixture", options={"dim": 8}), config, load=lambda expect: (None, None), save=saved.append,
            sigma_min=0.002, sigma_max=80.0, shape=(8,), progress=False, notes=[], source=source,
            shards=tmp_path / "bank_shards")
        assert built and saved == [banks[sharded]]
    assert calls == [tmp_path / "bank_shards"] and not (tmp_path / "bank_shards").exists()
    _same_bank(banks[True], banks[False])
