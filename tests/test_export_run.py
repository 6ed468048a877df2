"""The whole promise on a diffusers model: `fewstep-search run` over a DDPMPipeline folder (search and a Phase-2
round), `fewstep-search export --format diffusers-folder`, and `DiffusionPipeline.from_pretrained` sampling with
the kept pair in exactly N calls, giving the tool's samples and the error the run reported."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline  # noqa: E402

import fewstep_search.integrations.diffusers_scheduler  # noqa: E402,F401  (the snippet's import)
from fewstep_search.bank import load_bank  # noqa: E402
from fewstep_search.cli import main  # noqa: E402
from fewstep_search.models.diffusers_adapter import DiffusersUNetDenoiser  # noqa: E402
from fewstep_search.models.source import load_checkpoint_into  # noqa: E402
from fewstep_search.rundir import RunDir  # noqa: E402
from fewstep_search.solvers import sample  # noqa: E402

try:
    from fixtures_models import SCHEDULER_DEFAULTS, TINY_SHAPE, tiny_unet
except ImportError:  # pragma: no cover
    from tests.fixtures_models import SCHEDULER_DEFAULTS, TINY_SHAPE, tiny_unet

NFE = 3
STUDY = """
nfe = 3
rounds = 1
[model]
kind = "diffusers"
path = "ddpm"
[bank]
n_trajectories = 24
grid_size = 16
substeps = 1
probes = 1
keep_trajectories = 8
[search]
heuristics = ["vp_time_quadratic", "edm"]
solvers = ["ipndm"]
seconds = 0
trial_seconds = 0
[[search.trials]]
optimizer = "adam"
objective = "direct"
parameterization = "logits"
starts = ["edm"]
solver = "ipndm"
hyper = { steps = 2 }
[phase2]
max_steps = 4
batch_size = 8
steps_per_epoch = 2
train_for = "winner"
"""


def test_run_export_and_sample_with_the_kept_pair_in_diffusers(tmp_path: Path, capsys) -> None:
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
    DDPMPipeline(unet=tiny_unet(seed=2), scheduler=DDPMScheduler(**{k: SCHEDULER_DEFAULTS[k] for k in keys})
                 ).save_pretrained(tmp_path / "ddpm")
    (tmp_path / "study.toml").write_text(STUDY)
    out = tmp_path / "run"
    assert main(["run", "--study", str(tmp_path / "study.toml"), "--out", str(out), "--in-process", "--quiet"]) == 0
    printed = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    assert f"--format diffusers-folder --out {out}/diffusers" in printed  # the run's last lines name it
    pair = RunDir(out).kept_pair()  # the untouched model's pair, or round 1's (the weights go with it)
    assert pair.solver == "ipndm" and pair.schedule.family == "vp" and (pair.weights is not None) == (pair.round > 0)

    assert main(["export", str(out), "--format", "diffusers-folder", "--out", str(tmp_path / "export")]) == 0
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "export")
    calls = 0
    forward = pipe.unet.forward

    def counted(*args, **kwargs):
        nonlocal calls
        calls += 1
        return forward(*args, **kwargs)

    pipe.unet.forward = counted
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=NFE,
                  output_type="np").images
    assert calls == NFE

    den = DiffusersUNetDenoiser.from_pretrained(tmp_path / "ddpm")
    if pair.weights is not None:
        load_checkpoint_into(den, pair.weights)
    noise = torch.randn((2, *TINY_SHAPE), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = (sample(den, pair.schedule, noise) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(images, ours, atol=2e-5, rtol=0)

    # the E results.json reports for the kept pair is the E of the exported pipeline's sampler
    test = load_bank(out / "bank.safetensors").test()
    latents = test.x_start / float(np.sqrt(1 + pair.schedule.sigma_max**2))
    pipe.scheduler.set_timesteps(NFE)
    with torch.no_grad():
        for t in pipe.scheduler.timesteps:
            latents = pipe.scheduler.step(pipe.unet(latents, t).sample, t, latents).prev_sample
    exported = float((latents - test.x_end).flatten(1).norm(dim=1).mean())
    reported = json.loads((out / "results.json").read_text())["best"]["test_error"]
    assert exported == pytest.approx(reported, rel=1e-4)
