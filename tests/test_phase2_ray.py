"""Phase-2 on Ray Train (slow: each test starts Ray): same result as in process, DDP on 2 CPU workers, and a
round that survives a real SIGKILL of its process mid-training.

The models come from a factory file (kind = "factory"), so every Ray worker process loads them itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_phase2_models import SIGMA_MAX, SIGMA_MIN, write_factory

from fewstep_search.bank import Bank, build_bank
from fewstep_search.models.source import ModelSource
from fewstep_search.phase2 import fine_tune
from fewstep_search.phase2.checkpoints import read_epochs
from fewstep_search.schedules import make_schedule
from fewstep_search.study.phase2 import Phase2Spec

pytestmark = pytest.mark.slow

SPEC = {"batch_size": 16, "steps_per_epoch": 4, "lr": 2e-3, "lr_final": 2e-4, "warmup_steps": 2, "pool_size": 32,
        "max_log_step": 1.0}


@pytest.fixture(scope="module")
def factory(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_factory(tmp_path_factory.mktemp("factory"))


@pytest.fixture(scope="module")
def bank_path(factory: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    den = ModelSource(kind="factory", factory=factory, options={"seed": 3}).load()
    bank = build_bank(den, shape=(8,), sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, n_trajectories=32, grid_size=16,
                      dtype=torch.float32, probes=1, model_id="tiny")
    return bank.save(tmp_path_factory.mktemp("bank") / "bank.safetensors")


def _bank(path: Path) -> Bank:
    from fewstep_search.bank import load_bank

    return load_bank(path)


def _round(factory: str, bank: Bank, out: Path, engine: str, **kw: object):
    src = ModelSource(kind="factory", factory=factory, options={"seed": 3})
    return fine_tune(teacher=src, student=src, schedule=make_schedule("vp_time_quadratic", 3, SIGMA_MIN, SIGMA_MAX),
                     bank=bank, spec=Phase2Spec(**{**SPEC, **kw}), out_dir=out, engine=engine)


def _same_weights(a: Path, b: Path, atol: float = 1e-6) -> bool:
    wa, wb = load_file(str(a)), load_file(str(b))
    return set(wa) == set(wb) and all(torch.allclose(wa[k], wb[k], atol=atol) for k in wa)


def test_ray_engine_matches_the_local_engine(factory, bank_path, tmp_path, monkeypatch) -> None:
    """Also with a relative out_dir, as `make demo` passes (`--out runs/demo`): Ray Train wants absolute paths."""
    bank = _bank(bank_path)
    monkeypatch.chdir(tmp_path)
    seen: list[dict] = []
    src = ModelSource(kind="factory", factory=factory, options={"seed": 3})
    ray_res = fine_tune(teacher=src, student=src, schedule=make_schedule("vp_time_quadratic", 3, SIGMA_MIN, SIGMA_MAX),
                        bank=bank, spec=Phase2Spec(**SPEC, max_steps=8), out_dir="ray", engine="ray",
                        on_epoch=seen.append)
    local = _round(factory, bank, tmp_path / "local", "local", max_steps=8)
    assert [h["epoch"] for h in ray_res.history] == [1, 2] and [h["epoch"] for h in seen] == [1, 2]
    assert ray_res.history[-1]["test_error"] == pytest.approx(local.history[-1]["test_error"], rel=1e-5)
    assert _same_weights(ray_res.checkpoint, local.checkpoint, atol=1e-5)
    assert (tmp_path / "ray" / "checkpoints" / "epoch_000002" / "model.safetensors").is_file()


@pytest.mark.parametrize("loss", [{}, {"per_step_weight": 0.0, "end_to_end_weight": 1.0}],
                         ids=["per_step", "end_to_end_alone"])
def test_two_ddp_workers_on_cpu(factory, bank_path, tmp_path, loss) -> None:
    """The end-to-end term alone runs its N-call chain as one DDP forward (`StudentChain`), so it scales too."""
    res = _round(factory, _bank(bank_path), tmp_path, "ray", max_steps=4, workers=2, cpus_per_worker=1, **loss)
    assert res.stopped_reason is None and res.steps == 4 and len(res.history) == 1
    start = ModelSource(kind="factory", factory=factory, options={"seed": 3}).load().inner.state_dict()
    trained = load_file(str(res.checkpoint))
    assert set(trained) == set(start)
    assert any(not torch.equal(trained[k], start[k]) for k in start)


CHILD = """
import sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from test_phase2_ray import _bank, _round
_round({factory!r}, _bank({bank!r}), {out!r}, "ray", max_steps={steps})
"""


def test_a_round_killed_by_sigkill_resumes_from_its_last_epoch(factory, bank_path, tmp_path) -> None:
    steps = 160
    out = tmp_path / "killed"
    code = textwrap.dedent(CHILD).format(tests=str(Path(__file__).parent), factory=factory, bank=str(bank_path),
                                         out=str(out), steps=steps)
    child = subprocess.Popen([sys.executable, "-c", code], start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while len(read_epochs(out)) < 3:
            assert child.poll() is None, "the child finished or failed before it could be killed"
            assert time.monotonic() < deadline, "the child trained no epochs in time"
            time.sleep(0.05)
    finally:
        os.killpg(child.pid, signal.SIGKILL)  # the driver and the Ray processes it started
        child.wait()
    done_before = len(read_epochs(out))
    assert not (out / "result.json").exists() and done_before < steps // SPEC["steps_per_epoch"]
    resumed = _round(factory, _bank(bank_path), out, "ray", max_steps=steps)
    whole = _round(factory, _bank(bank_path), tmp_path / "whole", "local", max_steps=steps)
    assert resumed.steps == steps and [h["epoch"] for h in resumed.history] == [h["epoch"] for h in whole.history]
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in whole.history], rel=1e-4)
    assert _same_weights(resumed.checkpoint, whole.checkpoint, atol=1e-5)
