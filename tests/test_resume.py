"""Reliability against a real SIGKILL: the run resumes without redoing finished work, and leaves no orphans."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fewstep_search.ray_watchdog import session_processes

BIN = Path(sys.executable).parent
STUDY = """
nfe = 4
rounds = 0
[model]
kind = "mixture"
options = { dim = 8 }
[bank]
n_trajectories = 48
grid_size = 32
[search]
heuristics = ["edm", "log_uniform"]
solvers = ["ddim"]
pruning = { enabled = false }
trial_seconds = 0   # no wall-time budgets: the comparison with an uninterrupted run must not move with the load
seconds = 0
[[search.trials]]
optimizer = "adam"
objective = "direct"
starts = ["edm", "log_uniform", "vp_time_quadratic", "vp_time_uniform"]
hyper = { steps = 250 }
"""


def _completed(out: Path) -> list[str]:
    """Keys of the COMPLETE trials in the run's Optuna record (empty until it exists)."""
    info_path = out / "optuna.json"
    if not info_path.is_file():
        return []
    import optuna

    info = json.loads(info_path.read_text())
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=info["studies"][0], storage=info["storage"])
    except Exception:  # the study is being created
        return []
    return [t.user_attrs["key"] for t in study.get_trials(deepcopy=False)
            if t.state == optuna.trial.TrialState.COMPLETE]


@pytest.mark.slow
def test_sigkill_mid_search_resumes_from_the_record_and_leaves_no_ray_orphans(tmp_path: Path) -> None:
    study = tmp_path / "study.toml"
    study.write_text(STUDY)
    out = tmp_path / "run"
    def command(folder: Path) -> list[str]:
        return [str(BIN / "fewstep-search"), "search", "--study", str(study), "--out", str(folder), "--workers", "2",
                "--quiet"]

    cmd = command(out)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not any(k.startswith("adam/") for k in _completed(out)):
        assert proc.poll() is None, "the search ended before it could be killed"
        time.sleep(0.5)
    before = _completed(out)
    assert any(k.startswith("adam/") for k in before)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    sessions = glob.glob(f"/tmp/ray/session_*_{proc.pid}")
    assert sessions, "no Ray session of the killed run was found"
    deadline = time.monotonic() + 60  # the watchdog polls every 0.5 s, then gives Ray 2 s; a loaded machine
    while time.monotonic() < deadline and session_processes(sessions[0]):
        time.sleep(0.5)
    assert session_processes(sessions[0]) == [], "Ray processes of the killed run are still running"

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    after = _completed(out)
    assert len(after) == len(set(after)) == 6  # every trial once: the finished ones were not redone
    assert set(before) <= set(after)

    fresh = tmp_path / "fresh"
    uninterrupted = subprocess.run(command(fresh), capture_output=True, text=True, timeout=900)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-2000:]
    a = json.loads((out / "best" / "schedule.json").read_text())
    b = json.loads((fresh / "best" / "schedule.json").read_text())
    # The same decision: the winner's select E equals the uninterrupted run's. Adam from several starts reaches
    # near-tied optima here, and which one wins moved between runs (observed: the float results of a trial are
    # not bitwise the same in another process; with the default bank's thirds, 16 fit trajectories, two winners
    # 8.5e-5 apart in select E), so compare values, not names, to a tolerance far below the gap between starts.
    assert a["select_error"] == pytest.approx(b["select_error"], rel=1e-3)
    assert a["test_error"] == pytest.approx(b["test_error"], rel=1e-3)
