"""The pair as a diffusers pipeline folder: `DiffusionPipeline.from_pretrained(export)` with the package's
`FewstepScheduler` makes exactly N network calls and gives the tool's own samples (`fewstep_search.sample`) from the
same noise, for every solver the scheduler runs, on a VP model (a real `DDPMPipeline` folder) and a flow model
(the scheduler driven as SD3 / Flux pipelines drive theirs); and the E the tool reports is the E of that sampler.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler  # noqa: E402

import fewstep_search.integrations.diffusers_scheduler  # noqa: E402,F401  (what the README's snippet imports)
from fewstep_search.bank import build_bank  # noqa: E402
from fewstep_search.candidate import Candidate  # noqa: E402
from fewstep_search.integrations import pipeline_folder as ex  # noqa: E402
from fewstep_search.integrations.diffusers_scheduler import FewstepScheduler  # noqa: E402
from fewstep_search.models.diffusers_adapter import FEWSTEP_SCHEDULER, DiffusersUNetDenoiser  # noqa: E402
from fewstep_search.models.flow import FlowMatchDenoiser  # noqa: E402
from fewstep_search.objectives import true_error  # noqa: E402
from fewstep_search.schedules import Schedule, prior_scale, vp_time_quadratic  # noqa: E402
from fewstep_search.solvers import sample  # noqa: E402

try:
    from fixtures_models import SCHEDULER_DEFAULTS, TINY_SHAPE, tiny_unet
except ImportError:  # pragma: no cover
    from tests.fixtures_models import SCHEDULER_DEFAULTS, TINY_SHAPE, tiny_unet

SOLVERS = ("ddim", "dpmpp_2m", "ipndm")
NFE = 4


def _ddpm_folder(root: Path, prediction_type: str = "epsilon") -> Path:
    """A real DDPMPipeline folder (model_index.json, unet/, scheduler/), as `save_pretrained` writes it."""
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")
    scheduler = DDPMScheduler(**{k: SCHEDULER_DEFAULTS[k] for k in keys}, prediction_type=prediction_type)
    DDPMPipeline(unet=tiny_unet(seed=1), scheduler=scheduler).save_pretrained(root)
    return root


def _tuned(den: torch.nn.Module, seed: int = 0) -> None:
    """Stand in for Phase-2: move every weight, so the export must carry the pair's weights, not the base's."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in den.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))


class _Counting:
    """Counts the calls of a diffusers network's forward (the pipeline's denoiser calls)."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.calls, self._forward = 0, net.forward
        net.forward = self  # type: ignore[method-assign]

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self._forward(*args, **kwargs)


def _vp_schedule(den: DiffusersUNetDenoiser, solver: str) -> Schedule:
    s = vp_time_quadratic(NFE, den.sigma_min, den.sigma_max, den.vp)
    return Schedule(s.sigmas, name=s.name, solver=solver, family="vp")


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_a_ddpm_pipeline_export_reproduces_the_tools_samples_in_n_calls(tmp_path: Path, solver: str,
                                                                         prediction_type: str) -> None:
    base = _ddpm_folder(tmp_path / "base", prediction_type)
    den = DiffusersUNetDenoiser.from_pretrained(base)
    _tuned(den)
    schedule = _vp_schedule(den, solver)
    out = ex.export_diffusers_folder(den, base, tmp_path / "export", pair=Candidate(schedule))

    pipe = DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe, DDPMPipeline) and isinstance(pipe.scheduler, FewstepScheduler)
    counter = _Counting(pipe.unet)
    images = pipe(batch_size=3, generator=torch.Generator().manual_seed(0), num_inference_steps=NFE,
                  output_type="np").images
    assert counter.calls == NFE

    noise = torch.randn((3, *TINY_SHAPE), generator=torch.Generator().manual_seed(0))  # what the pipeline drew
    with torch.no_grad():
        x0 = sample(den, schedule, noise)
    ours = (x0 / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(images, ours, atol=2e-5, rtol=0)  # float32 round-off, not another sampler
    assert float(np.abs(images - 0.5).max()) > 0.05  # the samples are not trivially flat


def test_the_pipeline_refuses_another_step_count_in_one_line(tmp_path: Path) -> None:
    base = _ddpm_folder(tmp_path / "base")
    den = DiffusersUNetDenoiser.from_pretrained(base)
    out = ex.export_diffusers_folder(den, base, tmp_path / "export", pair=Candidate(_vp_schedule(den, "ipndm")))
    pipe = DiffusionPipeline.from_pretrained(out)
    with pytest.raises(ValueError, match=f"num_inference_steps={NFE}") as info:
        pipe(num_inference_steps=1000)
    assert "\n" not in str(info.value)


def test_the_reported_error_is_the_error_of_the_exported_sampler(tmp_path: Path) -> None:
    """true_error on a bank (what results.json reports) equals the error of the exported scheduler's samples
    from the bank's own start noise, run as a pipeline runs it."""
    base = _ddpm_folder(tmp_path / "base")
    den = DiffusersUNetDenoiser.from_pretrained(base)
    bank = build_bank(den, shape=TINY_SHAPE, sigma_min=den.sigma_min, sigma_max=den.sigma_max, n_trajectories=12,
                      grid_size=16, substeps=1, probes=1, dtype=torch.float32, model_id="ddpm")
    for solver in SOLVERS:
        schedule = _vp_schedule(den, solver)
        reported = float(true_error(den, bank, schedule.tensor(), solver=solver))
        out = ex.export_diffusers_folder(den, base, tmp_path / solver, pair=Candidate(schedule))
        pipe = DiffusionPipeline.from_pretrained(out)
        latents = bank.x_start / prior_scale("vp", den.sigma_max)  # the pipeline's N(0, I) draw
        pipe.scheduler.set_timesteps(NFE)
        with torch.no_grad():
            for t in pipe.scheduler.timesteps:
                latents = pipe.scheduler.step(pipe.unet(latents, t).sample, t, latents).prev_sample
        exported = float((latents - bank.x_end).flatten(1).norm(dim=1).mean())
        assert exported == pytest.approx(reported, rel=1e-4), solver


def _flow_folder(root: Path, shift: float = 3.0) -> Path:
    tiny_unet(seed=4).save_pretrained(root / "unet")
    FlowMatchEulerDiscreteScheduler(shift=shift).save_config(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "MyFlowPipeline", "unet": ["diffusers",
                                                                                            "UNet2DModel"]}))
    return root


@pytest.mark.parametrize("solver", SOLVERS)
def test_a_flow_export_driven_like_sd3_reproduces_the_tools_samples(tmp_path: Path, solver: str) -> None:
    """SD3 / Flux pipelines draw latents ~ N(0, I), call set_timesteps(N), the transformer at each timestep and
    step(); no scale_model_input. The scheduler runs in flow time t and must give the tool's sample."""
    base = _flow_folder(tmp_path / "base")
    den = FlowMatchDenoiser.from_pretrained(base)
    _tuned(den)
    s = vp_time_quadratic(NFE, den.sigma_min, den.sigma_max)  # any schedule on the model's range
    schedule = Schedule(s.sigmas, solver=solver, family="flow")
    out = ex.export_diffusers_folder(den, base, tmp_path / "export", pair=Candidate(schedule))
    index = json.loads((out / "model_index.json").read_text())
    assert index["scheduler"] == [ex.SCHEDULER_LIBRARY, "FewstepScheduler"] and index["_class_name"] == "MyFlowPipeline"

    scheduler = FewstepScheduler.from_pretrained(out / "scheduler")
    net = type(den.model).from_pretrained(out / "unet")
    noise = torch.randn((2, *TINY_SHAPE), generator=torch.Generator().manual_seed(3))
    latents = noise * scheduler.init_noise_sigma
    scheduler.set_timesteps(NFE)
    calls = 0
    with torch.no_grad():
        for t in scheduler.timesteps:
            calls += 1
            v = net(scheduler.scale_model_input(latents, t), t.expand(latents.shape[0])).sample
            latents = scheduler.step(v, t, latents, return_dict=False)[0]
        x0 = sample(den, schedule, noise)
    assert calls == NFE
    torch.testing.assert_close(latents, x0, atol=2e-5, rtol=0)


def test_an_export_loads_as_a_model_again(tmp_path: Path) -> None:
    """The adapters read the model's own scheduler config, which the exported scheduler keeps: a fine-tuned
    export can be searched and fine-tuned again."""
    base = _ddpm_folder(tmp_path / "ddpm")
    den = DiffusersUNetDenoiser.from_pretrained(base)
    _tuned(den)
    out = ex.export_diffusers_folder(den, base, tmp_path / "out", pair=Candidate(_vp_schedule(den, "ddim")))
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == FEWSTEP_SCHEDULER
    again = DiffusersUNetDenoiser.from_pretrained(out)
    x, sig = torch.randn(2, *TINY_SHAPE), torch.tensor([1.0, 5.0])
    torch.testing.assert_close(again(x, sig), den(x, sig))
    flow_base = _flow_folder(tmp_path / "flow")
    fden = FlowMatchDenoiser.from_pretrained(flow_base)
    fout = ex.export_diffusers_folder(fden, flow_base, tmp_path / "fout",
                                      pair=Candidate(Schedule([fden.sigma_max, 1.0, fden.sigma_min], family="flow")))
    assert FlowMatchDenoiser.from_pretrained(fout).shift == 3.0


def test_what_a_folder_cannot_honour_is_refused_in_one_line(tmp_path: Path) -> None:
    base = _ddpm_folder(tmp_path / "base")
    den = DiffusersUNetDenoiser.from_pretrained(base)
    schedule = _vp_schedule(den, "ddim")
    for bad, message in ((dataclasses.replace(schedule, solver="heun"), "json or k-diffusion"),
                         (dataclasses.replace(schedule, family="edm"), "no diffusers pipeline")):
        with pytest.raises(ValueError, match=message) as info:
            ex.export_diffusers_folder(den, base, tmp_path / "x", pair=Candidate(bad))
        assert "\n" not in str(info.value)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(ValueError, match="already exists"):
        ex.export_diffusers_folder(den, base, tmp_path / "full", pair=Candidate(schedule))
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match="runs the solvers"):
        FewstepScheduler(sigmas=[80.0, 1.0, 0.01], solver="heun", timesteps=[999.0, 500.0])


def test_a_bare_unet_folder_exports_as_a_ddpm_pipeline(tmp_path: Path) -> None:
    try:
        from fixtures_models import save_model
    except ImportError:  # pragma: no cover
        from tests.fixtures_models import save_model
    base = save_model(tmp_path / "bare", layout="model")
    den = DiffusersUNetDenoiser.from_pretrained(base)
    out = ex.export_diffusers_folder(den, base, tmp_path / "out", pair=Candidate(_vp_schedule(den, "dpmpp_2m")))
    assert sorted(p.name for p in out.iterdir()) == ["model_index.json", "scheduler", "unet"]
    pipe = DiffusionPipeline.from_pretrained(out)
    counter = _Counting(pipe.unet)
    pipe(num_inference_steps=NFE, output_type="np")
    assert counter.calls == NFE and FEWSTEP_SCHEDULER == FewstepScheduler.__name__


def test_the_cli_exports_a_kept_round_and_lists_what_works(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import save_file

    from fewstep_search import cli

    base = _ddpm_folder(tmp_path / "base")
    den = DiffusersUNetDenoiser.from_pretrained(base)
    _tuned(den)
    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"nfe": NFE, "model": {"kind": "diffusers", "path": str(base)}}))
    schedule = _vp_schedule(den, "ipndm")
    (run / "best" / "schedule.json").write_text(json.dumps({**schedule.to_dict(), "round": 1}))
    assert cli.main(["export", str(run), "--format", "diffusers-folder", "--out", str(tmp_path / "o")]) == 2
    assert "no fine-tuned model" in capsys.readouterr().err  # round 1 was kept: its weights are the pair's
    save_file({k: v.contiguous() for k, v in den.state_dict().items()}, str(run / "best" / "model.safetensors"))

    assert cli.main(["export", str(run)]) == 0
    listing = capsys.readouterr().out
    assert "solver ipndm, vp model" in listing and "yes  diffusers-folder" in listing
    assert "no   diffusers " in listing and "yes  k-diffusion" in listing and "FewstepSigmas" in listing
    assert cli.main(["export", str(run), "--format", "diffusers-folder", "--out", str(tmp_path / "o")]) == 0
    assert "round 1's fine-tuned weights" in capsys.readouterr().out
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "o")
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(5), num_inference_steps=NFE,
                  output_type="np").images
    noise = torch.randn((2, *TINY_SHAPE), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = (sample(den, schedule, noise) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(images, ours, atol=2e-5, rtol=0)
    assert cli.main(["export", str(run), "--format", "diffusers"]) == 2
    assert "this run exports as: json, k-diffusion, diffusers-folder" in capsys.readouterr().err


def test_the_runs_last_line_names_an_export_that_works(tmp_path: Path) -> None:
    from fewstep_search.commands.run import export_command
    from fewstep_search.study import StudyConfig

    demo = StudyConfig.model_validate({"nfe": NFE, "model": {"kind": "digits"}})
    best = {"sigmas": [80.0, 1.0, 0.002], "solver": "ipndm", "family": "edm"}
    assert export_command(best, demo, tmp_path) == f"fewstep-search export {tmp_path} --format k-diffusion"
    folder = StudyConfig.model_validate({"nfe": NFE, "model": {"kind": "diffusers", "path": str(tmp_path)}})
    assert "--format diffusers-folder --out" in export_command({**best, "family": "vp"}, folder, tmp_path)
    assert "--format k-diffusion" in export_command({**best, "solver": "heun", "family": "vp"}, folder, tmp_path)
