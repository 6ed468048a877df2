"""The text-to-image study file of docs/models.md on tiny SD1.5-, SDXL- and SD3-style folders: `run`, `export
--format diffusers-folder`, and the exported pipeline called with a prompt and guidance makes N denoiser calls and
gives the tool's own sample of that prompt."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from diffusers import DiffusionPipeline  # noqa: E402

import fewstep_search.integrations.diffusers_scheduler  # noqa: E402,F401  (the snippet's import)
from fewstep_search.cli import main  # noqa: E402
from fewstep_search.commands.export import _load  # noqa: E402
from fewstep_search.denoiser import bind_condition  # noqa: E402
from fewstep_search.rundir import RunDir  # noqa: E402
from fewstep_search.solvers import sample  # noqa: E402

try:
    from fixtures_pipelines import save_sd3, save_sd15, save_sdxl
except ImportError:  # pragma: no cover
    from tests.fixtures_pipelines import save_sd3, save_sd15, save_sdxl

STUDY = """
nfe = 4
[model]
kind = "pipeline"
path = "PIPELINE_FOLDER"
options = { height = 16, width = 16 }
[prompts]
file = "prompts.txt"
guidance_scale = 5.0
negative_prompt = ""
"""
QUICK = """
[bank]
n_trajectories = 18
grid_size = 12
substeps = 1
probes = 1
keep_trajectories = 6
[search]
heuristics = ["edm", "vp_time_quadratic"]
solvers = ["ddim", "ipndm"]
seconds = 0
trial_seconds = 0
[[search.trials]]
optimizer = "adam"
objective = "direct"
starts = ["edm"]
solver = "ipndm"
hyper = { steps = 2 }
[phase2]
max_steps = 3
batch_size = 4
steps_per_epoch = 3
train_for = "winner"
pool_size = 8
end_to_end_teacher_steps = 4
"""


@pytest.mark.parametrize("save", [save_sd15, save_sdxl, save_sd3], ids=["sd15", "sdxl", "sd3"])
def test_the_issue_study_runs_exports_and_samples_in_the_pipeline(save, tmp_path: Path, capsys) -> None:
    folder = save(tmp_path / "pipeline")
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\ntwo green dots\na yellow star\n")
    (tmp_path / "it.toml").write_text(STUDY.replace("PIPELINE_FOLDER", str(folder)) + QUICK)
    out = tmp_path / "run"
    assert main(["run", "--study", str(tmp_path / "it.toml"), "--budget", "4", "--rounds", "1", "--out", str(out),
                 "--in-process", "--quiet"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert f"--format diffusers-folder --out {out}/diffusers" in printed
    assert main(["export", str(out), "--format", "diffusers-folder", "--out", str(tmp_path / "export")]) == 0
    assert "guidance_scale=5" in capsys.readouterr().out
    assert (out / "samples.png").is_file()  # latents decoded by the VAE, columns captioned with their prompts

    pipe = DiffusionPipeline.from_pretrained(tmp_path / "export", local_files_only=True)
    network = getattr(pipe, "unet", None) or pipe.transformer
    calls: list[int] = []
    network.register_forward_hook(lambda module, args, output: calls.append(1))
    torch.manual_seed(3)
    noise = torch.randn(1, 4, 8, 8)
    # the study's negative prompt: SDXL's own default without one is a zero embedding, another ODE
    images = pipe("a red circle", num_inference_steps=4, guidance_scale=5.0, negative_prompt="", height=16, width=16,
                  latents=noise, output_type="latent").images
    assert len(calls) == 4  # one batched (negative, prompt) call per step

    run = RunDir(out)
    pair = run.kept_pair()
    den = _load(run.recorded_config()["model"], None, out)
    if pair.weights is not None:
        from fewstep_search.models.source import load_checkpoint_into

        load_checkpoint_into(den.inner, pair.weights)
    mine = sample(bind_condition(den, torch.tensor([0])), pair.schedule, noise.double())
    assert torch.allclose(images.double(), mine, atol=1e-4 * float(mine.abs().max()))
