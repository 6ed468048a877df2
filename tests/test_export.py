"""Exports (`fewstep_search.export`, `fewstep-search export`): exactly N model calls, and the same samples as our
first-order sampler when the export is run through k-diffusion-style Euler, diffusers' `EulerDiscreteScheduler`
(VP: a tiny saved UNet2DModel) and `FlowMatchEulerDiscreteScheduler` (shift undone, configurations it cannot
honour refused); fine-tuned models as diffusers folders; the CLI on run directories written here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from fewstep_search import export as ex
from fewstep_search.commands import export as cmd
from fewstep_search.denoiser import CheckedDenoiser
from fewstep_search.models.flow import FlowMatchDenoiser, sigma_to_t, trained_t_range
from fewstep_search.models.mixture import GaussianMixture
from fewstep_search.schedules import Schedule, karras, log_uniform
from fewstep_search.solvers import ddim, heun

diffusers = pytest.importorskip("diffusers")
from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler  # noqa: E402

from fewstep_search.models.diffusers_adapter import DiffusersUNetDenoiser  # noqa: E402

try:
    from fixtures_models import SCHEDULER_DEFAULTS, TINY_SHAPE, save_model, tiny_unet
except ImportError:  # pragma: no cover
    from tests.fixtures_models import SCHEDULER_DEFAULTS, TINY_SHAPE, save_model, tiny_unet

T_MIN, T_MAX = trained_t_range(1000)


class CallCounter:
    """Wraps a denoiser and counts its calls (one per batch)."""

    def __init__(self, inner) -> None:
        self.inner, self.calls, self.sigmas = inner, 0, []

    def __call__(self, x, sigma):
        self.calls += 1
        self.sigmas.append(float(sigma.flatten()[0]))
        return self.inner(x, sigma)


@pytest.fixture(scope="module")
def mix() -> GaussianMixture:
    return GaussianMixture.random(4, n_components=3, seed=2)


@pytest.fixture(scope="module")
def vp_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(tmp_path_factory.mktemp("vp") / "ddpm")


# ---------------------------------------------------------------- the budget


def test_export_replaces_sigma_min_by_zero() -> None:
    s = karras(5, 0.002, 80.0)
    out = ex.export_sigmas(s)
    assert out.size == s.nfe + 1 and out[-1] == 0.0 and out[0] == 80.0
    np.testing.assert_array_equal(out[:-1], s.sigmas[:-1])
    assert s.sigmas[-1] == 0.002  # the schedule itself is untouched


@pytest.mark.parametrize("n", [1, 3, 6])
def test_euler_on_the_export_makes_exactly_n_calls_and_ends_on_the_last_denoised(mix, n: int) -> None:
    s = karras(n, 0.002, 80.0)
    den = CallCounter(mix)
    seen = []
    x = torch.randn(7, 4, dtype=torch.float64) * 80
    out = ddim(den, x, torch.as_tensor(ex.export_sigmas(s)), callback=lambda d: seen.append(d["denoised"]))
    assert den.calls == n
    assert den.sigmas == pytest.approx(list(s.sigmas[:-1]), rel=1e-15)  # sigma_min itself is never evaluated
    torch.testing.assert_close(out, seen[-1], rtol=0, atol=0)  # the last step lands on D(x_1, sigma_1)


def test_with_final_zero_is_deprecated_and_costs_one_call_more(mix) -> None:
    s = karras(4, 0.002, 80.0)
    with pytest.warns(DeprecationWarning, match="export_sigmas"):
        old = s.with_final_zero()
    den = CallCounter(mix)
    ddim(den, torch.randn(2, 4, dtype=torch.float64) * 80, torch.as_tensor(old))
    assert den.calls == s.nfe + 1  # why it had to go


def test_heun_export_call_count(mix) -> None:
    s = log_uniform(4, 0.002, 80.0)
    den = CallCounter(mix)
    heun(den, torch.randn(2, 4, dtype=torch.float64) * 80, torch.as_tensor(ex.export_sigmas(s)))
    assert den.calls == ex.calls_of("heun", 4) == 7


# ---------------------------------------------------------------- json and k-diffusion


def test_json_export() -> None:
    s = karras(4, 0.002, 80.0)
    d = ex.export_json(s, solver="ddim")
    assert d["nfe"] == 4 and len(d["sigmas"]) == 5 and d["sigmas"][-1] == 0.0 and d["calls"] == 4
    assert d["family"] == "edm" and d["solver"] == "ddim" and "t" not in d
    assert json.loads(ex.dumps(d)) == d  # full precision survives the text
    f = ex.export_json(karras(3, 1 / 999, 999.0), family="flow")
    np.testing.assert_allclose(f["t"], np.asarray(f["sigmas"]) / (1 + np.asarray(f["sigmas"])), rtol=1e-15)
    assert f["t"][-1] == 0.0
    with pytest.raises(ValueError, match="family"):
        ex.export_json(s, family="ve")


@pytest.fixture
def k_diffusion_stub(monkeypatch: pytest.MonkeyPatch) -> None:
    """k-diffusion cannot be installed here (it pulls torchvision and wandb): a stand-in `k_diffusion.sampling` whose
    samplers have k-diffusion's signature and run the project's solvers, so a snippet's import line executes."""
    import sys
    import types

    from fewstep_search.solvers import get_solver

    def wrap(name):
        def sampler(model, x, sigmas, extra_args=None, callback=None, disable=None):
            return get_solver(name)(lambda v, sg: model(v, sg, **(extra_args or {})), x, sigmas)
        return sampler

    module = types.ModuleType("k_diffusion.sampling")
    module.sample_euler, module.sample_heun, module.sample_dpmpp_2m = wrap("ddim"), wrap("heun"), wrap("dpmpp_2m")
    package = types.ModuleType("k_diffusion")
    package.sampling = module
    monkeypatch.setitem(sys.modules, "k_diffusion", package)
    monkeypatch.setitem(sys.modules, "k_diffusion.sampling", module)


@pytest.mark.parametrize("solver", ["ddim", "heun", "dpmpp_2m", "ipndm"])
def test_k_diffusion_snippet_names_the_sampler_that_reproduces_the_tool(k_diffusion_stub, mix, solver) -> None:
    from fewstep_search.solvers import sample

    s = karras(6, 0.002, 80.0)
    text = ex.export_k_diffusion(s, solver=solver)
    ns: dict = {}
    exec(text, ns)  # noqa: S102 - our own generated snippet
    assert torch.equal(ns["sigmas"], torch.as_tensor(ex.export_sigmas(s)))
    name = ex.K_DIFFUSION_SAMPLERS[solver].rsplit(".", 1)[1]
    noise = torch.randn(16, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    counter = CallCounter(mix)
    got = ns[name](lambda x, sigma: counter(x, sigma), 80.0 * noise, ns["sigmas"])  # the snippet's start: 80 * randn
    torch.testing.assert_close(got, sample(mix, dataclasses.replace(s, solver=solver), noise), rtol=1e-12, atol=0)
    assert counter.calls == ex.calls_of(solver, 6)
    if solver == "ipndm":  # no stand-in: the package's own k-diffusion-signature sampler
        assert "from fewstep_search.integrations.k_diffusion import sample_ipndm" in text
    ns = {}
    exec(ex.export_k_diffusion(karras(3, 1 / 999, 999.0), family="flow"), ns)  # noqa: S102
    torch.testing.assert_close(ns["t"], ns["sigmas"] / (1 + ns["sigmas"]), rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match="solver"):
        ex.export_k_diffusion(s, solver="rk45")


# ---------------------------------------------------------------- diffusers: VP models


def euler_discrete_loop(scheduler, unet, sample: torch.Tensor) -> tuple[torch.Tensor, int]:
    """diffusers' EulerDiscreteScheduler loop (as its pipelines run it), counting UNet calls."""
    calls = 0
    for t in scheduler.timesteps:
        calls += 1
        inp = scheduler.scale_model_input(sample, t)
        eps = unet(inp, t).sample
        sample = scheduler.step(eps, t, sample).prev_sample
    return sample, calls


def _euler_scheduler() -> EulerDiscreteScheduler:
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
    return EulerDiscreteScheduler(**{k: SCHEDULER_DEFAULTS[k] for k in keys})


def test_vp_export_through_euler_discrete_scheduler(vp_folder: Path) -> None:
    den = DiffusersUNetDenoiser.from_pretrained(vp_folder)
    info = ex.model_info(CheckedDenoiser(den))
    assert info.family == "vp" and info.vp is den.vp
    n = 4
    s = karras(n, den.sigma_min, den.sigma_max)
    d = ex.export_diffusers(s, info)
    assert d["scheduler"] == "EulerDiscreteScheduler" and len(d["sigmas"]) == n + 1 and d["sigmas"][-1] == 0.0
    scheduler = _euler_scheduler()
    scheduler.set_timesteps(sigmas=d["sigmas"])
    x = torch.randn(3, *TINY_SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * den.sigma_max
    counted = CallCounter(den)
    with torch.no_grad():
        ours = ddim(counted, x, torch.as_tensor(ex.export_sigmas(s)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs, calls = euler_discrete_loop(scheduler, den.unet, x.float())
    assert counted.calls == n and calls == n
    torch.testing.assert_close(theirs.double(), ours, rtol=1e-4, atol=1e-4)


def test_vp_integer_timesteps_through_euler_discrete_scheduler(vp_folder: Path) -> None:
    den = DiffusersUNetDenoiser.from_pretrained(vp_folder, timestep_mode="nearest")
    n = 5
    s = karras(n, den.sigma_min, den.sigma_max)
    d = ex.export_diffusers(s, ex.model_info(den))
    steps, snapped = d["timesteps"], d["timestep_sigmas"]
    assert len(steps) == n and all(isinstance(t, int) for t in steps) and steps == sorted(steps, reverse=True)
    assert snapped[-1] == 0.0 and len(snapped) == n + 1
    np.testing.assert_allclose(snapped[:-1], s.sigmas[:-1], rtol=0.02)  # snapped to nearby trained steps
    scheduler = _euler_scheduler()
    scheduler.set_timesteps(timesteps=steps)
    np.testing.assert_allclose(scheduler.sigmas.double().numpy(), snapped, rtol=1e-5)
    x = torch.randn(2, *TINY_SHAPE, dtype=torch.float64) * snapped[0]
    with torch.no_grad():
        ours = ddim(den, x, torch.as_tensor(snapped))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs, calls = euler_discrete_loop(scheduler, den.unet, x.float())
    assert calls == n
    torch.testing.assert_close(theirs.double(), ours, rtol=1e-4, atol=1e-4)


def test_vp_timesteps_refuse_nodes_that_snap_together(vp_folder: Path) -> None:
    vp = DiffusersUNetDenoiser.from_pretrained(vp_folder).vp
    s = Schedule(np.array([vp.sigmas[500] * 1.0001, vp.sigmas[500], vp.sigma_min]))
    with pytest.raises(ValueError, match="same trained timestep"):
        ex.vp_timesteps(s, vp)
    d = ex.export_diffusers(s, ex.ModelInfo(family="vp", vp=vp))
    assert "timesteps" not in d and "same trained timestep" in d["timesteps_note"] and d["sigmas"][-1] == 0.0


# ---------------------------------------------------------------- diffusers: flow models


def _flow_sched() -> Schedule:
    return karras(4, 1 / 999, 999.0)


def _t_run(scheduler) -> np.ndarray:
    return scheduler.sigmas.double().numpy()


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.7])
def test_flow_export_drives_flowmatch_scheduler_exactly(shift: float) -> None:
    s = _flow_sched()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    d = ex.export_diffusers(s, ex.ModelInfo(family="flow", shift=shift, scheduler_config=dict(scheduler.config)))
    assert len(d["sigmas"]) == s.nfe and d["shift"] == shift
    scheduler.set_timesteps(sigmas=d["sigmas"])
    assert len(scheduler.timesteps) == s.nfe  # N model calls
    np.testing.assert_allclose(_t_run(scheduler), sigma_to_t(ex.export_sigmas(s)), atol=2e-7)
    np.testing.assert_allclose(d["t"], sigma_to_t(ex.export_sigmas(s)), rtol=1e-15)


def test_flow_export_takes_the_scheduler_config_shift_over_the_model_one() -> None:
    s = _flow_sched()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    d = ex.export_diffusers(s, ex.ModelInfo(family="flow", shift=1.0, scheduler_config=dict(scheduler.config)))
    scheduler.set_timesteps(sigmas=d["sigmas"])
    np.testing.assert_allclose(_t_run(scheduler), sigma_to_t(ex.export_sigmas(s)), atol=2e-7)


@pytest.mark.parametrize("kind", ["exponential", "linear"])
def test_flow_export_with_dynamic_shifting_needs_mu_and_undoes_it(kind: str) -> None:
    s = _flow_sched()
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type=kind)
    info = ex.ModelInfo(family="flow", scheduler_config=dict(scheduler.config))
    with pytest.raises(ValueError, match="pass mu"):
        ex.export_diffusers(s, info)
    mu = 1.15
    d = ex.export_diffusers(s, info, mu=mu)
    assert d["shift"] == pytest.approx(math.exp(mu) if kind == "exponential" else mu)
    scheduler.set_timesteps(sigmas=d["sigmas"], mu=mu)
    np.testing.assert_allclose(_t_run(scheduler), sigma_to_t(ex.export_sigmas(s)), atol=2e-7)


def test_flow_shift_terminal_is_honoured_only_when_it_already_holds() -> None:
    s = _flow_sched()
    t_last = float(sigma_to_t(s.sigmas[-2]))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, shift_terminal=t_last)
    d = ex.export_diffusers(s, ex.ModelInfo(family="flow", scheduler_config=dict(scheduler.config)))
    scheduler.set_timesteps(sigmas=d["sigmas"])
    np.testing.assert_allclose(_t_run(scheduler), sigma_to_t(ex.export_sigmas(s)), atol=5e-7)
    cfg = dict(FlowMatchEulerDiscreteScheduler(shift=3.0, shift_terminal=0.1).config)
    with pytest.raises(ValueError, match="shift_terminal"):
        ex.export_diffusers(s, ex.ModelInfo(family="flow", scheduler_config=cfg))


@pytest.mark.parametrize(
    "option, message",
    [
        ({"stochastic_sampling": True}, "stochastic_sampling"),
        ({"invert_sigmas": True}, "invert_sigmas"),
        ({"use_karras_sigmas": True}, "use_karras_sigmas"),
        ({"use_exponential_sigmas": True}, "use_exponential_sigmas"),
        ({"use_beta_sigmas": True}, "use_beta_sigmas"),
        ({"_class_name": "EulerDiscreteScheduler"}, "not a FlowMatchEulerDiscreteScheduler"),
        ({"use_dynamic_shifting": True, "time_shift_type": "cubic"}, "time_shift_type"),
    ],
)
def test_flow_configurations_that_cannot_be_honoured_are_refused(option: dict, message: str) -> None:
    cfg = {**dict(FlowMatchEulerDiscreteScheduler().config), "_class_name": "FlowMatchEulerDiscreteScheduler",
           **option}
    mu = 0.5 if option.get("use_dynamic_shifting") else None
    with pytest.raises(ValueError, match=message) as err:
        ex.export_diffusers(_flow_sched(), ex.ModelInfo(family="flow", scheduler_config=cfg), mu=mu)
    assert "\n" not in str(err.value)


def test_diffusers_export_refusals() -> None:
    s = karras(4, 0.002, 80.0)
    with pytest.raises(ValueError, match="first order"):
        ex.export_diffusers(s, ex.ModelInfo(), solver="heun")
    with pytest.raises(ValueError, match="mu"):
        ex.export_diffusers(s, ex.ModelInfo(), mu=1.0)
    cfg = dict(FlowMatchEulerDiscreteScheduler().config)
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        ex.export_diffusers(_flow_sched(), ex.ModelInfo(family="flow", scheduler_config=cfg), mu=1.0)


def test_model_info_sees_through_the_checked_wrapper(mix) -> None:
    flow = FlowMatchDenoiser(lambda x, t: x, t_min=T_MIN, t_max=T_MAX, shift=3.0)
    info = ex.model_info(CheckedDenoiser(flow))
    assert (info.family, info.shift, info.vp) == ("flow", 3.0, None)
    assert ex.model_info(CheckedDenoiser(mix)).family == "edm"


# ---------------------------------------------------------------- fine-tuned models as diffusers folders


# ---------------------------------------------------------------- the CLI command


def write_run(root: Path, model: dict, schedule: Schedule | dict, *, solver: str | None = None,
              family: str | None = None, **config) -> Path:
    """A run folder as the loop writes it; without `family` its best schedule has none (a run from before the
    schedule carried it: the command asks the model)."""
    (root / "best").mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"nfe": 4, "model": model, **config}))
    data = schedule if isinstance(schedule, dict) else schedule.to_dict()
    data = {k: v for k, v in data.items() if k != "family"}
    if family:
        data["family"] = family
    if solver:
        data = {**data, "solver": solver}
    (root / "best" / "schedule.json").write_text(json.dumps(data))
    return root


def run_export(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    cmd.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", *argv])
    return args.handler(args)


def test_parser_choices_match_the_module() -> None:
    assert cmd.FORMATS == ex.FORMATS and cmd.FAMILIES == ex.FAMILIES


def test_cli_json_and_out_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], k_diffusion_stub) -> None:
    s = karras(4, 0.002, 80.0)
    run = write_run(tmp_path / "run", {"kind": "mixture", "options": {"dim": 2}}, s)
    assert run_export(str(run), "--format", "json") == 0
    d = json.loads(capsys.readouterr().out)
    assert d["nfe"] == 4 and d["sigmas"][:-1] == list(s.sigmas[:-1]) and d["sigmas"][-1] == 0.0
    assert d["family"] == "edm"
    run_export(str(run), "--format", "k-diffusion", "--out", str(tmp_path / "s.py"))
    ns: dict = {}
    exec((tmp_path / "s.py").read_text(), ns)  # noqa: S102
    assert torch.equal(ns["sigmas"], torch.as_tensor(ex.export_sigmas(s)))


def test_cli_diffusers_for_folder_models(tmp_path: Path, vp_folder: Path, capsys) -> None:
    vp = DiffusersUNetDenoiser.from_pretrained(vp_folder).vp
    run = write_run(tmp_path / "vp", {"kind": "diffusers", "path": vp_folder.name}, karras(4, vp.sigma_min,
                                                                                            vp.sigma_max))
    run_export(str(run), "--format", "diffusers", "--base-dir", str(vp_folder.parent))
    d = json.loads(capsys.readouterr().out)
    assert d["scheduler"] == "EulerDiscreteScheduler" and len(d["timesteps"]) == 4 and d["sigmas"][-1] == 0.0
    with pytest.raises(ValueError, match="does not exist"):  # relative to the cwd without a base folder
        run_export(str(run), "--format", "diffusers")
    recorded = write_run(tmp_path / "vp2", {"kind": "diffusers", "path": vp_folder.name}, karras(4, vp.sigma_min,
                         vp.sigma_max), study_dir=str(vp_folder.parent))
    run_export(str(recorded), "--format", "diffusers")  # the study folder the run recorded
    assert json.loads(capsys.readouterr().out) == d

    flow = tmp_path / "flowmodel"
    tiny_unet().save_pretrained(flow / "unet")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_config(flow / "scheduler")
    run = write_run(tmp_path / "flow", {"kind": "flow", "path": str(flow)}, _flow_sched())
    run_export(str(run), "--format", "diffusers")
    d = json.loads(capsys.readouterr().out)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(sigmas=d["sigmas"])
    np.testing.assert_allclose(_t_run(scheduler), sigma_to_t(ex.export_sigmas(_flow_sched())), atol=2e-7)
    with pytest.raises(ValueError, match="contradicts"):
        run_export(str(run), "--format", "diffusers", "--family", "vp")


def test_cli_loads_a_flow_factory_to_ask_its_shift(tmp_path: Path, capsys) -> None:
    (tmp_path / "mine.py").write_text("def make(device='cpu'):\n    return lambda x_t, t: x_t\n")
    model = {"kind": "flow", "factory": f"{tmp_path / 'mine.py'}:make", "options": {"shift": 2.0}}
    run = write_run(tmp_path / "run", model, _flow_sched())
    run_export(str(run), "--format", "diffusers")
    d = json.loads(capsys.readouterr().out)
    assert d["shift"] == 2.0
    np.testing.assert_allclose(d["sigmas"], sigma_to_t(_flow_sched().sigmas[:-1]) / (2 - sigma_to_t(
        _flow_sched().sigmas[:-1])), rtol=1e-12)


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_export(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no best schedule yet"):
        run_export(str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    (bad / "best").mkdir(parents=True)
    (bad / "best" / "schedule.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read schedule"):
        run_export(str(bad))
    up = write_run(tmp_path / "up", {"kind": "mixture"}, {"nfe": 2, "sigmas": [1.0, 2.0, 3.0]})
    with pytest.raises(ValueError, match="decreasing"):
        run_export(str(up))
    noconf = write_run(tmp_path / "noconf", {"kind": "mixture"}, karras(2, 0.01, 10.0))
    (noconf / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="--family"):
        run_export(str(noconf))
    assert run_export(str(noconf), "--family", "edm") == 0  # the listing
    assert run_export(str(noconf), "--family", "edm", "--format", "json") == 0
    with pytest.raises(ValueError, match="--mu is for --format diffusers"):
        run_export(str(noconf), "--family", "edm", "--format", "json", "--mu", "1.0")
    with pytest.raises(ValueError, match="go with a --format"):
        run_export(str(noconf), "--family", "edm", "--mu", "1.0")


def test_cli_through_main_when_wired(tmp_path: Path, capsys) -> None:
    from fewstep_search import cli

    if "export" not in cli.COMMANDS:
        pytest.skip("`export` is not in fewstep_search.cli.COMMANDS yet")
    run = write_run(tmp_path / "run", {"kind": "mixture"}, karras(3, 0.01, 10.0))
    assert cli.main(["export", str(run), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["sigmas"][-1] == 0.0
    assert cli.main(["export", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fewstep-search: error:") and err.count("\n") == 1
