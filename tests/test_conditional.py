"""Conditional models: trajectories spread over the study's conditions, one schedule for the set, per-condition
test errors in results.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fewstep_search.bank import build_bank
from fewstep_search.cli import main
from fewstep_search.models.mixture import ConditionalMixture
from fewstep_search.objectives import true_error
from fewstep_search.schedules import make_schedule

STUDY = """
nfe = 4
rounds = 0
[model]
kind = "factory"
factory = "fewstep_search.models.mixture:conditional_mixture"
options = { dim = 4 }
conditions = ["cat", "dog", "ship"]
[bank]
n_trajectories = 30
grid_size = 24
dtype = "float64"
[search]
heuristics = ["edm", "vp_time_quadratic"]
[[search.trials]]
optimizer = "dp"
parameterization = "grid"
[[search.trials]]
optimizer = "adam"
objective = "direct"
starts = ["vp_time_quadratic"]
hyper = { steps = 10 }
"""


def test_the_bank_spreads_trajectories_over_conditions_and_binds_them() -> None:
    model = ConditionalMixture.random(4, n_classes=3)
    bank = build_bank(model, shape=(4,), sigma_min=0.002, sigma_max=80.0, n_trajectories=12, grid_size=16)
    assert bank.cond is not None and bank.cond.tolist() == [0, 1, 2] * 4
    s = make_schedule("edm", 4, 0.002, 80.0).tensor()
    e = float(true_error(model, bank, s))
    # The same trajectories solved with the wrong labels land elsewhere: conditions really are used.
    wrong = ConditionalMixture(list(reversed(model.classes)))
    assert abs(float(true_error(wrong, bank, s)) - e) > 0.1 * e


def test_one_schedule_over_the_conditions_with_per_condition_test_errors(tmp_path: Path) -> None:
    study = tmp_path / "cond.toml"
    study.write_text(STUDY)
    out = tmp_path / "run"
    assert main(["run", "--study", str(study), "--out", str(out), "--in-process", "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    by_cond = results["baselines"]["phase1"]["test_error_by_condition"]
    assert set(by_cond) == {"cat", "dog", "ship"} and all(v > 0 for v in by_cond.values())
    best = json.loads((out / "best" / "schedule.json").read_text())
    assert best["nfe"] == 4 and best["test_error_by_condition"] == by_cond
    # The per-condition errors, weighted by each condition's test trajectories, make up the whole test error.
    from fewstep_search.bank import load_bank

    test = load_bank(out / "bank.safetensors").test()
    counts = torch.bincount(test.cond, minlength=3).tolist()
    weighted = sum(n * by_cond[name] for n, name in zip(counts, ["cat", "dog", "ship"], strict=True)) / sum(counts)
    assert weighted == pytest.approx(best["test_error"], rel=1e-9)


def test_conditions_the_model_does_not_take_are_refused(tmp_path: Path, capsys) -> None:
    (tmp_path / "plain.py").write_text(
        "from fewstep_search.models.mixture import builtin_mixture\n"
        "def make(conditions, device='cpu'):\n    return builtin_mixture(dim=2)\n")
    study = tmp_path / "bad.toml"
    study.write_text('nfe = 3\n[model]\nkind = "factory"\nfactory = "plain.py:make"\nconditions = ["a", "b"]\n')
    assert main(["run", "--study", str(study), "--out", str(tmp_path / "r"), "--in-process", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "lists 2 conditions but the model advertises no `conditions`" in err and "\n" not in err


def test_conditions_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "labels.txt").write_text("cat\ndog\n")
    study = tmp_path / "cond.toml"
    study.write_text(STUDY.replace('conditions = ["cat", "dog", "ship"]', 'conditions_file = "labels.txt"'))
    from fewstep_search.resolve import read_conditions
    from fewstep_search.study import load_study

    assert read_conditions(load_study(study), study_path=study) == ["cat", "dog"]
