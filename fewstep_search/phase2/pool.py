"""A fixed pool of starting noise, with the teacher's work on it cached across epochs.

Why a fixed pool rather than fresh noise every step: what the teacher computes from x_N alone does not depend on
the student, so it can be computed once per pool sample and reused every time the sample is drawn again:

* the first interval's target (the teacher's solve sigma_N -> sigma_{N-1} from x_N): the plain student-state
  loss then pays the teacher only for intervals 2..N;
* the teacher's whole trajectory at the schedule nodes (one accurate solve per sample), which the teacher-forced
  warm start needs, and which also gives the first target;
* the teacher's end point x0* alone (`end_points`, one fine solve per sample), all the end-to-end term needs.

Batches are a deterministic function of the step number (the k-th pass over the pool is the k-th seeded
permutation), so a resumed run draws the same batches as an uninterrupted one. Caches live in memory and are
refilled on demand after a resume (they are cheap relative to a round). Nothing here imports Ray.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fewstep_search.denoiser import bind_condition
from fewstep_search.phase2.targets import IntervalTeacher, ideal_output
from fewstep_search.study.phase2 import Phase2Spec

__all__ = ["NoisePool", "auto_pool_size", "untimed_pool_size", "PER_STEP_POOL", "MAX_POOL_BYTES",
           "SAVE_LIMIT_BYTES"]

PER_STEP_POOL = 1024
"""`pool_size = "auto"` for the per-step loss (and for rounds budgeted in steps): its student-state targets are
re-solved every `target_reuse` passes, so the teacher's work grows with the passes, not with the pool."""

MAX_POOL_BYTES = 1 << 30
"""Bytes of cached teacher trajectories an automatic pool may hold per worker (latent-sized models)."""

SAVE_LIMIT_BYTES = 256 << 20
"""Bytes of a pool's cached work saved to disk at most (with a checkpoint, or by the up-front fill); beyond it a
resumed round solves the caches again."""


def untimed_pool_size(spec: Phase2Spec) -> int | None:
    """The whole pool `spec` asks for without timing the teacher, or None when `"auto"` sizes it by time (the
    end-to-end term alone on a timed budget). Fresh noise (`pool_size = None`) is the trainer's own case."""
    if spec.pool_size != "auto":
        return spec.pool_size
    if spec.per_step_weight > 0 or spec.max_steps is not None:
        return PER_STEP_POOL
    return None


def auto_pool_size(*, budget_seconds: float, seconds_per_sample: float, share: float, batch: int,
                   sample_bytes: int) -> int:
    """Pool samples one worker's teacher can solve in `share` of the round's budget (at least one batch).

    Why: with the end-to-end term alone the teacher solves each pool sample once, and every later pass over the
    pool costs only the student. A pool that is small for the budget is revisited so often that the student
    learns its noise samples: on the digits model at N = 4, 1024 samples (81 passes by step 1300) drove the pool
    loss to a tenth of its start while the held-out errors stalled and rose, and 8192 samples (about 40% of the
    20-minute budget on the teacher) ended lower (docs/phase2.md, "How large a pool"). A large pool in a short
    round leaves no time to train, hence a share of the budget.
    """
    n = int(share * budget_seconds / max(seconds_per_sample, 1e-9))
    cap = max(batch, MAX_POOL_BYTES // max(1, sample_bytes))
    return max(batch, min(n, cap))


def draw_conditions(conditions: Sequence[int], size: int, generator: torch.Generator) -> Tensor | None:
    """`size` condition indices drawn uniformly from `conditions` (None for an unconditional model)."""
    if not conditions:
        return None
    pick = torch.randint(0, len(conditions), (size,), generator=generator)
    return torch.as_tensor(list(conditions), dtype=torch.long)[pick]


class NoisePool:
    """`size` starting states `sigma_max * eps` (one worker's share), their conditions, and cached teacher work."""

    def __init__(
        self,
        size: int,
        shape: tuple[int, ...],
        sigma_max: float,
        *,
        seed: int,
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
        conditions: Sequence[int] = (),
        keep_path: bool = False,
    ) -> None:
        if size < 1:
            raise ValueError(f"the noise pool needs at least one sample, got {size}")
        g = torch.Generator().manual_seed(seed)
        self.size, self.seed, self.keep_path = size, seed, keep_path
        self.x = (sigma_max * torch.randn(size, *shape, generator=g, dtype=torch.float64)).to(device, dtype)
        cond = draw_conditions(conditions, size, g)
        self.cond = None if cond is None else cond.to(device)
        self._first: Tensor | None = None
        self._has_first = torch.zeros(size, dtype=torch.bool)
        self._traj: Tensor | None = None
        self._end: Tensor | None = None
        self._path: Tensor | None = None  # [size, N + 1, *shape] with keep_path: the teacher's node states
        self._has_end = torch.zeros(size, dtype=torch.bool)
        self._has_traj = torch.zeros(size, dtype=torch.bool)
        self._reuse_states: Tensor | None = None
        self._reuse_targets: Tensor | None = None
        self._reuse_pass = torch.full((size,), -1, dtype=torch.long)  # the pass that computed them; -1: none
        self._perms: dict[int, Tensor] = {}

    def indices(self, step: int, batch: int) -> Tensor:
        """The pool indices of optimizer step `step` (a deterministic function of step and batch size)."""
        pos = torch.arange(step * batch, (step + 1) * batch)
        passes, within = pos // self.size, pos % self.size
        out = torch.empty(batch, dtype=torch.long)
        for k in passes.unique().tolist():
            if k not in self._perms:
                self._perms = {k: torch.randperm(self.size, generator=torch.Generator().manual_seed(
                    self.seed * 1_000_003 + k + 1))}
            sel = passes == k
            out[sel] = self._perms[k][within[sel]]
        return out

    def teacher_for(self, teacher: IntervalTeacher, idx: Tensor) -> IntervalTeacher:
        """The teacher with the conditions of pool samples `idx` bound (itself for unconditional models)."""
        if self.cond is None:
            return teacher
        from dataclasses import replace

        return replace(teacher, teacher=bind_condition(teacher.teacher, self.cond[idx.to(self.cond.device)]))

    def first_targets(self, teacher: IntervalTeacher, idx: Tensor) -> Tensor:
        """D_bar of the first interval for pool samples `idx`, computing only the ones not cached yet."""
        if self._first is None:
            self._first = torch.empty_like(self.x)
        missing = idx[~self._has_first[idx]].unique()
        if missing.numel():
            dev = self.x.device
            x = self.x[missing.to(dev)]
            self._first[missing.to(dev)] = self.teacher_for(teacher, missing).target(x, 0)
            self._has_first[missing] = True
        return self._first[idx.to(self.x.device)]

    def trajectories(self, teacher: IntervalTeacher, idx: Tensor) -> Tensor:
        """The teacher's states [N + 1, B, *shape] at the schedule nodes for pool samples `idx` (cached)."""
        n_nodes = len(teacher.sigmas)
        if self._traj is None:
            self._traj = torch.empty(self.size, n_nodes, *self.x.shape[1:], dtype=self.x.dtype, device=self.x.device)
        missing = idx[~self._has_traj[idx]].unique()
        if missing.numel():
            dev = self.x.device
            states = self.teacher_for(teacher, missing).trajectory(self.x[missing.to(dev)])  # [N + 1, b, ...]
            self._traj[missing.to(dev)] = states.transpose(0, 1)
            self._has_traj[missing] = True
            if self._first is None:
                self._first = torch.empty_like(self.x)
            s0, s1 = teacher.nodes[0], teacher.nodes[1]
            self._first[missing.to(dev)] = ideal_output(states[1], states[0], s0, s1)
            self._has_first[missing] = True
        return self._traj[idx.to(self.x.device)].transpose(0, 1)

    def end_points(self, teacher: IntervalTeacher, idx: Tensor) -> Tensor:
        """The teacher's end points x0* [B, *shape] for pool samples `idx` (`IntervalTeacher.end_point`, cached)."""
        if self._end is None:
            self._end = torch.empty_like(self.x)
        missing = idx[~self._has_end[idx]].unique()
        if missing.numel():
            dev = self.x.device
            bound = self.teacher_for(teacher, missing)
            if self.keep_path:
                path = bound.path(self.x[missing.to(dev)])  # [N + 1, b, ...]; the same end point, one solve
                if self._path is None:
                    self._path = torch.empty(self.size, path.shape[0], *self.x.shape[1:], dtype=self.x.dtype,
                                             device=dev)
                self._path[missing.to(dev)] = path.transpose(0, 1)
                self._end[missing.to(dev)] = path[-1]
            else:
                self._end[missing.to(dev)] = bound.end_point(self.x[missing.to(dev)])
            self._has_end[missing] = True
        return self._end[idx.to(self.x.device)]

    def path_points(self, teacher: IntervalTeacher, idx: Tensor) -> Tensor:
        """The teacher's states [N + 1, B, *shape] at the schedule's nodes for pool samples `idx` (`keep_path`;
        solved with the end points, cached)."""
        if not self.keep_path:
            raise ValueError("path_points needs a pool made with keep_path=True")
        self.end_points(teacher, idx)
        assert self._path is not None
        return self._path[idx.to(self.x.device)].transpose(0, 1)

    def unsolved_end_points(self) -> Tensor:
        """Pool indices whose end point is not cached yet (ascending)."""
        return torch.nonzero(~self._has_end).flatten()

    def truncate(self, size: int) -> None:
        """Keep the first `size` samples and their cached work.

        Why: the up-front fill solves end points in ascending order and stops at its deadline
        (`pool_fill.fill_deadline`), so what it solved is a prefix; the round then trains on that prefix rather
        than solve the rest lazily inside a budget that has run short. A resumed round rebuilds the full pool from
        its seed and truncates it the same way, so it draws the same samples.
        """
        if not 1 <= size <= self.size:
            raise ValueError(f"cannot keep {size} of a pool of {self.size}")
        self.x = self.x[:size]
        if self.cond is not None:
            self.cond = self.cond[:size]
        for name in self._CACHES:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t[:size].clone())
        self.size = size
        self._perms = {}

    def keep_solved_prefix(self, solved: int) -> None:
        """`truncate(solved)` after checking that the first `solved` samples are solved (the fill's order)."""
        if not bool(self._has_end[:solved].all()):
            raise RuntimeError(f"the pool's solved end points are not its first {solved} samples")
        self.truncate(solved)

    def reused_targets(
        self, idx: Tensor, step: int, batch: int, reuse: int,
        compute: Callable[[Tensor], tuple[Tensor, Tensor]],
    ) -> tuple[Tensor, Tensor]:
        """Student-state (states, D_bar) [N, B, *shape] for pool samples `idx` of step `step`, reused for `reuse`
        passes over the pool before `compute(missing_idx)` recomputes them with the current student.

        Why: the teacher's solves dominate the cost, and the student moves little in one pass over the pool, so
        its states (and their targets) from a pass or two ago are still close to what it would visit now.
        """
        passes = (torch.arange(step * batch, (step + 1) * batch) // self.size).to(torch.long)
        stale = (self._reuse_pass[idx] < 0) | (passes - self._reuse_pass[idx] >= reuse)
        todo = idx[stale].unique()
        if todo.numel():
            states, targets = compute(todo)  # [N, b, ...]
            if self._reuse_states is None:
                shape = (self.size, states.shape[0], *states.shape[2:])
                self._reuse_states = torch.empty(shape, dtype=states.dtype, device=states.device)
                self._reuse_targets = torch.empty(shape, dtype=targets.dtype, device=targets.device)
            dev = self._reuse_states.device
            self._reuse_states[todo.to(dev)] = states.transpose(0, 1)
            self._reuse_targets[todo.to(dev)] = targets.transpose(0, 1)  # type: ignore[index]
            self._reuse_pass[todo] = int(passes.max())
        assert self._reuse_states is not None and self._reuse_targets is not None
        dev = self._reuse_states.device
        return (self._reuse_states[idx.to(dev)].transpose(0, 1), self._reuse_targets[idx.to(dev)].transpose(0, 1))

    # ---------------------------------------------------------------- persistence (exact resume)

    _CACHES = ("_first", "_has_first", "_traj", "_has_traj", "_end", "_has_end", "_path", "_reuse_states",
               "_reuse_targets", "_reuse_pass")

    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (getattr(self, n) for n in self._CACHES) if t is not None)

    def cache_state(self) -> dict[str, Tensor]:
        """The cached teacher / student work as CPU tensors (saved with a checkpoint so a resume is exact)."""
        return {n.lstrip("_"): getattr(self, n).detach().cpu().contiguous().clone()
                for n in self._CACHES if getattr(self, n) is not None}

    def load_cache_state(self, state: dict[str, Tensor]) -> None:
        for n in self._CACHES:
            key = n.lstrip("_")
            if key in state:
                flag = n.startswith("_has") or n == "_reuse_pass"
                setattr(self, n, state[key].clone() if flag else state[key].to(self.x.device))

    def conditions(self, idx: Tensor) -> Tensor | None:
        return None if self.cond is None else self.cond[idx.to(self.cond.device)]

    @property
    def cached(self) -> dict[str, int]:
        """How many pool samples have a cached first target / trajectory (for the epoch log)."""
        return {"first": int(self._has_first.sum()), "trajectory": int(self._has_traj.sum()),
                "end": int(self._has_end.sum())}
