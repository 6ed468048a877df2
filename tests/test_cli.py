from __future__ import annotations

import json
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
[phase1]
refine_steps = 3
"""


@pytest.fixture
def tiny_study(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.toml"
    p.write_text(TINY)
    return p


def test_run_writes_best_schedule_and_resumes(tiny_study: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["run", "--study", str(tiny_study), "--budget", "4", "--out", str(out), "--in-process", "--quiet"]) == 0
    best = json.loads((out / "best" / "schedule.json").read_text())
    assert best["nfe"] == 4 and len(best["sigmas"]) == 5 and best["sigmas"][0] > best["sigmas"][-1]
    assert (out / "bank.safetensors").exists() and (out / "config.json").exists()
    metrics = json.loads((out / "round_1" / "metrics.json").read_text())
    assert {c["kind"] for c in metrics["candidates"]} >= {"heuristic", "dp"}
    capsys.readouterr()
    assert main(["run", "--study", str(tiny_study), "--budget", "4", "--out", str(out), "--in-process", "--quiet"]) == 0
    assert "already finished" in capsys.readouterr().out


@pytest.mark.parametrize("budget", ["0", "-3"])
def test_budget_below_one_is_a_one_line_error(budget: str, tiny_study: Path, tmp_path: Path, capsys) -> None:
    assert main(["run", "--study", str(tiny_study), "--budget", budget, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "budget" in err and "\n" not in err


@pytest.mark.parametrize(
    "text, message",
    [
        ("nfe = [", "not valid TOML"),
        ("nfe = 3\n[model]\nkind = 'nope'", "model.kind"),
        ("nfe = 3\n[bank]\nn_trajectoriez = 3", "bank.n_trajectoriez"),
        ("nfe = 3\n[model]\nkind = 'diffusers'", "needs model.path"),
    ],
)
def test_malformed_study_files(text: str, message: str, tmp_path: Path, capsys) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(text)
    assert main(["run", "--study", str(p), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and str(p) in err and "\n" not in err


def test_missing_study_file(tmp_path: Path, capsys) -> None:
    assert main(["run", "--study", str(tmp_path / "none.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_dry_run_prints_the_resolved_config(tiny_study: Path, capsys) -> None:
    assert main(["run", "--study", str(tiny_study), "--budget", "7", "--dry-run"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["nfe"] == 7 and cfg["model"]["kind"] == "mixture"


def test_run_dir_of_another_study_is_refused(tiny_study: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"model": {"kind": "digits"}, "bank": {}}))
    assert main(["run", "--study", str(tiny_study), "--out", str(out), "--in-process", "--quiet"]) == 2
    assert "different model" in capsys.readouterr().err
