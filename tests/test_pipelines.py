"""Text-to-image pipeline folders (`kind = "pipeline"`): the guided denoiser is the pipeline's own guided model, the
prompt set is embedded once and split by prompt, and bad input is one line before any network is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from diffusers import DiffusionPipeline, FluxPipeline  # noqa: E402

from fewstep_search.bank import build_bank  # noqa: E402
from fewstep_search.bank.container import SPLIT_NAMES  # noqa: E402
from fewstep_search.bank.keep import build_keep_set  # noqa: E402
from fewstep_search.bank.plan import plan_for  # noqa: E402
from fewstep_search.cli import main  # noqa: E402
from fewstep_search.integrations.diffusers_scheduler import FLOW_PREDICTION, FewstepScheduler  # noqa: E402
from fewstep_search.models import loading  # noqa: E402
from fewstep_search.models.t2i import prompts as prompt_module  # noqa: E402
from fewstep_search.models.t2i.setup import pipeline_options  # noqa: E402

try:
    from fixtures_pipelines import SAVERS
except ImportError:  # pragma: no cover
    from tests.fixtures_pipelines import SAVERS

PROMPTS = ["a red circle", "a blue square", "two green dots", "a yellow star", "a black line", "a white cloud"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipelines")
    return {name: save(root / name) for name, save in SAVERS.items()}


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n\n")
    return path


def _denoiser(folder: Path, prompt_file: Path, cache: Path, guidance: float, **extra):
    options = pipeline_options(folder, {"height": 16, "width": 16}, prompts_file=prompt_file, guidance_scale=guidance,
                               negative_prompt=extra.pop("negative_prompt", None), cache=cache)
    return loading.load_model("pipeline", path=folder, options=options)


@pytest.mark.parametrize("name", ["sd15", "sdxl", "sd3", "flux"])
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_the_guided_denoiser_is_the_pipelines_own_guided_model(name: str, guidance: float, folders, prompt_file,
                                                              tmp_path: Path) -> None:
    """One pipeline step with a 1-step DDIM FewstepScheduler lands on D(x, sigma) exactly: the pipeline's own prompt
    encoding, batch layout, guidance (or Flux's guidance embedding) and latent packing give the tool's D."""
    den = _denoiser(folders[name], prompt_file, tmp_path / "emb.safetensors", guidance)
    flow = getattr(den, "family", "vp") == "flow"
    assert den.conditions == tuple(PROMPTS) and den.shape == (4, 8, 8)
    sigma = torch.tensor([den.sigma_max * 0.3], dtype=torch.float64)
    step = float(den.inner.model_timesteps(sigma))
    pipe = DiffusionPipeline.from_pretrained(folders[name], local_files_only=True)
    ptype = FLOW_PREDICTION if flow else den.prediction_type
    pipe.scheduler = FewstepScheduler(sigmas=[float(sigma), 0.01], solver="ddim", family="flow" if flow else "vp",
                                      timesteps=[step], prediction_type=ptype)
    torch.manual_seed(0)
    latents = torch.randn(1, 4, 8, 8)
    given = FluxPipeline._pack_latents(latents, 1, 4, 8, 8) if name == "flux" else latents
    out = pipe(PROMPTS[2], num_inference_steps=1, guidance_scale=guidance, height=16, width=16, latents=given,
               output_type="latent").images
    if name == "flux":
        out = FluxPipeline._unpack_latents(out, 16, 16, 2)
    x = latents.double() * ((1 + sigma) if flow else (1 + sigma**2).sqrt())
    d = den(x, sigma, torch.tensor([2]))
    assert torch.allclose(out.double(), d, atol=1e-4 * float(d.abs().max()))
    other = den(x, sigma, torch.tensor([3]))  # another prompt is another denoiser
    assert float((other - d).abs().max()) > 1e-3 * float(d.abs().max())


def test_prompts_are_embedded_once_and_the_cache_is_keyed(folders, prompt_file, tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "emb.safetensors"
    _denoiser(folders["sd15"], prompt_file, cache, 5.0)
    assert prompt_module.cached_prompts(cache) == PROMPTS

    def no_encoder(*args, **kwargs):
        raise AssertionError("the prompt set was embedded again")

    monkeypatch.setattr(prompt_module, "encode_prompts", no_encoder)
    _denoiser(folders["sd15"], prompt_file, cache, 7.0)  # same prompts, another scale: the embeddings are reused
    with pytest.raises(AssertionError, match="embedded again"):  # another negative prompt: embedded again
        _denoiser(folders["sd15"], prompt_file, cache, 5.0, negative_prompt="blurry")


def test_the_bank_splits_by_prompt_and_the_test_prompts_decide_nothing(folders, prompt_file, tmp_path: Path) -> None:
    den = _denoiser(folders["sd15"], prompt_file, tmp_path / "emb.safetensors", 3.0)
    bank = build_bank(den, shape=den.shape, sigma_min=0.1, sigma_max=10.0, n_trajectories=12, grid_size=4,
                      dtype=torch.float32)
    by_set = {name: set(bank.cond[bank.split == i].tolist()) for i, name in enumerate(SPLIT_NAMES)}
    assert all(by_set.values()) and not (by_set["test"] & (by_set["fit"] | by_set["select"]))
    assert not by_set["fit"] & by_set["select"]
    assert set(bank.fit_conditions()) == by_set["fit"]  # what Phase-2 may train on
    plan = plan_for(den, shape=den.shape, sigma_min=0.1, sigma_max=10.0, n_trajectories=12, grid_size=4,
                    dtype="float32")
    keep = build_keep_set(den, plan, 8)
    assert set(keep.cond.tolist()) == by_set["fit"] | by_set["select"]


def _run(tmp_path: Path, capsys, study: str, *, files: dict[str, str] | None = None) -> str:
    for name, text in (files or {}).items():
        (tmp_path / name).write_text(text)
    (tmp_path / "study.toml").write_text(study)
    code = main(["run", "--study", str(tmp_path / "study.toml"), "--out", str(tmp_path / "run"), "--in-process",
                 "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err
    return err


def _study(folder: Path, *, options: str = "{ height = 16, width = 16 }", prompts: str = "prompts.txt",
           guidance: float = 5.0) -> str:
    return (f'nfe = 4\n[model]\nkind = "pipeline"\npath = "{folder}"\noptions = {options}\n'
            f'[prompts]\nfile = "{prompts}"\nguidance_scale = {guidance}\n')


@pytest.mark.parametrize("case,expect", [
    ("missing", "does not exist"),
    ("empty", "holds no prompts"),
    ("guidance", "skips the unconditional branch"),
    ("size", "not divisible by 2"),
    ("no size", "needs options.height"),
    ("class", "drives UNet2DConditionModel"),
    ("no prompts", "needs a [prompts] table"),
])
def test_bad_input_is_one_line_before_any_network_loads(case: str, expect: str, folders, tmp_path: Path, capsys,
                                                         monkeypatch) -> None:
    def no_load(*args, **kwargs):
        raise AssertionError("a network was loaded")

    monkeypatch.setattr("fewstep_search.models.t2i.guided._load_network", no_load)
    monkeypatch.setattr(prompt_module, "encode_prompts", no_load)
    good = {"prompts.txt": "\n".join(PROMPTS)}
    folder = folders["sd15"]
    if case == "class":
        index = json.loads((folder / "model_index.json").read_text())
        other = tmp_path / "wan"
        other.mkdir()
        wan = {**index, "_class_name": "WanPipeline", "unet": None,
               "transformer": ["diffusers", "WanTransformer3DModel"]}
        (other / "model_index.json").write_text(json.dumps(wan))
    studies = {
        "missing": _study(folder, prompts="nowhere.txt"),
        "empty": _study(folder, prompts="empty.txt"),
        "guidance": _study(folder, guidance=0.5),
        "size": _study(folder, options="{ height = 17, width = 16 }"),
        "no size": _study(folder, options="{ width = 16 }"),
        "class": _study(tmp_path / "wan"),
        "no prompts": f'nfe = 4\n[model]\nkind = "pipeline"\npath = "{folder}"\n',
    }
    err = _run(tmp_path, capsys, studies[case], files={**good, "empty.txt": "\n\n"})
    assert expect in err
    assert not (tmp_path / "run" / "prompt_embeddings.safetensors").exists()


@pytest.mark.parametrize("name", ["sd15", "flux"])
def test_a_copy_of_the_guided_denoiser_calls_its_own_network(name: str, folders, prompt_file, tmp_path: Path) -> None:
    """A Phase-2 student is a deep copy: changing its weights must change its output, and only its output."""
    import copy

    den = _denoiser(folders[name], prompt_file, tmp_path / "emb.safetensors", 3.0)
    student = copy.deepcopy(den)
    x, sigma, cond = torch.randn(2, 4, 8, 8), torch.tensor([2.0, 0.5]), torch.tensor([0, 4])
    before = den(x, sigma, cond)
    with torch.no_grad():
        for p in student.inner.parameters():
            p.mul_(1.1)
    assert torch.equal(den(x, sigma, cond), before)
    assert not torch.allclose(student(x, sigma, cond), before, atol=1e-4)
