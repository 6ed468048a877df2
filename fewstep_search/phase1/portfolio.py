"""From a study's `[search]` table (data) to the validated, ordered list of trials the engine runs.

Order matters for wall time: the baselines and the cheap trials (DP, bounds: milliseconds) run first, so the
costly true-error trials, which are stopped early when they cannot win, are compared against finished ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fewstep_search.phase1.registry import OptimizerFactory
from fewstep_search.phase1.trials import TrialSpec
from fewstep_search.schedules import DEFAULT_HEURISTICS
from fewstep_search.study.search import SearchSpec, TrialTemplate

__all__ = ["trial_specs", "baseline_specs", "template_specs", "library_specs"]


def baseline_specs(heuristics: Sequence[str], solvers: Sequence[str] = ("ddim",)) -> list[TrialSpec]:
    """The hand-made schedules as trials (optimizer "none"), with every solver, scored like every other."""
    return [TrialSpec(optimizer="none", objective="direct", parameterization="logits", start=h, solver=s)
            for s in solvers for h in heuristics]


def template_specs(template: TrialTemplate) -> list[TrialSpec]:
    """The trials of one `[[search.trials]]` group: one per start."""
    return [
        TrialSpec(optimizer=template.optimizer, objective=template.objective,
                  parameterization=template.parameterization, start=s, hyper=dict(template.hyper),
                  options=dict(template.options), seed=template.seed, solver=template.solver)
        for s in template.starts
    ]


def _ordered(specs: Sequence[TrialSpec]) -> list[TrialSpec]:
    unique: dict[str, TrialSpec] = {}
    for s in specs:
        unique.setdefault(s.key, s)
    return sorted(unique.values(), key=lambda s: (not s.is_baseline, s.is_costly))  # stable: file order within


def trial_specs(search: SearchSpec, *, budget: int | None = None,
                extra_optimizers: Mapping[str, OptimizerFactory] | None = None) -> list[TrialSpec]:
    """Every trial of the study, validated (one-line ValueError naming the bad trial), cheap ones first."""
    specs = baseline_specs(search.heuristics, search.solvers)
    for t in search.trials:
        specs.extend(template_specs(t))
    for s in specs:
        s.validate(budget=budget, extra_optimizers=extra_optimizers)
    return _ordered(specs)


def library_specs(*, refine_starts: Sequence[str] = ("vp_time_quadratic",), refine_steps: int = 60,
                  lr: float = 0.05, heuristics: Sequence[str] = DEFAULT_HEURISTICS) -> list[TrialSpec]:
    """The in-process default of `optimize_schedule`: baselines, B_w and B_0 DP, DP -> Adam, Adam from starts.

    Smaller than the CLI's portfolio (a user's model in a notebook should finish in minutes on a CPU).
    """
    specs = baseline_specs(heuristics)
    specs += [TrialSpec(optimizer="dp", objective=b, parameterization="grid", start="edm") for b in ("bw", "b0")]
    if refine_steps > 0:
        hyper = {"steps": refine_steps, "lr": lr}
        specs.append(TrialSpec(optimizer="dp_adam", objective="direct", parameterization="logits", start="edm",
                               hyper=hyper))
        specs += [TrialSpec(optimizer="adam", objective="direct", parameterization="logits", start=s, hyper=hyper)
                  for s in refine_starts]
    return _ordered(specs)
