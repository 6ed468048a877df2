"""Study files: the validated TOML configuration of a run (model, bank, search).

A study file is plain data (TOML), validated with pydantic so a typo or a wrong type fails with one line naming the
key; nothing in it is evaluated. Example (`studies/mixture64.toml`):

    nfe = 6
    [model]
    kind = "mixture"
    options = { dim = 64 }
    [bank]
    n_trajectories = 256

Command-line options (`--budget`) override the file; the resolved config is written to the run directory.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fewstep_search.search.config import SearchSpec

__all__ = ["ModelSpec", "BankSpec", "RefineSpec", "StudyConfig", "StudyError", "load_study"]


class StudyError(ValueError):
    """A study file is missing, is not TOML, or does not validate; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """Which denoiser to load (see docs/models.md): a built-in, a diffusers folder, or a user factory."""

    kind: Literal["digits", "mixture", "diffusers", "edm", "factory"] = "digits"
    path: str | None = None
    factory: str | None = Field(default=None, description="'module:function' or 'file.py:function' (user code)")
    options: dict[str, Any] = Field(default_factory=dict)
    sigma_min: float | None = Field(default=None, gt=0, description="override the model's advertised range")
    sigma_max: float | None = Field(default=None, gt=0)
    shape: list[int] | None = Field(default=None, description="per-sample shape, where the model does not say")

    @property
    def model_id(self) -> str:
        """A stable identity for bank metadata: a bank built for one model is never reused for another."""
        import json

        ref = self.path or self.factory or ""
        opts = json.dumps(self.options, sort_keys=True) if self.options else ""
        return ":".join(p for p in (self.kind, ref, opts) if p)

    @model_validator(mode="after")
    def _needs(self) -> ModelSpec:
        if self.kind == "diffusers" and not self.path:
            raise ValueError("model.kind = 'diffusers' needs model.path (a local folder)")
        if self.kind in ("factory", "edm") and not self.factory:
            raise ValueError(f"model.kind = '{self.kind}' needs model.factory = 'module:function'")
        return self


class BankSpec(_Strict):
    """Reference-trajectory bank settings (`fewstep_search.bank.build_bank`)."""

    # Defaults sized for a laptop CPU and a small network (the built-in digits model: ~25 s); the analytic
    # studies in studies/ ask for more trajectories, a finer grid and float64.
    n_trajectories: int = Field(default=128, ge=4)
    grid_size: int = Field(default=64, ge=8)
    heldout_fraction: float = Field(default=0.5, gt=0, lt=1)
    substeps: int = Field(default=2, ge=1)
    probes: int = Field(default=1, ge=1)
    dtype: Literal["float32", "float64"] = "float32"
    seed: int = 0
    batch_size: int | None = Field(default=None, ge=1)
    store_float16: bool = False
    project_dim: int | None = Field(default=None, ge=1)


class RefineSpec(_Strict):
    """In-process Phase-1 settings (`fewstep_search.optimize.search_in_process`)."""

    heuristics: list[str] = Field(
        default_factory=lambda: ["edm", "log_uniform", "vp_time_uniform", "vp_time_quadratic"]
    )
    refine_starts: int = Field(default=2, ge=0)
    refine_steps: int = Field(default=150, ge=0)
    lr: float = Field(default=0.05, gt=0)
    solver: Literal["ddim"] = "ddim"


class StudyConfig(_Strict):
    """A whole study. `nfe` is the budget (network evaluations of the first-order solver)."""

    nfe: int = Field(default=10, ge=1, le=1000)
    model: ModelSpec = Field(default_factory=ModelSpec)
    bank: BankSpec = Field(default_factory=BankSpec)
    phase1: RefineSpec = Field(default_factory=RefineSpec)
    search: SearchSpec = Field(default_factory=SearchSpec)
    device: str = "cpu"

    def with_overrides(self, **changes: Any) -> StudyConfig:
        """A copy with top-level fields replaced (None values ignored), validated again."""
        data = self.model_dump()
        data.update({k: v for k, v in changes.items() if v is not None})
        return StudyConfig.model_validate(data)


def _format_errors(exc: ValidationError) -> str:
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{loc}: {first['msg']}{more}"


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
        return StudyConfig.model_validate(data)
    except ValidationError as exc:
        raise StudyError(f"study file {p}: {_format_errors(exc)}") from None
