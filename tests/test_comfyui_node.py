"""The ComfyUI node in integrations/comfyui (no ComfyUI here): its contract, that its SIGMAS are the sampler the
run scored (`fewstep_search.solvers.sampling_sigmas`; t for flow models) and its sampler names, and one-line
refusals."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from fewstep_search.export import export_sigmas
from fewstep_search.models.flow import sigma_to_t
from fewstep_search.schedules import Schedule, karras

NODE = Path(__file__).resolve().parents[1] / "integrations" / "comfyui" / "fewstep_search_sigmas" / "__init__.py"


@pytest.fixture(scope="module")
def node():
    spec = importlib.util.spec_from_file_location("fewstep_search_sigmas", NODE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(tmp_path: Path, schedule: Schedule) -> Path:
    path = tmp_path / "run" / "best" / "schedule.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({**schedule.to_dict(), "round": 1}))
    return path


def test_the_node_keeps_comfyuis_contract(node) -> None:
    cls = node.NODE_CLASS_MAPPINGS["FewstepSigmas"]
    inputs = cls.INPUT_TYPES()
    assert inputs["required"]["schedule_json"][0] == "STRING"
    assert cls.RETURN_TYPES == ("SIGMAS", "SAMPLER", "STRING") and len(cls.RETURN_NAMES) == 3
    assert callable(getattr(cls(), cls.FUNCTION)) and "FewstepSigmas" in node.NODE_DISPLAY_NAME_MAPPINGS


@pytest.mark.parametrize(("solver", "name"), [("ddim", "euler"), ("dpmpp_2m", "dpmpp_2m"), ("ipndm", "ipndm"),
                                              ("heun", "heun")])
def test_the_sigmas_are_the_scored_sampler_and_the_sampler_matches(tmp_path, node, monkeypatch, solver, name):
    s = Schedule(karras(5, 0.002, 80.0).sigmas, solver=solver, family="vp")
    path = _write(tmp_path, s)
    sigmas, sampler_name, _ = node.read_result(path.parent.parent)  # a run folder works too
    np.testing.assert_array_equal(sigmas, export_sigmas(s))
    assert sampler_name == name
    made = []
    comfy = types.ModuleType("comfy")
    comfy.samplers = types.SimpleNamespace(sampler_object=lambda n: made.append(n) or f"SAMPLER<{n}>")
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.samplers", comfy.samplers)
    out = node.FewstepSigmas().load(str(path))
    assert torch.equal(out[0], torch.tensor(export_sigmas(s), dtype=torch.float32))
    assert out[1:] == (f"SAMPLER<{name}>", name) and made == [name]


def test_flow_models_get_t_and_only_the_first_order_sampler(tmp_path, node) -> None:
    s = Schedule(karras(4, 1 / 999, 999.0).sigmas, solver="ddim", family="flow")
    sigmas, name, _ = node.read_result(_write(tmp_path, s))
    np.testing.assert_allclose(sigmas, sigma_to_t(export_sigmas(s)), rtol=1e-15)
    assert name == "euler" and sigmas[-1] == 0.0
    with pytest.raises(ValueError, match="runs flow models in t") as info:
        node.read_result(_write(tmp_path / "b", Schedule(s.sigmas, solver="ipndm", family="flow")))
    assert "\n" not in str(info.value)


def test_bad_files_get_one_line(tmp_path, node) -> None:
    (tmp_path / "bad.json").write_text("{nope")
    for path, message in ((tmp_path / "missing.json", "cannot read"), (tmp_path / "bad.json", "cannot read")):
        with pytest.raises(ValueError, match=message):
            node.read_result(path)
    (tmp_path / "up.json").write_text(json.dumps({"sigmas": [1.0, 2.0]}))
    with pytest.raises(ValueError, match="strictly decreasing"):
        node.read_result(tmp_path / "up.json")
    (tmp_path / "rk.json").write_text(json.dumps({"sigmas": [2.0, 1.0], "solver": "reference"}))
    with pytest.raises(ValueError, match="no built-in sampler"):
        node.read_result(tmp_path / "rk.json")
