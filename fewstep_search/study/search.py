"""The `[search]` table of a study file: how Phase-1 runs as a search (trials, workers, record, pruning).

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

This module is data only (a study is data). The names in it are checked against the optimizer, objective and
parameterization registries by `fewstep_search.phase1.portfolio.trial_specs`, which the CLI calls right after
loading the study, so a typo still fails with one line before any work.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from fewstep_search.schedules import BEST_START, DEFAULT_HEURISTICS, SCHEDULE_FAMILIES
from fewstep_search.study._base import Strict

__all__ = ["TrialTemplate", "SearchSpec", "PruningSpec", "DEFAULT_PORTFOLIO"]


class TrialTemplate(Strict):
    """A group of trials: one optimizer on one (objective, parameterization, solver), from each of `starts`."""

    optimizer: str
    objective: Literal["bw", "b0", "direct"] = "bw"
    parameterization: str = "logits"
    solver: str = "ddim"
    starts: list[str] = Field(default_factory=lambda: ["edm"], min_length=1)
    hyper: dict[str, Any] = Field(default_factory=dict)
    options: dict[str, Any] = Field(default_factory=dict)
    seed: int = 0

    @field_validator("starts")
    @classmethod
    def _families(cls, value: list[str]) -> list[str]:
        return _known_families(value)


def _known_families(value: list[str]) -> list[str]:
    unknown = [v for v in value if v not in SCHEDULE_FAMILIES and v != BEST_START]
    if unknown:
        raise ValueError(f"unknown schedule families {unknown}; known: {', '.join(SCHEDULE_FAMILIES)}")
    return value


def _t(optimizer: str, objective: str, parameterization: str, starts: list[str], **hyper: Any) -> dict[str, Any]:
    return {"optimizer": optimizer, "objective": objective, "parameterization": parameterization,
            "starts": starts, "hyper": hyper}


DEFAULT_PORTFOLIO: tuple[dict[str, Any], ...] = (
    # Cheap (milliseconds to seconds, run first in the driver): the exact grid optima of both bounds, the bound
    # off the grid, and the one-shot published peers (GITS's DP on the teacher grid, DM-NonUniform's model-free
    # objective).
    _t("dp", "bw", "grid", ["edm"]),
    _t("dp", "b0", "grid", ["edm"]),
    _t("lbfgsb", "bw", "logits", ["edm"], maxiter=100),
    _t("gits", "direct", "logits", ["edm"]),
    _t("dm_nonuniform", "direct", "logits", ["edm"]),
    # Costly (one solve of the fit trajectories per evaluation), stopped early when they cannot win, and each
    # within `trial_seconds` of wall time: the iteration budgets below are caps that a cheap model reaches (an
    # analytic mixture: seconds) and an expensive one does not (the digits U-Net: the time budget ends them).
    _t("dp_adam", "direct", "logits", ["edm"], steps=200, lr=0.05),  # B_w's grid DP, then Adam on E (docs/design.md)
    _t("adam", "direct", "logits", ["vp_time_quadratic"], steps=200, lr=0.05),
    _t("lbfgsb", "direct", "logits", ["edm", "vp_time_quadratic"], maxiter=100),
    _t("trust_constr", "direct", "nodes", ["edm"], maxiter=100),
    # "best": the schedule of the best cheap trial of the same solver (DP, bound, one-shot peer or heuristic,
    # picked on select), refined on the true error: the search is never limited to the starts listed here.
    _t("lbfgsb", "direct", "logits", ["best"], maxiter=100),
    # The multistep solvers get local refinement too (their optima differ from DDIM's, and L-BFGS-B and Adam
    # land in different basins): the search returns a (solver, schedule) pair.
    {**_t("lbfgsb", "direct", "logits", ["best"], maxiter=100), "solver": "dpmpp_2m"},
    {**_t("lbfgsb", "direct", "logits", ["best"], maxiter=100), "solver": "ipndm"},
    {**_t("adam", "direct", "logits", ["edm"], steps=200, lr=0.05), "solver": "dpmpp_2m"},
    {**_t("adam", "direct", "logits", ["edm"], steps=200, lr=0.05), "solver": "ipndm"},
    # Samplers on the low-dimensional families (global within the family, forward solves only).
    _t("tpe", "direct", "edm_rho", ["edm"], n_trials=100),
    _t("tpe", "direct", "beta_warp", ["log_uniform"], n_trials=100),
    {**_t("cmaes", "direct", "spline", ["log_uniform"], n_trials=100), "options": {"knots": 6}},
)
"""The default trials: every optimizer family, each where it is strongest (see docs/search.md)."""


class PruningSpec(Strict):
    """Early stopping of costly (true-error) trials by successive halving on the select error.

    A trial reports the select E of its best schedule every `report_every` objective evaluations; at rungs
    `grace * factor^k` reports, a trial worse than the best 1/`factor` of those that reached the rung stops
    (Ray Tune's ASHA in the Ray executor, Optuna's successive-halving pruner in process). A stopped trial keeps
    its best schedule and is scored like every other.
    """

    enabled: bool = True
    report_every: int = Field(default=5, ge=1)
    grace: int = Field(default=2, ge=1, description="reports before a trial can be stopped")
    factor: int = Field(default=3, ge=2)


class SearchSpec(Strict):
    """Phase-1 search settings (`fewstep-search search`, and Phase-1 of every round of `run`)."""

    workers: int | None = Field(default=None, ge=1, description="concurrent trials; local Ray CPUs (default: all)")
    address: str | None = Field(default=None, description="Ray cluster address; default: start Ray locally")
    storage: str | None = Field(default=None, description="Optuna storage URL; default sqlite:///DIR/optuna.db")
    max_failures: int = Field(default=1, ge=0, description="retries of a failing trial before it is recorded FAIL")
    cpus_per_trial: float = Field(default=1.0, gt=0)
    gpus_per_trial: float = Field(default=0.25, gt=0, le=1, description="GPU share per trial when device = cuda")
    tie_tolerance: float = Field(default=1e-3, ge=0, description="relative select E difference counted as a tie")
    fit_trajectories: int | Literal["auto", "all"] = Field(
        default="auto", description="fit trajectories the true-error objective solves per evaluation (a fixed "
        "subset; all; auto: as many as one forward solve does in seconds_per_evaluation, at least 16): the "
        "cost of costly trials scales with it; the select set still picks the winner")
    seconds_per_evaluation: float = Field(default=0.25, gt=0, description="the auto fit_trajectories target")
    trial_seconds: float = Field(
        default=30.0, ge=0, description="wall-time budget of each costly trial (the optimizers' own budgets are "
        "caps a cheap model reaches first); 0: iteration budgets only (reproducible across machines)")
    seconds: float = Field(
        default=55.0, ge=0, description="wall-time budget of the whole search, counted from its start: every "
        "cheap trial runs; costly trials start best start first, none starts after the budget and running ones "
        "end at it with their best schedule; the trials not run are listed; 0: no budget")

    @field_validator("fit_trajectories")
    @classmethod
    def _positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"fit_trajectories must be >= 1, 'auto' or 'all', got {value}")
        return value
    pruning: PruningSpec = Field(default_factory=PruningSpec)
    heuristics: list[str] = Field(default_factory=lambda: list(DEFAULT_HEURISTICS))
    solvers: list[str] = Field(default_factory=lambda: ["ddim", "dpmpp_2m", "ipndm"], min_length=1,
                               description="solvers every heuristic is scored with (the solver is searched too)")
    trials: list[TrialTemplate] = Field(default_factory=lambda: [TrialTemplate(**t) for t in DEFAULT_PORTFOLIO])

    @field_validator("heuristics")
    @classmethod
    def _families(cls, value: list[str]) -> list[str]:
        return _known_families(value)
