"""The alternating loop (docs/design.md section 1, "Alternation"): Phase-1 on the current model, Phase-2 on its winner.

Round r: Phase-1 searches a schedule s_r for the current model (the teacher in round 1, then the last student;
the teacher's bank is reused, a student's outputs on the grid are recomputed at the teacher's states) -> Phase-2
fine-tunes the current model on exactly s_r -> the pair (s_r, student_r) is evaluated. `rounds = 0` is Phase-1
alone. The loop stops after `rounds`, or early when a round improves the keep error by less than 1%; the best
pair is kept.

Honest numbers: a round's winning schedule is picked on the select trajectories; the best pair and the early
stop are decided on the keep set (`bank.keep_trajectories` fresh reference trajectories,
`fewstep_search.bank.keep`), because Phase-1's pair was picked on select among every trial and its select error
is optimistic against a round's; every reported error is on the test trajectories, which no decision looks at.

Ray starts once per run (`fewstep_search.ray_runtime.ray_session`) and serves every round's search and
training. Every step's result is written to the run directory as it finishes, so an interrupted run resumes:
finished rounds are read back, a search skips the trials its Optuna record already holds, and Phase-2 continues
from its last epoch checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from fewstep_search import best_pair
from fewstep_search.bank import Bank
from fewstep_search.bank.student import student_bank
from fewstep_search.best_pair import BestPair, keep_error
from fewstep_search.candidate import Candidate, Scores
from fewstep_search.denoiser import Denoiser, family_of
from fewstep_search.models.source import ModelSource, trainable_module
from fewstep_search.phase1.engine import Executor, InProcessExecutor, TrialContext, run_phase1
from fewstep_search.phase1.portfolio import trial_specs
from fewstep_search.phase1.record import OptunaRecord, sqlite_url
from fewstep_search.phase1.registry import OptimizerFactory
from fewstep_search.phase1.trials import TrialRecord, errors_by_condition, score_schedule
from fewstep_search.phase2.steps import FIRST_ORDER_SOLVERS, PHASE2_SOLVERS
from fewstep_search.quality import sample_quality_of
from fewstep_search.resolve import (
    cached_or_built_bank,
    cached_or_built_keep_set,
    check_conditions,
    model_source,
    resolve_device,
    resolve_range,
    resolve_shape,
)
from fewstep_search.rundir import RunDir
from fewstep_search.schedules import Schedule
from fewstep_search.study import StudyConfig

__all__ = ["Reporter", "QuietReporter", "LoopOptions", "run_loop"]


class Reporter(Protocol):
    """What the loop tells the user (the CLI's rich console; `QuietReporter` for libraries and tests)."""

    progress: bool

    def note(self, line: str) -> None: ...

    def phase(self, line: str) -> None: ...

    def search(self, *, title: str, total: int) -> AbstractContextManager[Callable[[TrialRecord], None]]: ...

    def epoch(self, info: Mapping[str, Any]) -> None: ...


class QuietReporter:
    """Collects notes, shows nothing."""

    progress = False

    def __init__(self) -> None:
        self.notes: list[str] = []

    def note(self, line: str) -> None:
        self.notes.append(line)

    def phase(self, line: str) -> None:
        return None

    @contextlib.contextmanager
    def search(self, *, title: str, total: int) -> Iterator[Callable[[TrialRecord], None]]:
        yield lambda record: None

    def epoch(self, info: Mapping[str, Any]) -> None:
        return None


@dataclass(frozen=True)
class LoopOptions:
    """How the loop runs (not what it computes): engines, the study file's folder, custom optimizers."""

    engine: Literal["ray", "local"] = "ray"
    study_path: Path | None = None
    extra_optimizers: Mapping[str, OptimizerFactory] = field(default_factory=dict)


class _Run:
    """One run's state: the study, the run folder, the teacher, the bank, the reporter."""

    def __init__(self, config: StudyConfig, rundir: RunDir, options: LoopOptions, reporter: Reporter) -> None:
        self.config, self.rundir, self.options, self.reporter = config, rundir, options, reporter
        self.notes: list[str] = []
        self.timings: dict[str, float] = {}
        self.started, self._fit_n = time.perf_counter(), None  # _fit_n: the fit trajectories' count, once known
        resolve_device(config.device)
        self.teacher_source = model_source(config, study_path=options.study_path, run_folder=rundir.path,
                                           note=self.note)
        self.teacher = self.teacher_source.load(cache=False)  # a model that does not load writes nothing
        self.n_conditions = check_conditions(self.teacher, self.teacher_source)
        self.run_id = rundir.prepare(config, study_path=options.study_path)
        self.sigma_min, self.sigma_max = resolve_range(self.teacher, config, self.notes)
        self.shape = resolve_shape(self.teacher, config)
        self.specs = trial_specs(config.search, budget=config.nfe, extra_optimizers=options.extra_optimizers)
        self.storage = config.search.storage or sqlite_url(rundir.path / "optuna.db")
        for line in self.notes:
            reporter.note(line)

    def note(self, line: str) -> None:
        self.notes.append(line)
        self.reporter.note(line)

    def bank(self, *, sharded: bool) -> Bank:
        """The teacher's bank: the run folder's when it matches the study, else built (as Ray shards in the
        run folder when `sharded` and `bank.sharded`: resumable) and saved."""
        t0 = time.perf_counter()
        self.reporter.phase("reference bank")
        bank, built = cached_or_built_bank(
            self.teacher, self.config, load=self.rundir.load_bank, save=self.rundir.save_bank,
            sigma_min=self.sigma_min, sigma_max=self.sigma_max, shape=self.shape,
            progress=self.reporter.progress, notes=(notes := []), source=self.teacher_source,
            shards=self.rundir.path / "bank_shards" if sharded else None,
        )
        for line in notes:
            self.note(line)
        self.timings["bank"] = time.perf_counter() - t0 if built else 0.0
        sizes = bank.sizes()
        self.reporter.phase(f"bank: {bank.n_trajectories} trajectories (fit {sizes['fit']}, select "
                            f"{sizes['select']}, test {sizes['test']}), {bank.grid.numel()} grid points"
                            + ("" if built else ", reused from the run folder"))
        return bank

    def keep_set(self) -> Bank | None:
        """The loop's decision set (None with `bank.keep_trajectories = 0`: it decides on select, with a note)."""
        t0 = time.perf_counter()
        keep, built = cached_or_built_keep_set(
            self.teacher, self.config, load=self.rundir.load_keep, save=self.rundir.save_keep,
            sigma_min=self.sigma_min, sigma_max=self.sigma_max, shape=self.shape,
            progress=self.reporter.progress, notes=(notes := []))
        for line in notes:
            self.note(line)
        if keep is None:
            self.note("bank.keep_trajectories = 0: the best pair is kept on select E, where Phase-1's winner was "
                      "picked (optimistic for it)")
            return None
        self.timings["keep_set"] = time.perf_counter() - t0 if built else 0.0
        self.reporter.phase(f"keep set: {keep.n_trajectories} fresh trajectories the best pair is kept on"
                            + ("" if built else ", reused from the run folder"))
        return keep.to(self.config.device)

    def executor(self, r: int) -> Executor:
        s = self.config.search
        if self.options.engine == "local":
            return InProcessExecutor(pruning=s.pruning, max_failures=s.max_failures)
        from fewstep_search.phase1.executors import tiered_executor

        return tiered_executor(s, storage_path=self.rundir.path / "tune", name=f"round_{r}")

    def fit_trajectories(self, bank: Bank) -> int | None:
        """The search's `fit_trajectories`, 'auto' measured once per run (on the teacher) and said in one line."""
        s = self.config.search
        if s.fit_trajectories != "auto":
            return None if s.fit_trajectories == "all" else int(s.fit_trajectories)
        if self._fit_n is None:
            from fewstep_search.phase1.budget import auto_fit_trajectories

            fit = bank.fit().to(self.config.device)
            self._fit_n = auto_fit_trajectories(self.teacher, fit, self.config.nfe,
                                                seconds_per_evaluation=s.seconds_per_evaluation,
                                                batch_size=self.config.bank.batch_size)
            if self._fit_n < fit.n_trajectories:
                self.note(f"costly trials solve {self._fit_n} of the {fit.n_trajectories} fit trajectories per "
                          f"evaluation (search.fit_trajectories = 'auto': about {s.seconds_per_evaluation:g} s "
                          "each); the select set picks, fit E is on that subset")
        return self._fit_n

    def phase1(self, r: int, bank: Bank, model: ModelSource, *, phase2_follows: bool) -> dict[str, Any]:
        """Round r's search (or its finished result read back).

        When this round's Phase-2 trains on the best first-order schedule, the search refines one first, whatever
        the search budget leaves for the rest (`select.by_start_quality`).
        """
        done = self.rundir.phase1_result(r)
        if done is not None:
            self.reporter.phase(f"round {r}: Phase-1 already finished; reusing it")
            return done
        name = f"{self.run_id}-nfe{self.config.nfe}-round{r}"
        record = OptunaRecord(self.storage, name, optimizers=list(self.options.extra_optimizers),
                              attrs={"nfe": self.config.nfe, "model": model.model_id, "round": r,
                                     "run_id": self.run_id})
        self.rundir.note_record(record.public_storage, name)
        previous = record.records()
        t0 = time.perf_counter()
        with self.reporter.search(title=f"round {r}: Phase-1 search (NFE = {self.config.nfe})",
                                  total=len(self.specs)) as show:
            def on_record(rec: TrialRecord) -> None:
                record.add(rec)
                show(rec)

            for rec in previous:
                show(rec)
            result = run_phase1(self.specs, bank=bank, model=model,
                                context=TrialContext(nfe=self.config.nfe, batch_size=self.config.bank.batch_size,
                                                     fit_trajectories=self.fit_trajectories(bank),
                                                     trial_seconds=self.config.search.trial_seconds or None,
                                                     search_seconds=self.config.search.seconds or None,
                                                     device=self.config.device,
                                                     extra_optimizers=self.options.extra_optimizers),
                                executor=self.executor(r), previous=previous, on_record=on_record,
                                tie_tolerance=self.config.search.tie_tolerance,
                                lead_solvers=FIRST_ORDER_SOLVERS if (
                                    phase2_follows and self.config.phase2.train_for == "first_order") else ())
        if result.not_run:
            n_costly = sum(s.is_costly for s in self.specs)
            self.note(f"round {r}: the search budget (search.seconds = {self.config.search.seconds:g}) ran out "
                      f"before {len(result.not_run)} of {n_costly} costly trials started; they are listed under "
                      f"not_run in round_{r}/phase1.json (search.seconds = 0 runs them all)")
        if result.resumed:
            self.note(f"round {r}: {result.resumed} of {len(self.specs)} trials were read back from the Optuna "
                      f"record {name}")
        best_row = result.summary()
        if bank.cond is not None and result.winner.schedule is not None:
            best_row["best"]["test_error_by_condition"] = errors_by_condition(
                model.load(), bank.test().to(self.config.device), result.winner.schedule,
                solver=result.winner.spec.solver, batch_size=self.config.bank.batch_size)
        self.timings[f"phase1_round_{r}"] = seconds = time.perf_counter() - t0
        summary = {"round": r, "nfe": self.config.nfe, "model": model.model_id, **best_row,
                   "seconds": seconds,
                   "optuna": {"storage": record.public_storage, "study": name}}
        self.rundir.write_phase1(r, summary)
        return summary

    def evaluate(self, model: Denoiser, schedule: Schedule, bank: Bank, keep: Bank | None) -> dict[str, Any]:
        """Select, keep and test E of a pair (the schedule with its own solver), and its sample quality where the
        model has data."""
        solver = schedule.solver
        scores = score_schedule(model, bank.to(self.config.device), schedule, solver=solver,
                                batch_size=self.config.bank.batch_size, parts=("select", "test"))
        scores.update(keep_error(model, schedule, keep, batch_size=self.config.bank.batch_size))
        quality = sample_quality_of(model, schedule, solver=solver, device=self.config.device)
        by_cond = errors_by_condition(model, bank.test().to(self.config.device), schedule, solver=solver,
                                      batch_size=self.config.bank.batch_size)
        return {"select_error": scores["select_error"], "test_error": scores["test_error"],
                **({"keep_error": scores["keep_error"]} if "keep_error" in scores else {}),
                **({"fd": quality["fd"], "confidence": quality["confidence"]} if quality else {}),
                **({"test_error_by_condition": by_cond} if by_cond else {})}


def _phase2_pick(phase1: Mapping[str, Any], train_for: str = "first_order") -> Mapping[str, Any]:
    """The schedule and solver Phase-2 trains for: the winner, or, when the winner's solver is not one it trains
    for (`phase2.train_for`: first order only, or every solver in `PHASE2_SOLVERS`), the best candidate on
    select E whose solver is."""
    solvers = FIRST_ORDER_SOLVERS if train_for == "first_order" else PHASE2_SOLVERS
    if phase1["best"]["solver"] in solvers:
        return phase1["best"]
    usable = [c for c in phase1["candidates"] if c["solver"] in solvers]
    if not usable:
        raise ValueError(f"Phase-2 trains for {', '.join(solvers)} here; add one of them to search.solvers")
    return min(usable, key=lambda c: c["select_error"])


def run_loop(config: StudyConfig, rundir: RunDir, *, reporter: Reporter | None = None,
             options: LoopOptions | None = None) -> dict[str, Any]:
    """Run (or resume) the whole job; returns what it writes to results.json."""
    reporter = reporter or QuietReporter()
    options = options or LoopOptions()
    run = _Run(config, rundir, options, reporter)
    rounds = config.rounds
    if rounds > 0 and trainable_module(run.teacher) is None:
        run.note(f"model {config.model_id} has no trainable weights: Phase-1 only (no Phase-2 rounds)")
        rounds = 0
    session = contextlib.nullcontext()
    if options.engine == "ray":
        from fewstep_search.ray_runtime import ray_session

        s = config.search
        session = ray_session(workers=s.workers, address=s.address)
    elif config.bank.sharded:
        run.note("bank.sharded needs Ray: the in-process engine builds the bank in this process")
    sharded = options.engine == "ray" and config.bank.sharded
    bank = None if sharded else run.bank(sharded=False)  # built before Ray starts: its idle processes cost CPU
    keep = run.keep_set() if rounds > 0 else None  # Phase-1 alone keeps its winner: nothing to decide
    with session:  # Ray starts once: the sharded bank (when asked for), the search and Phase-2 share it
        return _rounds(run, bank if bank is not None else run.bank(sharded=True), keep, rounds)


def _rounds(run: _Run, bank: Bank, keep: Bank | None, rounds: int) -> dict[str, Any]:
    config, rundir, family = run.config, run.rundir, family_of(run.teacher)

    def pair(row: Mapping[str, Any], **where: Any) -> Candidate:  # a run-folder row as the model's pair
        return Candidate.from_row(row, family=family, **where)

    p1 = run.phase1(1, bank, run.teacher_source, phase2_follows=rounds > 0)
    heur = p1["best_heuristic"]
    baselines: dict[str, Any] = {
        "phase1": {"name": p1["best"]["name"], "select_error": p1["best"]["select_error"],
                   "test_error": p1["best"]["test_error"], "solver": p1["best"]["solver"],
                   **({"test_error_by_condition": p1["best"]["test_error_by_condition"]}
                      if "test_error_by_condition" in p1["best"] else {})},
    }
    if heur is not None:
        baselines["best_heuristic"] = {"name": heur["name"], "select_error": heur["select_error"],
                                       "test_error": heur["test_error"], "solver": heur["solver"]}
    for key, row in (("best_heuristic", heur), ("phase1", p1["best"])):
        if row is not None:
            sched = pair(row).schedule
            q = sample_quality_of(run.teacher, sched, solver=sched.solver, device=config.device)
            if q is not None:
                baselines[key].update(fd=q["fd"], confidence=q["confidence"])
    batch, first = config.bank.batch_size, pair(p1["best"])
    baselines["phase1"].update(keep_error(run.teacher, first.schedule, keep, batch_size=batch))
    best = BestPair(first.with_scores(keep=baselines["phase1"].get("keep_error"), fd=baselines["phase1"].get("fd")),
                    on_keep_set=keep is not None)
    history: list[dict[str, Any]] = []
    current, current_den = run.teacher_source, run.teacher
    for r in range(1, rounds + 1):
        if r > 1:
            student = student_bank(bank, current_den, model_id=current.model_id)
            if student is None:
                run.note(f"round {r}: the bank keeps no states, so bound trials see the teacher's grid outputs")
            elif student.n_trajectories < bank.n_trajectories:
                run.note(f"round {r}: bound trials see the student's grid outputs on {student.sizes()['fit']} of "
                         f"{bank.sizes()['fit']} fit trajectories (a seeded sub-sample)")
            p1 = run.phase1(r, student or bank, current, phase2_follows=True)
        metrics = rundir.finished_round(r)
        if metrics is None:
            row = _phase2_pick(p1, run.config.phase2.train_for)
            if row is not p1["best"]:
                run.note(f"round {r}: the search's winner uses {p1['best']['solver']}; Phase-2 trains for "
                         f"{config.phase2.train_for.replace('_', '-')} solvers, on the best such candidate "
                         f"({row['name']}, {pair(row).solver})")
            metrics = _phase2_round(run, r, bank, keep, current, pair(row), row)
        current = run.teacher_source.with_checkpoint(rundir.model_path(r))
        current_den = current.load(cache=False)
        if f"{best.decide}_error" not in metrics:  # a round finished before this run had a keep set: scored now
            metrics = {**metrics, **keep_error(current_den, pair(metrics["schedule"]).schedule, keep, batch_size=batch)}
            rundir.write_round(r, metrics)
        history.append(metrics)
        round_pair = dataclasses.replace(pair(metrics["schedule"]).fine_tuned(round=r, weights=rundir.model_path(r)),
                                         scores=Scores.from_row(metrics))  # its schedule: the pick or the trained one
        best.offer(round_pair)
        if metrics.get("stopped_reason"):
            run.note(f"round {r}: Phase-2 stopped early ({metrics['stopped_reason']}); the loop ends here")
            break
        if best.stalled(round_pair) and r < rounds:
            run.note(f"round {r} improved the {best.set_name} error by less than {best_pair.IMPROVEMENT:.0%}; "
                     "stopping after it")
            break
    kept = best.best
    rundir.write_best(kept)
    results = {"nfe": config.nfe, "model": config.model_id, "run_id": run.run_id, "rounds": history,
               "baselines": baselines, "best": rundir.pair_summary(kept),
               "decided_on": best.set_name,
               "notes": run.notes, "timings": {**run.timings, "total": time.perf_counter() - run.started},
               "bank_sizes": {**bank.sizes(), **({"keep": keep.n_trajectories} if keep is not None else {})}}
    rundir.write_results(results)
    return results


TARGET_WARNING = 0.25
"""Targets off by more than this share of the student's select E get a warning: they bound what a round learns."""


def _note_targets(run: _Run, r: int, initial: Mapping[str, Any]) -> None:
    """One line on how accurate the round's end-to-end targets were (`phase2.evaluate.teacher_error`)."""
    if "teacher_error" not in initial:
        return
    te, se = float(initial["teacher_error"]), float(initial["select_error"])
    line = f"round {r}: the teacher's end points are off by E = {te:.4f} (the student's select E: {se:.4f})"
    if te > TARGET_WARNING * se:
        line += "; raise phase2.end_to_end_teacher_steps, they limit what the round can learn"
    run.note(line)


def _phase2_round(run: _Run, r: int, bank: Bank, keep: Bank | None, student: ModelSource, pick: Candidate,
                  row: Mapping[str, Any]) -> dict[str, Any]:
    """Fine-tune the current model for round r's pair (`row`: its Phase-1 record), evaluate it, write the round."""
    from fewstep_search.phase2 import train_pair

    config, rundir = run.config, run.rundir
    run.reporter.phase(f"round {r}: Phase-2 on {pick.schedule.nfe} steps ({pick.name})")
    t0 = time.perf_counter()
    trained, result = train_pair(pick, teacher=run.teacher_source, student=student, bank=bank, spec=config.phase2,
                                 out_dir=rundir.round_dir(r) / "phase2", round=r, device=config.device,
                                 engine=run.options.engine, on_epoch=run.reporter.epoch,
                                 progress=run.reporter.progress)
    seconds = time.perf_counter() - t0
    run.timings[f"phase2_round_{r}"] = seconds
    _note_targets(run, r, result.initial or {})
    for line in result.notes:
        run.note(f"round {r}: {line}")
    target = rundir.store_model(r, Path(result.checkpoint))
    den = run.teacher_source.with_checkpoint(target).load(cache=False)
    if result.sigmas is not None:  # phase2.schedule_lr: the round trained the sigmas too; the pair is both
        row = {**row, "sigmas": list(result.sigmas), "phase1_sigmas": list(row["sigmas"]), "trained_sigmas": True}
    evaluation = run.evaluate(den, trained.schedule, bank, keep)
    metrics = {"round": r, "schedule": dict(row), **evaluation,
               "phase1": {"select_error": row["select_error"], "test_error": row["test_error"]},
               "phase2": {"seconds": seconds, "history": list(result.history), "initial": result.initial},
               "stopped_reason": result.stopped_reason}
    rundir.write_round(r, metrics)
    return metrics
