"""Study files: the validated TOML configuration of a run (model, bank, search, Phase-2).

A study file is plain data (TOML), validated with pydantic so a typo or a wrong type fails with one line naming the
key; nothing in it is evaluated. This package holds only the data types (a study is data): the modules that run
it read them. Example (`studies/mixture64.toml`):

    nfe = 6
    [model]
    kind = "mixture"
    options = { dim = 64 }
    [bank]
    n_trajectories = 256

Command-line options (`--budget`, `--rounds`, `--device`, ...) override the file; the resolved config is written
to the run directory.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from fewstep_search.study._base import Strict
from fewstep_search.study.phase2 import Phase2Spec
from fewstep_search.study.search import DEFAULT_PORTFOLIO, PruningSpec, SearchSpec, TrialTemplate

__all__ = [
    "ModelSpec",
    "BankSpec",
    "StudyConfig",
    "StudyError",
    "SearchSpec",
    "TrialTemplate",
    "PruningSpec",
    "PromptsSpec",
    "Phase2Spec",
    "DEFAULT_PORTFOLIO",
    "MODEL_KIND_NAMES",
    "load_study",
    "format_validation_error",
]

MODEL_KIND_NAMES = ("digits", "mixture", "diffusers", "edm", "factory", "flow", "pipeline")


class StudyError(ValueError):
    """A study file is missing, is not TOML, or does not validate; the message names the file and the key."""


class ModelSpec(Strict):
    """Which denoiser to load (see docs/models.md): a built-in, a diffusers folder, or a user factory."""

    kind: Literal["digits", "mixture", "diffusers", "edm", "factory", "flow", "pipeline"] = "digits"
    path: str | None = None
    factory: str | None = Field(default=None, description="'module:function' or 'file.py:function' (user code)")
    options: dict[str, Any] = Field(default_factory=dict)
    sigma_min: float | None = Field(default=None, gt=0, description="narrow the model's advertised range")
    sigma_max: float | None = Field(default=None, gt=0)
    shape: list[int] | None = Field(default=None, description="per-sample shape, where the model does not say")
    conditions: list[str | int | float] | None = Field(
        default=None, min_length=1, description="conditions (class labels, prompts) the schedule is searched over")
    conditions_file: str | None = Field(default=None, description="a JSON list, or one condition per line")

    @property
    def model_id(self) -> str:
        """A stable identity for bank metadata: a bank built for one model is never reused for another."""
        ref = self.path or self.factory or ""
        opts = json.dumps(self.options, sort_keys=True) if self.options else ""
        conds = f"conditions={json.dumps(self.conditions)}" if self.conditions else (
            f"conditions_file={self.conditions_file}" if self.conditions_file else "")
        return ":".join(p for p in (self.kind, ref, opts, conds) if p)

    @model_validator(mode="after")
    def _needs(self) -> ModelSpec:
        if self.kind in ("diffusers", "pipeline") and not self.path:
            raise ValueError(f"model.kind = '{self.kind}' needs model.path (a local folder)")
        if self.kind in ("factory", "edm") and not self.factory:
            raise ValueError(f"model.kind = '{self.kind}' needs model.factory = 'module:function'")
        if self.kind == "flow" and not (self.path or self.factory):
            raise ValueError("model.kind = 'flow' needs model.path (a diffusers folder) or model.factory")
        if self.conditions and self.conditions_file:
            raise ValueError("give model.conditions or model.conditions_file, not both")
        if (self.conditions or self.conditions_file) and self.kind not in ("factory", "flow", "edm"):
            raise ValueError(f"model.kind = '{self.kind}' takes no conditions (a factory model can)")
        if "conditions" in self.options:
            raise ValueError("list conditions as model.conditions, not inside model.options")
        return self


class PromptsSpec(Strict):
    """A text-to-image pipeline's prompt set (docs/models.md): one schedule is searched for all of them."""

    file: str = Field(description="one prompt a line; relative paths follow the study file")
    guidance_scale: float = Field(default=7.5, ge=0, description="the pipeline's guidance_scale")
    negative_prompt: str | None = Field(default=None, description="None: the pipeline's own default")


class BankSpec(Strict):
    """Reference-trajectory bank settings (`fewstep_search.bank.build_bank`)."""

    # Defaults sized for a laptop CPU and a small network (the built-in digits model: about a minute); the
    # analytic studies in studies/ ask for more trajectories, a finer grid and float64. Thirds, not quarters:
    # fitting a schedule needs few trajectories, while picking among schedules and reporting the pick need many,
    # because a schedule's error over trajectories can be heavy-tailed (at N = 10 on digits, 32 select
    # trajectories let DPM-Solver++(2M) schedules with a few large misses win; docs/phase2.md).
    n_trajectories: int = Field(default=192, ge=4)
    grid_size: int = Field(default=64, ge=8)
    select_fraction: float = Field(default=1 / 3, gt=0, lt=1, description="trajectories the winner is picked on")
    test_fraction: float = Field(default=1 / 3, gt=0, lt=1, description="trajectories results are reported on")
    substeps: int = Field(default=2, ge=1)
    probes: int = Field(default=1, ge=1)
    gain_substeps: int = Field(default=1, ge=1)
    dtype: Literal["float32", "float64"] = "float32"
    seed: int = 0
    batch_size: int | None = Field(default=None, ge=1, description="trajectories per chunk (memory only)")
    sharded: bool = Field(
        default=False, description="build the bank as resumable shards, one Ray task per shard on the run's Ray "
        "(all its CPUs, one torch thread each; one GPU each on cuda); false: in the run's own process"
    )
    keep_states: bool | None = Field(default=None, description="default: when they fit in 256 MiB")
    store_float16: bool = False
    project_dim: int | None = Field(default=None, ge=1)
    # 256: a fine-tuned student now and then lands a trajectory in another mode (E ~4.7 on the digits model where
    # the untouched pair has 0.3); one such flip moves the mean of 128 trajectories by ~0.035, a fifth of E.
    keep_trajectories: int = Field(
        default=256, ge=0, description="fresh reference trajectories, solved like the bank's, on which the loop "
        "decides which (schedule, model) pair to keep and when to stop (0: on the select set, where Phase-1's "
        "winner was picked: its error there is optimistic)"
    )

    @model_validator(mode="after")
    def _sets(self) -> BankSpec:
        if self.select_fraction + self.test_fraction >= 1:
            raise ValueError("bank.select_fraction + bank.test_fraction must be < 1 (the rest is fitted on)")
        return self

    def identity(self) -> dict[str, Any]:
        """The settings that determine the bank's contents (batch_size and sharded move memory and time, not
        results: a sharded build equals the single-process one to float round-off; the keep set is a file of
        its own)."""
        return self.model_dump(exclude={"batch_size", "sharded", "keep_trajectories"})


class StudyConfig(Strict):
    """A whole study. `nfe` is the budget (network evaluations of the first-order solver)."""

    nfe: int = Field(default=10, ge=1, le=1000)
    rounds: int = Field(default=1, ge=0, le=100, description="Phase-1 + Phase-2 rounds; 0 = Phase-1 alone")
    model: ModelSpec = Field(default_factory=ModelSpec)
    bank: BankSpec = Field(default_factory=BankSpec)
    search: SearchSpec = Field(default_factory=SearchSpec)
    phase2: Phase2Spec = Field(default_factory=Phase2Spec)
    prompts: PromptsSpec | None = None
    device: str = "cpu"

    @model_validator(mode="after")
    def _prompts_need_a_pipeline(self) -> StudyConfig:
        if (self.prompts is None) == (self.model.kind == "pipeline"):
            raise ValueError("model.kind = 'pipeline' needs a [prompts] table (file, guidance_scale)"
                             if self.prompts is None else
                             "[prompts] is for model.kind = 'pipeline' (a text-to-image pipeline folder)")
        return self

    @property
    def model_id(self) -> str:
        """The model's identity (`ModelSpec.model_id`), with the prompt set's for a pipeline: a bank built for one
        prompt set or guidance scale is never reused for another."""
        if self.prompts is None:
            return self.model.model_id
        p = self.prompts
        return f"{self.model.model_id}:prompts={p.file}@{_file_digest(p.file)}:g={p.guidance_scale:g}" + (
            f":neg={json.dumps(p.negative_prompt)}" if p.negative_prompt is not None else "")

    def with_overrides(self, **changes: Any) -> StudyConfig:
        """A copy with top-level fields replaced (None values ignored), validated again (StudyError if not)."""
        data = self.model_dump()
        data.update({k: v for k, v in changes.items() if v is not None})
        try:
            return StudyConfig.model_validate(data)
        except ValidationError as exc:
            raise StudyError(format_validation_error(exc)) from None


def _file_digest(path: str) -> str:
    """A short hash of a file's bytes ("missing" where it cannot be read: the run reports that itself)."""
    import hashlib

    try:
        return hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()[:12]
    except OSError:
        return "missing"


def format_validation_error(exc: ValidationError) -> str:
    """The first error as one line, `key.path: message`, without pydantic's documentation link."""
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = str(first["msg"]).removeprefix("Value error, ")
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{loc}: {msg}{more}"


def load_study(path: str | Path | None) -> StudyConfig:
    """Parse and validate a study file; None gives the defaults (the built-in `digits` model)."""
    if path is None:
        return StudyConfig()
    p = Path(path)
    if not p.is_file():
        raise StudyError(f"study file {p} does not exist")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise StudyError(f"study file {p} is not valid TOML: {exc}") from None
    try:
        config = StudyConfig.model_validate(data)
    except ValidationError as exc:
        raise StudyError(f"study file {p}: {format_validation_error(exc)}") from None
    prompts = config.prompts
    if prompts is not None and not Path(prompts.file).expanduser().is_absolute():  # relative to the study file
        moved = prompts.model_copy(update={"file": str(p.parent / prompts.file)})
        config = config.model_copy(update={"prompts": moved})
    return config
