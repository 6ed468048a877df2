"""The cluster: cluster.yaml passes Ray's own launcher schema, and a real two-node local cluster runs the job."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fewstep_search.ray_watchdog import stop_session

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_cluster_yaml_is_valid_for_rays_launcher() -> None:
    yaml = pytest.importorskip("yaml")
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(config))
    assert config["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 1
    assert config["available_node_types"]["head"]["resources"]["GPU"] == 1  # the driver's --device cuda
    # one pinned Ray everywhere: the image's tag and the version the project is installed with agree
    tag = config["docker"]["image"].split(":")[1].split("-")[0]
    assert any(f'"ray[tune,train]=={tag}"' in c and "-e ~/fewstep-search" in c for c in config["setup_commands"])
    assert "-py311-" in config["docker"]["image"]
    assert {"**/.venv", "**/runs"} <= set(config["rsync_exclude"])
    broken = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    broken["available_node_types"]["gpu_worker"]["instance_typo"] = "g5.xlarge"
    with pytest.raises(Exception, match="instance_typo"):
        validate_config(prepare_config(broken))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_a_run_on_a_real_two_node_local_cluster(tmp_path: Path) -> None:
    import shutil
    import tempfile

    temp = Path(tempfile.mkdtemp(prefix="fsr-", dir="/tmp"))  # short: Ray's socket paths must fit in 107 chars
    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    head = [str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
            f"--temp-dir={temp}", "--disable-usage-stats"]
    worker = [str(BIN / "ray"), "start", f"--address=127.0.0.1:{port}", "--num-cpus=1", "--disable-usage-stats"]
    study = tmp_path / "tiny.toml"
    study.write_text('nfe = 3\nrounds = 0\n[model]\nkind = "mixture"\noptions = { dim = 4 }\n'
                     "[bank]\nn_trajectories = 16\ngrid_size = 16\n"
                     '[search]\nheuristics = ["edm", "log_uniform"]\nsolvers = ["ddim"]\n'
                     '[[search.trials]]\noptimizer = "dp"\nparameterization = "grid"\n'
                     '[[search.trials]]\noptimizer = "adam"\nobjective = "direct"\nstarts = ["edm", "log_uniform"]\n'
                     "hyper = { steps = 4 }\n")
    out = tmp_path / "run"
    try:
        subprocess.run(head, env=env, check=True, capture_output=True, timeout=180)
        subprocess.run(worker, env=env, check=True, capture_output=True, timeout=180)
        run = subprocess.run([str(BIN / "fewstep-search"), "run", "--study", str(study), "--out", str(out),
                              "--address", f"127.0.0.1:{port}", "--workers", "2", "--quiet"],
                             env=env, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        best = json.loads((out / "best" / "schedule.json").read_text())
        assert best["nfe"] == 3
        phase1 = json.loads((out / "round_1" / "phase1.json").read_text())
        assert {c["kind"] for c in phase1["candidates"]} == {"heuristic", "dp", "adam"}
    finally:
        stop_session(str(temp))  # this test's Ray only (never `ray stop`, which stops every Ray on the machine)
        shutil.rmtree(temp, ignore_errors=True)
