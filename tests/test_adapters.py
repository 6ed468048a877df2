"""Model adapters and `load_model`: a tiny diffusers UNet saved to tmp folders, user factories, bad input.

The key check: diffusers' own `DDIMScheduler` (eta 0) on a VP model and our `ddim` on the converted sigmas
(`sigma~ = sqrt((1 - abar_t) / abar_t)` at each timestep, then 0; start `x~ = x_T / sqrt(abar_T)`) give the
same sample.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fewstep_search.denoiser import CheckedDenoiser, ModelOutputError
from fewstep_search.models.edm_adapter import CallableDenoiser
from fewstep_search.models.factory import load_factory, parse_factory_spec
from fewstep_search.models.loading import MODEL_KINDS, ModelLoadError, load_model, load_model_table
from fewstep_search.noise import DiscreteVP
from fewstep_search.solvers import ddim

pytest.importorskip("diffusers")

from diffusers import DDPMScheduler  # noqa: E402

from fewstep_search.models.diffusers_adapter import DiffusersUNetDenoiser, vp_from_scheduler_config  # noqa: E402

try:  # tests/ is on sys.path under pytest's default rootdir-less import mode; the package form if not
    from fixtures_models import TINY_SHAPE, ddim_scheduler, save_model
except ImportError:  # pragma: no cover
    from tests.fixtures_models import TINY_SHAPE, ddim_scheduler, save_model

PREDICTIONS = ("epsilon", "v_prediction", "sample")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One saved tiny model per prediction type (same weights), pipeline layout."""
    root = tmp_path_factory.mktemp("models")
    return {p: save_model(root / p, scheduler={"prediction_type": p}) for p in PREDICTIONS}


def _table_sigmas(vp: DiscreteVP, steps: list[int]) -> torch.Tensor:
    return torch.as_tensor(vp.sigmas[steps], dtype=torch.float64)


# ---------------------------------------------------------------- the VP table and the conversion


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_table_matches_diffusers(schedule: str) -> None:
    sched = DDPMScheduler(beta_schedule=schedule, beta_start=0.00085, beta_end=0.012)
    vp = vp_from_scheduler_config(dict(sched.config))
    np.testing.assert_allclose(vp.alphas_cumprod, sched.alphas_cumprod.double().numpy(), rtol=2e-5)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_conversion_matches_hand_formula(model_dirs: dict[str, Path], prediction_type: str) -> None:
    den = DiffusersUNetDenoiser.from_pretrained(model_dirs[prediction_type], dtype=torch.float64)
    assert den.prediction_type == prediction_type
    steps = [0, 400, 999]
    sigma = _table_sigmas(den.vp, steps)
    x = torch.randn(len(steps), *TINY_SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = x * (1 + sigma).view(-1, 1, 1, 1)

    abar = torch.as_tensor(den.vp.alphas_cumprod[steps]).view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x
    out = den.unet(x_t, torch.tensor(steps)).sample
    if prediction_type == "epsilon":  # x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
        want = (x_t - (1 - abar).sqrt() * out) / abar.sqrt()
    elif prediction_type == "v_prediction":  # x0 = sqrt(abar) x_t - sqrt(1 - abar) v
        want = abar.sqrt() * x_t - (1 - abar).sqrt() * out
    else:
        want = out
    torch.testing.assert_close(den(x, sigma), want, rtol=1e-9, atol=1e-9)


def test_advertises_range_shape_and_batches_float32(model_dirs: dict[str, Path]) -> None:
    den = DiffusersUNetDenoiser.from_pretrained(model_dirs["epsilon"])
    assert den.sigma_min == pytest.approx(np.sqrt(1e-4 / (1 - 1e-4)), rel=1e-9)
    assert 150 < den.sigma_max < 160
    assert den.shape == TINY_SHAPE
    x = torch.randn(5, *TINY_SHAPE)
    sigma = torch.linspace(0.05, 50.0, 5)
    out = den(x, sigma)
    assert out.dtype == torch.float32 and out.shape == x.shape
    one = torch.cat([den(x[i : i + 1], sigma[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(out, one, rtol=1e-4, atol=1e-4)


def test_interpolated_timestep_is_differentiable(model_dirs: dict[str, Path]) -> None:
    den = DiffusersUNetDenoiser.from_pretrained(model_dirs["epsilon"], dtype=torch.float64)
    x = torch.randn(2, *TINY_SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.7, 3.3], dtype=torch.float64, requires_grad=True)
    proj = torch.randn_like(x)
    (den(x, sigma) * proj).sum().backward()
    h = 1e-4
    with torch.no_grad():
        fd = ((den(x, sigma + h) - den(x, sigma - h)) * proj).flatten(1).sum(1) / (2 * h)
    # the timestep embedding runs in float32 inside diffusers, so the finite difference is good to ~1e-3
    torch.testing.assert_close(sigma.grad, fd, rtol=1e-2, atol=1e-2)
    t_np = den.vp.t(sigma.detach().numpy())
    np.testing.assert_allclose(den.vp.t_torch(sigma).detach().numpy(), t_np, rtol=1e-12)


def test_learned_variance_half_is_dropped(tmp_path: Path) -> None:
    path = save_model(tmp_path / "m", out_channels=2, scheduler={"variance_type": "learned_range"})
    den = DiffusersUNetDenoiser.from_pretrained(path)
    x = torch.randn(2, *TINY_SHAPE)
    assert den(x, torch.tensor([1.0, 2.0])).shape == x.shape


# ---------------------------------------------------------------- DDIM against diffusers' DDIMScheduler


def _diffusers_ddim(unet: torch.nn.Module, scheduler: object, x_T: torch.Tensor) -> torch.Tensor:
    x = x_T
    with torch.no_grad():
        for t in scheduler.timesteps:  # type: ignore[attr-defined]
            out = unet(x, t).sample
            x = scheduler.step(out, t, x, eta=0.0).prev_sample  # type: ignore[attr-defined]
    return x


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_ddim_matches_diffusers(model_dirs: dict[str, Path], prediction_type: str, precision: str) -> None:
    """float64: diffusers' scheduler given our float64 table, model in float64 -> equal to round-off.
    float32: the stock scheduler (its own float32 table) and a float32 model -> equal to ~1e-5."""
    dtype = getattr(torch, precision)
    den = DiffusersUNetDenoiser.from_pretrained(
        model_dirs[prediction_type], dtype=dtype, timestep_mode="nearest"
    )
    sched = ddim_scheduler(prediction_type=prediction_type)
    if precision == "float64":
        sched.alphas_cumprod = torch.from_numpy(den.vp.alphas_cumprod.copy())
    sched.set_timesteps(10)  # "leading": 900, 800, ..., 0, then the final alpha = 1 (set_alpha_to_one)
    steps = [int(t) for t in sched.timesteps]
    assert steps[0] == 900 and steps[-1] == 0

    x_T = torch.randn(3, *TINY_SHAPE, dtype=dtype, generator=torch.Generator().manual_seed(3))
    ref = _diffusers_ddim(den.unet, sched, x_T).double()

    sigmas = torch.cat([_table_sigmas(den.vp, steps), torch.zeros(1, dtype=torch.float64)])
    x_tilde = x_T.double() * torch.sqrt(1 + sigmas[0] ** 2)  # x~ = x_T / sqrt(abar_T)
    with torch.no_grad():
        ours = ddim(CheckedDenoiser(den), x_tilde, sigmas)
    err = float((ours - ref).abs().max() / ref.abs().max())
    print(f"DDIM vs diffusers ({prediction_type}, {precision}): max rel discrepancy {err:.2e}")
    assert err < (1e-10 if precision == "float64" else 1e-5)


# ---------------------------------------------------------------- load_model and factories


_FACTORY_FILE = '''
import torch
from fewstep_search.models.edm_adapter import CallableDenoiser

def exact(device="cpu", scale=1.0):
    """Exact denoiser of x0 ~ N(0, scale^2): D = x scale^2 / (scale^2 + sigma^2)."""
    fn = lambda x, s: x * scale**2 / (scale**2 + s.view(-1, *([1] * (x.ndim - 1))) ** 2)
    return CallableDenoiser(fn, sigma_min=0.002, sigma_max=80.0)

def raw(device="cpu"):
    return lambda x, s: x / (1 + s.view(-1, 1) ** 2)

def make_nan(device="cpu"):
    return CallableDenoiser(lambda x, s: x * float("nan"), sigma_min=0.01, sigma_max=10.0)

def make_bad_shape(device="cpu"):
    return CallableDenoiser(lambda x, s: x[:, :1], sigma_min=0.01, sigma_max=10.0)

def not_a_model(device="cpu"):
    return 3

NOT_CALLABLE = 5
'''


@pytest.fixture
def factory_file(tmp_path: Path) -> Path:
    path = tmp_path / "user_models.py"
    path.write_text(_FACTORY_FILE)
    return path


def test_load_model_diffusers_is_checked(model_dirs: dict[str, Path]) -> None:
    den = load_model("diffusers", path=model_dirs["v_prediction"], options={"dtype": "float64"})
    assert isinstance(den, CheckedDenoiser)
    assert den.prediction_type == "v_prediction" and den.sigma_max > 100
    x = torch.randn(2, *TINY_SHAPE, dtype=torch.float64)
    assert den(x, torch.tensor([1.0, 2.0], dtype=torch.float64)).dtype == torch.float64


def test_model_folder_layout(tmp_path: Path) -> None:
    path = save_model(tmp_path / "flat", layout="model")
    den = load_model_table(
        {"kind": "diffusers", "path": "flat", "options": {"timestep_mode": "nearest"}}, base_dir=tmp_path
    )
    assert den.inner.timestep_mode == "nearest" and path.is_dir()


def test_factory_from_file_and_module(factory_file: Path) -> None:
    den = load_model("factory", factory=f"{factory_file}:exact", options={"scale": 2.0})
    x = torch.ones(1, 3)
    torch.testing.assert_close(den(x, torch.tensor([2.0])), torch.full((1, 3), 0.5))
    # the same file is importable by module name now that its folder is on sys.path (as `python file.py`)
    assert callable(load_factory("user_models:raw"))


def test_edm_kind_wraps_a_plain_function(factory_file: Path) -> None:
    den = load_model("edm", factory=f"{factory_file}:raw", options={"sigma_min": 0.01, "sigma_max": 20.0})
    assert (den.sigma_min, den.sigma_max, den.prediction_type) == (0.01, 20.0, "x0")
    with pytest.raises(ValueError, match=r"needs options \['sigma_max'\]"):
        load_model("edm", factory=f"{factory_file}:raw", options={"sigma_min": 0.01})


def test_mixture_kind() -> None:
    den = load_model("mixture", options={"dim": 3, "seed": 1})
    assert den(torch.zeros(2, 3, dtype=torch.float64), torch.ones(2, dtype=torch.float64)).shape == (2, 3)
    with pytest.raises(ValueError, match="model kind 'mixture'.*'colour'"):
        load_model("mixture", options={"colour": 3})


def test_digits_kind() -> None:
    digits = pytest.importorskip("fewstep_search.models.digits")
    try:
        digits.shipped_card()
    except FileNotFoundError:
        pytest.skip("digits weights not shipped yet")
    den = load_model("digits")
    assert den.sigma_max > den.sigma_min > 0


def test_callable_denoiser_epsilon_and_validation() -> None:
    den = CallableDenoiser(
        lambda x, s: torch.ones_like(x), sigma_min=0.1, sigma_max=10.0, prediction_type="epsilon"
    )
    torch.testing.assert_close(
        den(torch.zeros(2, 2), torch.tensor([1.0, 3.0])), -torch.tensor([[1.0], [3.0]]).expand(2, 2)
    )
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        CallableDenoiser(lambda x, s: x, sigma_min=5.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="prediction_type 'v'"):
        CallableDenoiser(lambda x, s: x, sigma_min=0.1, sigma_max=1.0, prediction_type="v")


def test_importing_loading_does_not_import_diffusers() -> None:
    code = (
        "import sys, fewstep_search.models.loading, fewstep_search.models.diffusers_adapter; "
        "sys.exit('diffusers' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# ---------------------------------------------------------------- bad input: one clear error each


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"folder .*nowhere does not exist"):
        load_model("diffusers", path=tmp_path / "nowhere")


def test_folder_without_scheduler_config(tmp_path: Path) -> None:
    path = save_model(tmp_path / "m")
    (path / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(ModelLoadError, match=rf"no scheduler config in {path}"):
        DiffusersUNetDenoiser.from_pretrained(path)


def test_corrupt_weights(tmp_path: Path) -> None:
    path = save_model(tmp_path / "m")
    (path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"this is not a safetensors file")
    with pytest.raises(ModelLoadError, match=rf"could not load a UNet2DModel from {path / 'unet'}"):
        DiffusersUNetDenoiser.from_pretrained(path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"prediction_type": "flow"}, r"unsupported prediction_type 'flow' \(from .*scheduler_config.json\)"),
        ({"beta_schedule": "sigmoid"}, r"unsupported noise schedule in .*scheduler_config.json.*'sigmoid'"),
        ({"rescale_betas_zero_snr": True}, r"scheduler_config.json: rescale_betas_zero_snr"),
    ],
)
def test_bad_scheduler_config(tmp_path: Path, override: dict, message: str) -> None:
    path = save_model(tmp_path / "m", scheduler=override)
    with pytest.raises(ModelLoadError, match=message):
        DiffusersUNetDenoiser.from_pretrained(path)


def test_variance_channels_without_learned_variance(tmp_path: Path) -> None:
    path = save_model(tmp_path / "m", out_channels=2)
    with pytest.raises(ModelLoadError, match="out_channels 2 does not match in_channels 1"):
        DiffusersUNetDenoiser.from_pretrained(path)


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        ("user_models.exact", ValueError, "has no ':'"),
        ("user_models:", ValueError, "missing the module or the function"),
        ("user models:exact", ValueError, "neither a module name nor a .py file"),
        ("{file}:nope", ModelLoadError, "has no attribute 'nope'"),
        ("{file}:NOT_CALLABLE", ModelLoadError, "'NOT_CALLABLE' is a int, not a function"),
        ("{file}:not_a_model", ModelLoadError, "returned a int, not a Denoiser"),
        ("{dir}/missing.py:exact", ModelLoadError, "missing.py does not exist"),
        ("no_such_module_xyz:make", ModelLoadError, "factory module 'no_such_module_xyz' not found"),
    ],
)
def test_bad_factory_spec(factory_file: Path, spec: str, error: type, message: str) -> None:
    spec = spec.format(file=factory_file, dir=factory_file.parent)
    with pytest.raises(error, match=message):
        load_model("factory", factory=spec)


def test_factory_rejects_unknown_option(factory_file: Path) -> None:
    with pytest.raises(ValueError, match="unexpected keyword argument 'colour'"):
        load_model("factory", factory=f"{factory_file}:exact", options={"colour": 1})


@pytest.mark.parametrize(
    ("fn", "message"), [("make_nan", "returned NaN/inf"), ("make_bad_shape", "returned shape")]
)
def test_bad_model_output_is_caught(factory_file: Path, fn: str, message: str) -> None:
    den = load_model("factory", factory=f"{factory_file}:{fn}")
    with pytest.raises(ModelOutputError, match=message):
        den(torch.ones(2, 3), torch.ones(2))


def test_load_model_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown model kind 'unet'; known kinds: " + ", ".join(MODEL_KINDS)):
        load_model("unet")
    with pytest.raises(ValueError, match="'diffusers' needs a path"):
        load_model("diffusers")
    with pytest.raises(ValueError, match="'mixture' takes no path"):
        load_model("mixture", path=tmp_path)
    with pytest.raises(ValueError, match="'factory' needs factory"):
        load_model("factory")
    with pytest.raises(ValueError, match=r"unknown keys \['weights'\]"):
        load_model_table({"kind": "mixture", "weights": "x"})
    with pytest.raises(ValueError, match="dtype 'double'"):
        load_model("diffusers", path=tmp_path, options={"dtype": "double"})


def test_parse_factory_spec_windows_style_path() -> None:
    assert parse_factory_spec(r"C:\models\mine.py:make") == (r"C:\models\mine.py", "make")
