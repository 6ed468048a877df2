"""`fewstep-search dashboard RUN_DIR` serves the Optuna record on 127.0.0.1: started, queried, stopped."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from fewstep_search.phase1.record import OptunaRecord, sqlite_url
from fewstep_search.phase1.trials import TrialRecord, TrialSpec
from fewstep_search.schedules import make_schedule

STARTUP_SECONDS = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    """A run directory whose Optuna record holds one complete and one failed trial (no Ray needed)."""
    d = tmp_path / "run"
    d.mkdir()
    record = OptunaRecord(sqlite_url(d / "optuna.db"), "phase1-nfe4-round1", optimizers=[])
    sched = make_schedule("edm", 4, 0.002, 80.0)
    metrics = {
        "heldout_error": 0.5,
        "fit_error": 0.49,
        "bw": 0.4,
        "b0": 0.03,
        "seconds": 1.0,
        "evaluations": 3.0,
    }
    record.add(
        TrialRecord(
            spec=TrialSpec(optimizer="none", objective="direct"),
            state="COMPLETE",
            metrics=metrics,
            schedule=sched,
        )
    )
    record.add(TrialRecord(spec=TrialSpec(optimizer="adam", objective="direct"), state="FAIL", error="boom"))
    return d


@pytest.fixture()
def dashboard(run_dir: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fewstep_search.cli", "dashboard", str(run_dir), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield proc, port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _get(url: str, deadline: float, proc: subprocess.Popen[str]) -> bytes:
    """GET with retries until the server answers or `deadline` passes (bounded wait)."""
    while True:
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"dashboard exited with {proc.returncode}: {out[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                assert resp.status == 200
                return resp.read()
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"dashboard did not answer at {url} within {STARTUP_SECONDS:.0f} s")
            time.sleep(0.3)


def test_dashboard_answers_on_its_port_and_lists_the_study(
    dashboard: tuple[subprocess.Popen[str], int],
) -> None:
    proc, port = dashboard
    deadline = time.monotonic() + STARTUP_SECONDS
    page = _get(f"http://127.0.0.1:{port}/dashboard/", deadline, proc)
    assert page
    studies = json.loads(_get(f"http://127.0.0.1:{port}/api/studies", deadline, proc))
    summaries = studies.get("study_summaries", studies.get("studies"))  # renamed across dashboard versions
    names = [s["study_name"] for s in summaries]
    assert names == ["phase1-nfe4-round1"]


def test_dashboard_without_a_record_fails_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fewstep_search.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["dashboard", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "no Optuna record" in err and err.count("\n") == 1
    assert main(["dashboard", str(tmp_path / "missing")]) == 2
    assert main(["dashboard", str(tmp_path / "empty"), "--port", "0"]) == 2
