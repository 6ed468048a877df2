"""Flow-matching models (`fewstep_search.models.flow`): the exact map onto the EDM convention, diffusers' own
FlowMatch Euler loop against our first-order sampler, diffusers folders (their `shift`), the loaders, and a
searched schedule against the family's defaults (uniform t, shift 3) on held-out error.

The test model is exact: the velocity of a Gaussian mixture, `v(x_t, t) = (x_t - E[x0 | x_t]) / t`, built from
the mixture's exact posterior mean in the flow coordinates (so every comparison is to round-off).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from fewstep_search.models.errors import ModelLoadError
from fewstep_search.models.flow import (
    FlowMatchDenoiser,
    load_flow,
    shift_t,
    sigma_to_t,
    t_to_sigma,
    trained_t_range,
    unshift_t,
)
from fewstep_search.models.loading import _Request
from fewstep_search.models.mixture import GaussianMixture, SingleGaussian
from fewstep_search.schedules import karras, logits_from_sigmas, sigmas_from_logits
from fewstep_search.solvers import ddim

T_MIN, T_MAX = trained_t_range(1000)


def mixture_velocity(mix: GaussianMixture):
    """The exact velocity of a mixture in the flow convention (via its exact posterior mean at sigma = t/(1-t))."""

    def v(x_t: Tensor, t: Tensor) -> Tensor:
        tt = t.to(torch.float64).reshape(-1, *([1] * (x_t.ndim - 1)))
        x0 = mix(x_t.double() / (1 - tt), (tt / (1 - tt)).flatten())
        return ((x_t.double() - x0) / tt).to(x_t.dtype)

    return v


@pytest.fixture(scope="module")
def mix8() -> GaussianMixture:
    return GaussianMixture.random(8, n_components=6, seed=1)


# ---------------------------------------------------------------- coordinates and the map


def test_coordinates_are_inverse_and_shift_multiplies_sigma() -> None:
    t = np.array([1e-3, 0.1, 0.5, 0.9, 0.999])
    np.testing.assert_allclose(sigma_to_t(t_to_sigma(t)), t, rtol=1e-14)
    for s in (0.5, 1.0, 3.0, 7.5):
        np.testing.assert_allclose(unshift_t(shift_t(t, s), s), t, rtol=1e-13)
        np.testing.assert_allclose(t_to_sigma(shift_t(t, s)), s * t_to_sigma(t), rtol=1e-12)
    assert T_MIN == pytest.approx(1e-3) and T_MAX == pytest.approx(0.999)
    with pytest.raises(ValueError, match="infinity"):
        t_to_sigma(1.0)


def test_map_reproduces_the_edm_posterior_of_a_gaussian() -> None:
    """The flow-coordinate posterior of N(m, s^2) through the map equals the EDM-convention posterior exactly."""
    m = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    s = torch.tensor([0.5, 0.1, 1.5], dtype=torch.float64)

    def v(x_t: Tensor, t: Tensor) -> Tensor:  # x_t = (1 - t) x0 + t eps, in its own coordinates
        t = t.reshape(-1, 1)
        a = 1 - t
        mean = m + a * s**2 / (a**2 * s**2 + t**2) * (x_t - a * m)  # E[x0 | x_t]
        return (x_t - mean) / t

    den = FlowMatchDenoiser(v, t_min=T_MIN, t_max=T_MAX)
    ref = SingleGaussian(m, s)
    x = torch.randn(5, 3, dtype=torch.float64) * 4
    sigma = torch.tensor([0.001, 0.3, 1.0, 20.0, 900.0], dtype=torch.float64)
    torch.testing.assert_close(den(x, sigma), ref(x, sigma), rtol=1e-11, atol=1e-11)
    assert den.sigma_min == pytest.approx(1 / 999) and den.sigma_max == pytest.approx(999.0)
    assert (den.family, den.prediction_type, den.shift) == ("flow", "flow_velocity", 1.0)


def test_bad_arguments_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match="t_min < t_max"):
        FlowMatchDenoiser(lambda x, t: x, t_min=0.0, t_max=0.9)
    with pytest.raises(ValueError, match="t_min < t_max"):
        FlowMatchDenoiser(lambda x, t: x, t_min=0.1, t_max=1.0)
    with pytest.raises(ValueError, match="shift"):
        FlowMatchDenoiser(lambda x, t: x, t_min=0.1, t_max=0.9, shift=0.0)
    with pytest.raises(ValueError, match="velocity"):
        FlowMatchDenoiser(3.0, t_min=0.1, t_max=0.9)  # type: ignore[arg-type]
    den = FlowMatchDenoiser(lambda x, t: x[:, :1], t_min=0.1, t_max=0.9)
    with pytest.raises(ValueError, match="returned"):
        den(torch.zeros(2, 3), torch.ones(2))


def test_wraps_a_module_as_a_trainable_submodule() -> None:
    """Phase-2 fine-tunes the module the loader returns: it must hold the network's weights under `model.`."""
    net = nn.Linear(4, 4).float()
    den = FlowMatchDenoiser(lambda_module(net), t_min=T_MIN, t_max=T_MAX)
    assert isinstance(den, nn.Module)
    assert sorted(den.state_dict()) == ["model.net.bias", "model.net.weight"]
    x = torch.randn(3, 4, dtype=torch.float64)
    out = den(x, torch.full((3,), 2.0, dtype=torch.float64))
    assert out.dtype == torch.float64  # the float32 network runs in its own dtype; output in x's
    out.square().sum().backward()
    assert net.weight.grad is not None and float(net.weight.grad.abs().sum()) > 0


class lambda_module(nn.Module):  # noqa: N801 - a tiny velocity module: v = net(x_t) + t
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        return self.net(x_t) + t[:, None]


# ---------------------------------------------------------------- against diffusers' own loop

diffusers = pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402

from fewstep_search.export import ModelInfo, export_diffusers, export_sigmas  # noqa: E402

try:
    from fixtures_models import TINY_SHAPE, tiny_unet
except ImportError:  # pragma: no cover
    from tests.fixtures_models import TINY_SHAPE, tiny_unet


def flowmatch_loop(scheduler, velocity, sample: Tensor) -> tuple[Tensor, int]:
    """diffusers' FlowMatch Euler loop (what its pipelines do), counting model calls."""
    calls = 0
    for t in scheduler.timesteps:
        calls += 1
        v = velocity(sample, t.expand(sample.shape[0]))
        sample = scheduler.step(v, t, sample).prev_sample
    return sample, calls


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_ddim_matches_diffusers_flowmatch_euler(mix8: GaussianMixture, shift: float) -> None:
    v = mixture_velocity(mix8)
    den = FlowMatchDenoiser(v, t_min=T_MIN, t_max=T_MAX, shift=shift)
    n = 5
    sched = karras(n, den.sigma_min, den.sigma_max)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    export = export_diffusers(sched, ModelInfo(family="flow", shift=shift, scheduler_config=dict(scheduler.config)))
    assert len(export["sigmas"]) == n  # the scheduler appends the final 0 itself
    scheduler.set_timesteps(sigmas=export["sigmas"])
    # The scheduler runs exactly our t values (its shift undone), then 0.
    np.testing.assert_allclose(scheduler.sigmas.double().numpy(), sigma_to_t(export_sigmas(sched)), atol=2e-7)

    eps = torch.randn(16, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = eps * den.sigma_max
    ours = ddim(den, x, torch.as_tensor(export_sigmas(sched)))

    def velocity(x_t: Tensor, timestep: Tensor) -> Tensor:  # diffusers calls the model with t * 1000
        return v(x_t.double(), timestep.double() / 1000).float()

    theirs, calls = flowmatch_loop(scheduler, velocity, (x / (1 + den.sigma_max)).float())
    assert calls == n
    torch.testing.assert_close(theirs.double(), ours, atol=5e-6, rtol=0)  # float32 round-off (diffusers' dtype)


def test_a_naive_export_runs_another_schedule() -> None:
    """Negative control: handing a shift-3 scheduler the plain t values makes it run a different schedule."""
    sched = karras(5, 1 / 999, 999.0)
    t = sigma_to_t(sched.sigmas[:-1])
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(sigmas=list(t))
    assert np.abs(scheduler.sigmas[:-1].double().numpy() - t).max() > 0.05


def save_flow_folder(root: Path, *, shift: float = 3.0, layout: str = "pipeline", **scheduler_options) -> Path:
    """A tiny UNet2DModel velocity network with a FlowMatchEulerDiscreteScheduler config."""
    unet = tiny_unet(seed=3)
    model_dir = root / "unet" if layout == "pipeline" else root
    unet.save_pretrained(model_dir)
    sched_dir = root / "scheduler" if layout == "pipeline" else root
    FlowMatchEulerDiscreteScheduler(shift=shift, **scheduler_options).save_config(sched_dir)
    return root


@pytest.mark.parametrize("layout", ["pipeline", "model"])
def test_from_pretrained_reads_shift_and_calls_with_diffusers_timesteps(tmp_path: Path, layout: str) -> None:
    folder = save_flow_folder(tmp_path / "flow", shift=3.0, layout=layout)
    den = FlowMatchDenoiser.from_pretrained(folder)
    assert den.shift == 3.0 and den.timestep_scale == 1000.0
    assert den.sigma_min == pytest.approx(1 / 999) and den.sigma_max == pytest.approx(999.0)
    assert den.shape == TINY_SHAPE and den.scheduler_config["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert all(k.startswith("model.") for k in den.state_dict())
    x = torch.randn(2, *TINY_SHAPE)
    sigma = torch.tensor([0.5, 30.0])
    t = sigma / (1 + sigma)
    x_t = x / (1 + sigma).view(-1, 1, 1, 1)
    with torch.no_grad():
        v = den.model(x_t, t * 1000).sample
        expect = x_t - t.view(-1, 1, 1, 1) * v
        torch.testing.assert_close(den(x, sigma), expect, rtol=1e-5, atol=1e-5)


def test_folder_model_through_diffusers_loop_in_exactly_n_calls(tmp_path: Path) -> None:
    folder = save_flow_folder(tmp_path / "flow", shift=3.0)
    den = FlowMatchDenoiser.from_pretrained(folder)
    calls = {"n": 0}
    den.model.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    n = 4
    sched = karras(n, den.sigma_min, den.sigma_max)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    scheduler.set_timesteps(sigmas=export_diffusers(sched, ModelInfo(family="flow", shift=3.0,
                                                                       scheduler_config=den.scheduler_config))["sigmas"])
    x = torch.randn(3, *TINY_SHAPE, dtype=torch.float64) * den.sigma_max
    with torch.no_grad():
        ours = ddim(den, x, torch.as_tensor(export_sigmas(sched)))
        assert calls["n"] == n
        theirs, n_calls = flowmatch_loop(scheduler, lambda s, t: den.model(s, t).sample,
                                         (x / (1 + den.sigma_max)).float())
    assert n_calls == n and calls["n"] == 2 * n
    torch.testing.assert_close(theirs.double(), ours, atol=1e-4, rtol=1e-4)


def test_folder_refusals(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        FlowMatchDenoiser.from_pretrained(tmp_path / "nothing")
    folder = save_flow_folder(tmp_path / "ddpm")
    cfg = folder / "scheduler" / "scheduler_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "_class_name": "DDPMScheduler"}))
    with pytest.raises(ModelLoadError, match="not a FlowMatchEulerDiscreteScheduler"):
        FlowMatchDenoiser.from_pretrained(folder)
    folder = save_flow_folder(tmp_path / "bogus")
    mcfg = folder / "unet" / "config.json"
    mcfg.write_text(json.dumps({**json.loads(mcfg.read_text()), "_class_name": "NoSuchModel"}))
    with pytest.raises(ModelLoadError, match="not a diffusers model class"):
        FlowMatchDenoiser.from_pretrained(folder)


# ---------------------------------------------------------------- loaders (registry shape)


@pytest.fixture
def factory_file(tmp_path: Path) -> Path:
    path = tmp_path / "user_flow.py"
    path.write_text(
        "import torch\n"
        "def gaussian(mean=0.0, device='cpu'):\n"
        "    def v(x_t, t):\n"
        "        t = t.reshape(-1, *([1] * (x_t.ndim - 1)))\n"
        "        return (x_t - mean) / t  # v = eps - x0 for the point mass x0 = mean\n"
        "    return v\n"
    )
    return path


def _req(path=None, factory=None, options=None, base_dir=None) -> _Request:
    return _Request(path, factory, dict(options or {}), "cpu", base_dir)


def test_factory_loader_defaults_and_options(factory_file: Path) -> None:
    den = load_flow(_req(factory=f"{factory_file}:gaussian", options={"mean": 2.0, "shift": 3.0, "shape": [4]}))
    assert isinstance(den, FlowMatchDenoiser) and den.shift == 3.0 and den.shape == (4,)
    assert den.sigma_max == pytest.approx(999.0)
    x = torch.randn(2, 4, dtype=torch.float64)
    torch.testing.assert_close(den(x, torch.tensor([0.7, 5.0], dtype=torch.float64)), torch.full((2, 4), 2.0,
                               dtype=torch.float64))  # D of a point mass is the point
    den = load_flow(_req(factory=f"{factory_file}:gaussian", options={"num_train_timesteps": 100}))
    assert den.sigma_max == pytest.approx(99.0) and den.sigma_min == pytest.approx(1 / 99)
    with pytest.raises(ValueError, match="colour"):
        load_flow(_req(factory=f"{factory_file}:gaussian", options={"colour": 1}))


def test_flow_kind_needs_exactly_one_source(tmp_path: Path, factory_file: Path) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        load_flow(_req())
    with pytest.raises(ValueError, match="exactly one"):
        load_flow(_req(path=tmp_path, factory=f"{factory_file}:gaussian"))
    folder = save_flow_folder(tmp_path / "f", shift=2.0)
    assert load_flow(_req(path=folder, options={"dtype": "float64"})).shift == 2.0
    with pytest.raises(ValueError, match="unknown options"):
        load_flow(_req(path=folder, options={"shift": 5.0}))


# ---------------------------------------------------------------- a searched schedule against the defaults


def test_searched_schedule_beats_uniform_t_and_shift_3(mix8: GaussianMixture) -> None:
    """B_w-DP on the fit trajectories, refined on the fit true error (DESIGN's DP -> direct chain), against the
    family's defaults with the same end points: uniform in t, and uniform in the shift-3 scheduler's input.

    Measured when written (d = 8, K = 256, held-out test E, 4 mixtures): the refined schedule beat uniform t by
    7-42% and shift 3 by 2.6-4.5x at N = 4 and 6; B_w-DP alone beat uniform t in 7 of 8 cases.
    """
    from fewstep_search.bank import build_bank
    from fewstep_search.dp import dp_optimal
    from fewstep_search.objectives import grid_cost_matrix, true_error

    den = FlowMatchDenoiser(mixture_velocity(mix8), t_min=T_MIN, t_max=T_MAX, shape=(8,))
    lo, hi = den.sigma_min, den.sigma_max
    bank = build_bank(den, shape=(8,), sigma_min=lo, sigma_max=hi, n_trajectories=192, grid_size=48, seed=0,
                      model_id="flow-mixture8")
    fit, test = bank.fit(), bank.test()
    cost = grid_cost_matrix(fit, "bw")

    def with_ends(sig: np.ndarray) -> Tensor:
        s = torch.as_tensor(np.asarray(sig, dtype=np.float64)).clone()
        s[0], s[-1] = hi, lo
        return s

    for n in (4, 6):
        idx, _ = dp_optimal(cost, n)
        logits = logits_from_sigmas(bank.grid[idx].numpy()).clone().requires_grad_(True)
        opt = torch.optim.Adam([logits], lr=0.05)
        for _ in range(30):
            opt.zero_grad()
            true_error(den, fit, sigmas_from_logits(logits, lo, hi)).backward()
            opt.step()
        searched = sigmas_from_logits(logits.detach(), lo, hi)
        uniform_t = with_ends(t_to_sigma(np.linspace(T_MAX, T_MIN, n + 1)))
        u = np.linspace(unshift_t(T_MAX, 3.0), unshift_t(T_MIN, 3.0), n + 1)
        shift3 = with_ends(t_to_sigma(shift_t(u, 3.0)))
        e = {k: float(true_error(den, test, s)) for k, s in
             (("searched", searched), ("uniform_t", uniform_t), ("shift3", shift3))}
        assert all(math.isfinite(v) for v in e.values())
        assert e["searched"] < 0.97 * e["uniform_t"], (n, e)
        assert e["searched"] < 0.5 * e["shift3"], (n, e)
