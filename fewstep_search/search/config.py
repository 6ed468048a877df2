"""The `[search]` table of a study file: how Phase-1 runs as a search (trials, workers, record).

Example (every key optional; the default portfolio is below):

    [search]
    workers = 2                       # concurrent trials (local Ray CPUs); default: all CPUs
    storage = "sqlite:///runs/x.db"   # the Optuna record; default: sqlite DIR/optuna.db
    heuristics = ["edm", "vp_time_quadratic"]

    [[search.trials]]
    optimizer = "adam"
    objective = "direct"
    parameterization = "logits"
    starts = ["edm", "vp_time_quadratic"]   # one trial per start
    hyper = { steps = 150, lr = 0.05 }

Names are checked against the registries when the study is loaded, so a typo fails with one line.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["TrialTemplate", "SearchSpec", "DEFAULT_PORTFOLIO", "DEFAULT_BASELINES"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrialTemplate(_Strict):
    """A group of trials: one optimizer on one (objective, parameterization), from each of `starts`."""

    optimizer: str
    objective: Literal["bw", "b0", "direct"] = "bw"
    parameterization: str = "logits"
    starts: list[str] = Field(default_factory=lambda: ["edm"], min_length=1)
    hyper: dict[str, Any] = Field(default_factory=dict)
    options: dict[str, Any] = Field(default_factory=dict)
    seed: int = 0

    @model_validator(mode="after")
    def _known(self) -> TrialTemplate:
        for spec in self.specs():
            spec.validate()
        return self

    def specs(self) -> list[Any]:
        """The `TrialSpec`s of this template, one per start."""
        from fewstep_search.search.trials import TrialSpec

        return [
            TrialSpec(
                optimizer=self.optimizer,
                objective=self.objective,
                parameterization=self.parameterization,
                start=s,
                hyper=dict(self.hyper),
                options=dict(self.options),
                seed=self.seed,
            )
            for s in self.starts
        ]


def _t(
    optimizer: str, objective: str, parameterization: str, starts: list[str], **hyper: Any
) -> dict[str, Any]:
    return {
        "optimizer": optimizer,
        "objective": objective,
        "parameterization": parameterization,
        "starts": starts,
        "hyper": hyper,
    }


DEFAULT_BASELINES: tuple[str, ...] = ("edm", "log_uniform", "vp_time_uniform", "vp_time_quadratic")
"""Heuristic schedules scored as trials (optimizer "none"): the reference every ratio is taken against."""

DEFAULT_PORTFOLIO: tuple[dict[str, Any], ...] = (
    # The exact grid optima of both bounds (milliseconds once the cost matrix is built).
    _t("dp", "bw", "grid", ["edm"]),
    _t("dp", "b0", "grid", ["edm"]),
    # DESIGN.md's recipe: B_w-DP, then Adam on the true error.
    _t("dp_adam", "direct", "logits", ["edm"], steps=150, lr=0.05),
    # Direct refinement from the heuristics with local methods: E has several local minima, and which one
    # generalizes best to the held-out trajectories differs by start, so cheap L-BFGS-B runs from every
    # usual start are worth their few seconds.
    _t("adam", "direct", "logits", ["vp_time_quadratic"], steps=150, lr=0.05),
    _t("lbfgsb", "direct", "logits", ["log_uniform", "edm", "vp_time_quadratic"], maxiter=60),
    _t("trust_constr", "direct", "nodes", ["edm"], maxiter=60),
    # Samplers on the low-dimensional families (global within the family, no gradients).
    _t("tpe", "direct", "edm_rho", ["edm"], n_trials=60),
    _t("tpe", "direct", "beta_warp", ["log_uniform"], n_trials=60),
    {**_t("cmaes", "direct", "spline", ["log_uniform"], n_trials=80), "options": {"knots": 6}},
    # The bound itself, off the grid (cheap; shows how far B_w's optimum is from E's).
    _t("lbfgsb", "bw", "logits", ["edm"], maxiter=100),
)
"""The default trials: every optimizer family, each where it is strongest (see docs/search.md)."""


class SearchSpec(_Strict):
    """Phase-1 search settings (`fewstep-search search`, and Phase-1 of `run`)."""

    workers: int | None = Field(
        default=None, ge=1, description="concurrent trials; local Ray CPUs (default: all)"
    )
    address: str | None = Field(default=None, description="Ray cluster address; default: start Ray locally")
    storage: str | None = Field(
        default=None, description="Optuna storage URL; default sqlite:///DIR/optuna.db"
    )
    max_failures: int = Field(
        default=1, ge=0, description="retries of a failing trial before it is recorded FAIL"
    )
    cpus_per_trial: float = Field(default=1.0, gt=0)
    tie_tolerance: float = Field(
        default=1e-3, ge=0, description="relative held-out E difference counted as a tie"
    )
    heuristics: list[str] = Field(default_factory=lambda: list(DEFAULT_BASELINES))
    trials: list[TrialTemplate] = Field(
        default_factory=lambda: [TrialTemplate(**t) for t in DEFAULT_PORTFOLIO]
    )

    @field_validator("heuristics")
    @classmethod
    def _families(cls, value: list[str]) -> list[str]:
        from fewstep_search.schedules import SCHEDULE_FAMILIES

        unknown = [v for v in value if v not in SCHEDULE_FAMILIES]
        if unknown:
            raise ValueError(f"unknown heuristic families {unknown}; known: {', '.join(SCHEDULE_FAMILIES)}")
        return value

    def specs(self) -> list[Any]:
        """Every `TrialSpec`: the heuristic baselines first, then the templates', without repeats."""
        from fewstep_search.search.trials import TrialSpec

        out: list[Any] = [
            TrialSpec(optimizer="none", objective="direct", parameterization="logits", start=h)
            for h in self.heuristics
        ]
        for t in self.trials:
            out.extend(t.specs())
        unique: dict[str, Any] = {}
        for s in out:
            unique.setdefault(s.key, s)
        return list(unique.values())
