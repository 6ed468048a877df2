"""The executor the CLI runs Phase-1 with: the cheap trials as Ray tasks, then the costly ones through Ray Tune."""

from __future__ import annotations

from pathlib import Path

from fewstep_search.phase1.engine import InProcessExecutor, TieredExecutor
from fewstep_search.phase1.ray_tasks import RayTaskExecutor
from fewstep_search.phase1.ray_tune import RayTuneExecutor
from fewstep_search.study.search import SearchSpec

__all__ = ["tiered_executor"]


def tiered_executor(search: SearchSpec, *, storage_path: str | Path | None = None, name: str = "phase1",
                    cheap_on_ray: bool = True) -> TieredExecutor:
    """What the CLI runs: the cheap trials as Ray tasks, then the costly ones as a Tune experiment.

    Why the cheap tier on Ray too: a heuristic or a one-shot peer costs well under a second to optimize but about
    a second to score (a solve of the select and test trajectories), and one driver process with two torch
    threads scores a small batch hardly faster than with one; Ray tasks (`ray_tasks.RayTaskExecutor`, not Tune:
    no per-trial overhead to speak of) score `workers` trials at a time. `cheap_on_ray=False` runs them in the
    driver.
    """
    common = {"workers": search.workers, "address": search.address, "max_failures": search.max_failures,
              "cpus_per_trial": search.cpus_per_trial, "gpus_per_trial": search.gpus_per_trial}
    cheap = RayTaskExecutor(**common) if cheap_on_ray else InProcessExecutor(max_failures=search.max_failures)
    costly = RayTuneExecutor(**common, pruning=search.pruning, storage_path=storage_path, name=name)
    return TieredExecutor(costly=costly, cheap=cheap)
