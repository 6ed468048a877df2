"""`fewstep-search eval`: any schedule (a run's, an export's refusal, a heuristic's name) scored on fresh
trajectories with the sampler every export runs, with intervals and paired differences."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fewstep_search.cli import main
from fewstep_search.intervals import bootstrap_mean, paired_difference

STUDY = """
nfe = 4
[model]
kind = "mixture"
options = { dim = 4, seed = 1 }
[bank]
grid_size = 24
substeps = 1
"""


@pytest.fixture
def study(tmp_path: Path) -> Path:
    p = tmp_path / "study.toml"
    p.write_text(STUDY)
    return p


def test_eval_scores_a_run_schedule_against_heuristics_with_intervals(tmp_path, study, capsys) -> None:
    from fewstep_search.models.mixture import GaussianMixture  # noqa: F401  (the study's model kind)
    from fewstep_search.schedules import Schedule, karras

    run = tmp_path / "run" / "best"
    run.mkdir(parents=True)
    mine = Schedule(karras(4, 0.002, 80.0, rho=3.0).sigmas, name="mine", solver="ipndm")
    (run / "schedule.json").write_text(json.dumps(mine.to_dict()))
    argv = ["eval", "--study", str(study), "--schedule", str(tmp_path / "run"), "--schedule", "edm",
            "--trajectories", "24", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    first, edm = out["rows"]
    assert first["solver"] == "ipndm" and edm["solver"] == "ddim" and edm["nfe"] == 4
    for row in out["rows"]:
        lo, hi = row["interval"]
        assert lo <= row["test_error"] <= hi and row["test_error"] > 0
    d, lo, hi = edm["vs_first"]
    assert lo <= d <= hi and d == pytest.approx(edm["test_error"] - first["test_error"], abs=1e-12)
    assert main(argv) == 0  # deterministic: the same fresh trajectories, the same numbers
    assert json.loads(capsys.readouterr().out) == out
    assert main([*argv[:-3], "--trajectories", "24", "--seed", "5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"][0]["test_error"] != first["test_error"]


def test_eval_errors_are_one_line(tmp_path, study, capsys) -> None:
    for schedule, message in (("nosuch", "neither a file nor a heuristic"),
                              (str(tmp_path / "missing.json"), "no such file")):
        assert main(["eval", "--study", str(study), "--schedule", schedule]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    export = tmp_path / "export.json"
    export.write_text(json.dumps({"nfe": 2, "sigmas": [80.0, 1.0, 0.0]}))
    assert main(["eval", "--study", str(study), "--schedule", str(export)]) == 2
    assert "an export" in capsys.readouterr().err


def test_bootstrap_intervals_cover_the_mean_and_pair_the_trajectories() -> None:
    rng = np.random.default_rng(0)
    a = rng.exponential(size=400)
    mean, lo, hi = bootstrap_mean(a)
    assert lo < mean < hi and hi - lo < 0.5
    b = a + 0.01 + 0.001 * rng.normal(size=400)  # slightly worse on every trajectory
    d, dlo, dhi = paired_difference(b, a)
    assert 0 < dlo < d < dhi  # paired: the tiny shift is significant, though the two intervals overlap
    _, blo, bhi = bootstrap_mean(b)
    assert blo < hi
    with pytest.raises(ValueError, match="same trajectories"):
        paired_difference(a, a[:10])
