"""The command line as a new user meets it: the main job, resume, and one-line errors before any work."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from fewstep_search.cli import main

TINY = """
nfe = 3
[model]
kind = "mixture"
options = { dim = 2, seed = 0 }
[bank]
n_trajectories = 16
grid_size = 24
[search]
heuristics = ["edm", "vp_time_quadratic"]
solvers = ["ddim"]
[[search.trials]]
optimizer = "dp"
parameterization = "grid"
[[search.trials]]
optimizer = "adam"
objective = "direct"
starts = ["vp_time_quadratic"]
hyper = { steps = 3 }
"""


@pytest.fixture
def tiny_study(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.toml"
    p.write_text(TINY)
    return p


def _local(study: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--study", str(study), "--out", str(out), "--in-process", "--quiet", *extra]


def test_run_writes_best_schedule_and_resumes(tiny_study: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(_local(tiny_study, out, "--budget", "4")) == 0
    best = json.loads((out / "best" / "schedule.json").read_text())
    assert best["nfe"] == 4 and len(best["sigmas"]) == 5 and best["sigmas"][0] > best["sigmas"][-1]
    assert (out / "bank.safetensors").exists() and (out / "config.json").exists()
    results = json.loads((out / "results.json").read_text())
    assert results["rounds"] == [] and any("no trainable weights: Phase-1 only" in n for n in results["notes"])
    phase1 = json.loads((out / "round_1" / "phase1.json").read_text())
    assert {c["kind"] for c in phase1["candidates"]} == {"heuristic", "dp", "adam"}
    assert (out / "plots" / "schedules.png").is_file()
    capsys.readouterr()
    assert main(_local(tiny_study, out, "--budget", "4")) == 0
    assert "already finished" in capsys.readouterr().out
    assert main(["run", "--out", str(out), "--resume", "--in-process", "--quiet"]) == 0  # no --study needed


@pytest.mark.parametrize("args, message", [
    (["--budget", "0"], "--budget must be between 1 and 1000"),
    (["--budget", "-3"], "--budget must be between 1 and 1000"),
    (["--budget", "1001"], "--budget must be between 1 and 1000"),
    (["--rounds", "-1"], "--rounds must be >= 0"),
    (["--workers", "0"], "--workers must be >= 1"),
])
def test_bad_numbers_are_one_line_errors_before_any_work(args: list[str], message: str, tiny_study: Path,
                                                         tmp_path: Path, capsys) -> None:
    out = tmp_path / "r"
    assert main(["run", "--study", str(tiny_study), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not out.exists()


def test_out_that_is_a_file_or_unwritable_is_a_one_line_error(tiny_study: Path, tmp_path: Path, capsys) -> None:
    f = tmp_path / "a_file"
    f.write_text("x")
    assert main(_local(tiny_study, f)) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(_local(tiny_study, Path("/proc/fewstep-cannot-write-here"))) == 2
    err = capsys.readouterr().err.strip()
    assert "not writable" in err and "\n" not in err


@pytest.mark.parametrize("text, message", [
    ("nfe = [", "not valid TOML"),
    ("nfe = 3\n[model]\nkind = 'nope'", "model.kind"),
    ("nfe = 3\n[bank]\nn_trajectoriez = 3", "bank.n_trajectoriez"),
    ("nfe = 3\n[model]\nkind = 'diffusers'", "needs model.path"),
    ("nfe = 3\n[[search.trials]]\noptimizer = 'nope'", "unknown optimizer 'nope'"),
])
def test_malformed_study_files(text: str, message: str, tmp_path: Path, capsys) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(text)
    assert main(["run", "--study", str(p), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "pydantic" not in err


def test_missing_study_file(tmp_path: Path, capsys) -> None:
    assert main(["run", "--study", str(tmp_path / "none.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_dry_run_prints_the_resolved_config(tiny_study: Path, capsys) -> None:
    assert main(["run", "--study", str(tiny_study), "--budget", "7", "--dry-run"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["nfe"] == 7 and out["config"]["model"]["kind"] == "mixture"
    assert len(out["trials"]) == 4


def test_cuda_without_a_gpu_fails_in_seconds(tiny_study: Path, tmp_path: Path, capsys) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    t0 = time.perf_counter()
    assert main(_local(tiny_study, tmp_path / "r", "--device", "cuda")) == 2
    assert time.perf_counter() - t0 < 30  # generous: this is a sanity bound, not a benchmark
    err = capsys.readouterr().err.strip()
    assert "no CUDA device" in err and "\n" not in err


def test_a_model_that_fails_to_load_leaves_nothing_and_the_fixed_rerun_works(tmp_path: Path, capsys) -> None:
    study = tmp_path / "s.toml"
    study.write_text('nfe = 3\n[model]\nkind = "factory"\nfactory = "nosuchmodule:make"\n')
    out = tmp_path / "run"
    assert main(["run", "--study", str(study), "--out", str(out), "--in-process", "--quiet"]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (out / "config.json").exists()
    study.write_text(TINY)
    assert main(["run", "--study", str(study), "--out", str(out), "--in-process", "--quiet"]) == 0


def test_run_dir_of_another_study_or_budget_is_refused(tiny_study: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(_local(tiny_study, out, "--budget", "3")) == 0
    capsys.readouterr()
    assert main(_local(tiny_study, out, "--budget", "5")) == 2
    err = capsys.readouterr().err.strip()
    assert "another study" in err and "nfe (3 there, 5 now)" in err and "\n" not in err
    assert main(["search", "--study", str(tiny_study), "--budget", "5", "--out", str(out), "--in-process",
                 "--quiet"]) == 2
    assert json.loads((out / "best" / "schedule.json").read_text())["nfe"] == 3  # the old result stays
