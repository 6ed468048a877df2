"""A flow-matching model end to end: a study file, the search, and an export that drives diffusers' FlowMatch
scheduler in exactly N calls, landing where our own first-order sampler lands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fewstep_search.cli import main
from fewstep_search.models.flow import mixture_flow
from fewstep_search.schedules import flow_uniform, make_schedule

STUDY = """
nfe = 4
rounds = 0
[model]
kind = "flow"
factory = "fewstep_search.models.flow:mixture_flow"
options = { dim = 4, shift = 3.0 }
[bank]
n_trajectories = 48
grid_size = 32
dtype = "float64"
[search]
heuristics = ["flow_uniform", "flow_shift3"]
solvers = ["ddim"]
[[search.trials]]
optimizer = "dp"
parameterization = "grid"
[[search.trials]]
optimizer = "lbfgsb"
objective = "direct"
starts = ["flow_uniform", "flow_shift3"]
hyper = { maxiter = 15 }
"""


def test_flow_uniform_is_what_the_flowmatch_scheduler_runs() -> None:
    """Uniform unshifted times, shifted by the scheduler itself, are our `flow_uniform` (shift 3) nodes."""
    diffusers = pytest.importorskip("diffusers")
    from fewstep_search.models.flow import trained_t_range

    lo, hi = trained_t_range(1000)
    s_min, s_max = lo / (1 - lo), hi / (1 - hi)
    ours = flow_uniform(5, s_min, s_max, shift=3.0)
    u_hi, u_lo = (s_max / 3) / (1 + s_max / 3), (s_min / 3) / (1 + s_min / 3)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(sigmas=list(np.linspace(u_hi, u_lo, 6)[:-1]))
    t = sched.sigmas.numpy()[:-1].astype(np.float64)  # what the scheduler runs (its shift applied)
    np.testing.assert_allclose(ours.sigmas[:-1] / (1 + ours.sigmas[:-1]), t, rtol=1e-5)


def test_a_flow_model_from_a_study_file_through_search_and_export(tmp_path: Path, capsys) -> None:
    diffusers = pytest.importorskip("diffusers")
    study = tmp_path / "flow.toml"
    study.write_text(STUDY)
    out = tmp_path / "run"
    assert main(["search", "--study", str(study), "--out", str(out), "--in-process", "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    best, heur = results["baselines"]["phase1"], results["baselines"]["best_heuristic"]
    assert best["test_error"] <= heur["test_error"] * 1.02  # the search's pick is at least as good as the defaults

    capsys.readouterr()
    assert main(["export", str(out), "--format", "diffusers"]) == 0
    exported = json.loads(capsys.readouterr().out)
    sigmas_in = exported["sigmas"]
    assert len(sigmas_in) == 4  # N values: the scheduler appends the final 0 itself

    velocity = mixture_flow(dim=4)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(sigmas=sigmas_in)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    calls, sample = 0, x.clone()
    for t in sched.timesteps:
        calls += 1
        sample = sched.step(velocity(sample, (t / 1000).expand(6)), t, sample).prev_sample
    assert calls == 4

    from fewstep_search.export import export_sigmas
    from fewstep_search.models.flow import FlowMatchDenoiser, trained_t_range
    from fewstep_search.schedules import Schedule
    from fewstep_search.solvers import ddim

    schedule = Schedule(json.loads((out / "best" / "schedule.json").read_text())["sigmas"])
    lo, hi = trained_t_range(1000)
    den = FlowMatchDenoiser(velocity, t_min=lo, t_max=hi, shift=3.0)
    ours = ddim(den, x * (1 + schedule.sigma_max), torch.tensor(export_sigmas(schedule)))  # x = x_t / (1 - t)
    torch.testing.assert_close(sample, ours, rtol=1e-4, atol=1e-4)
    assert make_schedule("flow_shift3", 4, schedule.sigma_min, schedule.sigma_max).nfe == 4
