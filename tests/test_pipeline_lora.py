"""LoRA Phase-2 on a pipeline (`phase2.lora_rank`): one network whose adapters train and whose base is the teacher,
results in the base model's own format, and the adapters in diffusers' LoRA format for `pipe.load_lora_weights`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")
from diffusers import DiffusionPipeline  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from fewstep_search.cli import main  # noqa: E402
from fewstep_search.commands.export import _load  # noqa: E402
from fewstep_search.models.source import ModelSource, load_checkpoint_into  # noqa: E402
from fewstep_search.phase2.models import load_round_models  # noqa: E402
from fewstep_search.rundir import RunDir  # noqa: E402
from fewstep_search.study import Phase2Spec  # noqa: E402

try:
    from fixtures_pipelines import save_sd15
    from test_pipeline_run import QUICK, STUDY
except ImportError:  # pragma: no cover
    from tests.fixtures_pipelines import save_sd15
    from tests.test_pipeline_run import QUICK, STUDY


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lora")
    folder = save_sd15(root / "pipeline")
    (root / "prompts.txt").write_text("a red circle\na blue square\ntwo green dots\na yellow star\n")
    (root / "it.toml").write_text(STUDY.replace("PIPELINE_FOLDER", str(folder)) + QUICK + "lora_rank = 4\n")
    assert main(["run", "--study", str(root / "it.toml"), "--out", str(root / "run"), "--in-process", "--quiet"]) == 0
    return root


def test_the_teacher_is_the_students_network_with_its_adapters_off(lora_run: Path) -> None:
    config = RunDir(lora_run / "run").recorded_config()
    base = _load(config["model"], None, lora_run / "run")
    source = ModelSource(denoiser=base)
    models = load_round_models(source, source, torch.device("cpu"), Phase2Spec(lora_rank=4, max_steps=1))
    assert models.lora and models.teacher.inner is models.student  # one network, no second copy of the weights
    trainable = {n for n, p in models.module.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    with torch.no_grad():
        for name, p in models.module.named_parameters():
            if ".lora_B" in name:
                p.normal_()
    x, sigma, cond = torch.randn(2, 4, 8, 8) * 5, torch.tensor([5.0, 1.0]), torch.tensor([0, 1])
    student, teacher, reference = models.student(x, sigma, cond), models.teacher(x, sigma, cond), base(x, sigma, cond)
    assert torch.allclose(teacher, reference, atol=1e-5) and not torch.allclose(student, reference, atol=1e-3)


def test_the_rounds_adapters_load_in_the_pipeline_as_its_merged_weights(lora_run: Path) -> None:
    run = lora_run / "run"
    adapters = load_file(str(run / "round_1" / "adapters.safetensors"))
    assert any(".lora_B" in k and v.abs().max() > 0 for k, v in adapters.items())  # the round trained them
    assert main(["export", str(run)]) == 0  # the listing names the format
    den = _load(RunDir(run).recorded_config()["model"], None, run)
    from fewstep_search.integrations.pipeline_folder import export_lora_folder

    out = export_lora_folder(den, lora_run / "pipeline", run / "round_1" / "adapters.safetensors",
                             lora_run / "lora", rank=4)
    pipe = DiffusionPipeline.from_pretrained(lora_run / "pipeline", local_files_only=True)
    pipe.load_lora_weights(out)
    load_checkpoint_into(den.inner, run / "round_1" / "model.safetensors")  # the merged result format
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500.0, 20.0])
    text = torch.randn(2, 16, 16)
    with torch.no_grad():
        lora = pipe.unet(x, t, encoder_hidden_states=text).sample
        merged = den.inner.unet(x, t, encoder_hidden_states=text).sample
        base = DiffusionPipeline.from_pretrained(lora_run / "pipeline").unet(x, t, encoder_hidden_states=text).sample
    assert torch.allclose(lora, merged, atol=1e-5 * float(merged.abs().max()))
    assert not torch.allclose(lora, base, atol=1e-6)


def test_a_lora_checkpoint_resumes_the_adapters_and_its_merged_weights_are_the_student(lora_run: Path) -> None:
    from fewstep_search.phase2.checkpoints import Checkpoint, TrainState
    from fewstep_search.phase2.optim import make_ema

    base = _load(RunDir(lora_run / "run").recorded_config()["model"], None, lora_run / "run")
    source, spec, cpu = ModelSource(denoiser=base), Phase2Spec(lora_rank=2, max_steps=1), torch.device("cpu")
    first = load_round_models(source, source, cpu, spec)
    ema = make_ema(first.module, decay=0.9, share_frozen=True)
    shared = {p.data_ptr() for p in first.module.parameters() if not p.requires_grad}
    assert shared <= {p.data_ptr() for p in ema.module.parameters()}  # the EMA holds no second base
    with torch.no_grad():
        for module in (first.module, ema.module):
            for name, p in module.named_parameters():
                if ".lora_" in name:
                    p.normal_(std=0.1)
    saved = Checkpoint(ema=first.result_state(ema.module), student=first.student_state(first.module), optimizer={},
                       state=TrainState(history=[]), pool=None, adapters=first.adapters_state(ema.module))
    assert all(".lora_" in k for k in saved.student) and not any(".lora_" in k for k in saved.ema)
    second = load_round_models(source, source, cpu, spec)
    ema2 = make_ema(second.module, decay=0.9, share_frozen=True)
    second.restore(ema2.module, saved)
    x, sigma, cond = torch.randn(2, 4, 8, 8) * 3, torch.tensor([3.0, 0.3]), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.allclose(second.student(x, sigma, cond), first.student(x, sigma, cond), atol=1e-6)
        assert torch.allclose(ema2.module(x, sigma, cond), ema.module(x, sigma, cond), atol=1e-6)
        merged = _load(RunDir(lora_run / "run").recorded_config()["model"], None, lora_run / "run")
        merged.inner.load_state_dict(saved.ema)  # the result format: the base model's own keys
        assert torch.allclose(merged(x, sigma, cond), ema.module(x, sigma, cond), atol=1e-4)
