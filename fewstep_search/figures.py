"""The run's pictures: a sample grid (same noise for every pair) and two plots, written into the run folder.

* `samples.png`: for image models, one labelled row per pair: the untouched model with its best heuristic, with
  the Phase-1 schedule, and each round's (schedule, fine-tuned model), all from the same seeded noise; a
  text-to-image pipeline's latents are decoded by its own VAE, each column captioned with its prompt;
* `plots/test_error.png`: test E of each pair;
* `plots/schedules.png`: every pair's schedule on a log-sigma axis.
Matplotlib draws the plots (Agg backend, no display needed).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fewstep_search.candidate import Candidate
from fewstep_search.denoiser import advertised
from fewstep_search.pictures import save_sample_grid
from fewstep_search.quality import sample
from fewstep_search.resolve import model_source
from fewstep_search.rundir import RunDir
from fewstep_search.study import StudyConfig

__all__ = ["write_run_figures", "pairs_of"]

_GRID_SAMPLES = 12


def pairs_of(results: Mapping[str, Any], rundir: RunDir) -> list[tuple[str, dict[str, Any], Path | None]]:
    """(label, row with `sigmas` and `test_error`, checkpoint or None) for every pair of a run's results."""
    p1 = rundir.phase1_result(1) or {}
    out: list[tuple[str, dict[str, Any], Path | None]] = []
    if p1.get("best_heuristic"):
        out.append((f"heuristic: {p1['best_heuristic']['name']}", p1["best_heuristic"], None))
    if p1.get("best"):
        out.append(("Phase-1", p1["best"], None))
    for rd in results.get("rounds", []):
        out.append((f"round {rd['round']}", {**rd["schedule"], "test_error": rd["test_error"]},
                    rundir.model_path(rd["round"])))
    return out


def _plots(pairs: list[tuple[str, dict[str, Any], Path | None]], folder: Path, nfe: int) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fewstep_search.atomic import atomic_path

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(6, 3.2))
    labels = [p[0] for p in pairs]
    ax.bar(range(len(pairs)), [p[1]["test_error"] for p in pairs], color="#4c72b0")
    ax.set_xticks(range(len(pairs)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("test E = mean ||x0_hat - x0*||")
    ax.set_title(f"test error per pair (NFE = {nfe})")
    fig.tight_layout()
    with atomic_path(folder / "test_error.png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    written.append(folder / "test_error.png")
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * len(pairs)))
    for i, (_, row, _) in enumerate(pairs):
        ax.scatter(row["sigmas"], [i] * len(row["sigmas"]), s=18)
    ax.set_xscale("log")
    ax.set_yticks(range(len(pairs)), labels, fontsize=8)
    ax.set_xlabel("sigma (log scale)")
    ax.invert_xaxis()
    ax.set_title("schedules")
    fig.tight_layout()
    with atomic_path(folder / "schedules.png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    written.append(folder / "schedules.png")
    return written


def write_run_figures(rundir: RunDir, results: Mapping[str, Any], config: StudyConfig, *,
                      study_path: Path | None) -> list[Path]:
    """Write the run's pictures (see the module docstring); returns their paths."""
    pairs = pairs_of(results, rundir)
    if not pairs:
        return []
    written = _plots(pairs, rundir.path / "plots", int(results["nfe"]))
    base = model_source(config, study_path=study_path, run_folder=rundir.path)
    teacher = base.load()
    shape = tuple(getattr(teacher, "shape", None) or config.model.shape or ())
    root = advertised(teacher, "pipeline_root")  # a text-to-image pipeline: its VAE decodes the latents
    if root is None and (len(shape) != 3 or shape[0] not in (1, 3)):
        return written  # not an image model: no sample grid
    prompts = list(getattr(teacher, "conditions", ()) or ())
    n = min(_GRID_SAMPLES, max(4, len(prompts))) if root is not None else _GRID_SAMPLES
    decode = None
    if root is not None:
        from fewstep_search.models.t2i.decode import vae_decoder

        decode = vae_decoder(root, device=config.device)
    rows = {}
    for label, row, checkpoint in pairs:
        den = teacher if checkpoint is None else base.with_checkpoint(checkpoint).load(cache=False)
        sched = Candidate.from_row(row).schedule
        images = sample(den, sched, n=n, shape=shape, seed=0, solver=sched.solver, device=config.device)
        rows[label] = images if decode is None else decode(images)
    captions = [str(prompts[i % len(prompts)]) for i in range(n)] if prompts else None
    written.append(save_sample_grid(rundir.path / "samples.png", rows, column_labels=captions))
    return written
