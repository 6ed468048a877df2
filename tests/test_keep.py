"""The keep set (fresh reference trajectories) and the rule that keeps the best pair on it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fewstep_search import best_pair
from fewstep_search.bank import build_bank, load_bank, plan_for
from fewstep_search.bank.keep import build_keep_set, keep_expectation
from fewstep_search.best_pair import BestPair, keep_error
from fewstep_search.candidate import Candidate, Scores
from fewstep_search.objectives import true_error
from fewstep_search.schedules import Schedule, make_schedule

KW = dict(shape=(8,), sigma_min=0.002, sigma_max=80.0, grid_size=24, substeps=2)


def test_keep_trajectories_continue_the_banks_and_are_solved_the_same_way(mixture8, tmp_path: Path) -> None:
    """Keep trajectory i is the plan's trajectory K + i: a bank of K + n trajectories holds the same start and, to
    round-off, the same end; the bank's own K trajectories are not among them."""
    k, n = 12, 5
    bank = build_bank(mixture8, n_trajectories=k + n, probes=1, **KW)
    keep = build_keep_set(mixture8, plan_for(mixture8, n_trajectories=k, **KW), n, batch_size=2)
    assert torch.equal(keep.x_start, bank.x_start[k:])
    torch.testing.assert_close(keep.x_end, bank.x_end[k:])
    smaller = build_bank(mixture8, n_trajectories=k, probes=1, **KW)
    assert not any(torch.equal(a, b) for a in keep.x_start for b in smaller.x_start)

    path = keep.save(tmp_path / "keep.safetensors")
    expect = keep_expectation({"shape": [8], "sigma_max": 80.0, "n_trajectories": k}, n)
    back = load_bank(path, expect=expect)
    assert torch.equal(back.x_end, keep.x_end) and back.denoised.shape == (n, 24, 0)
    with pytest.raises(ValueError, match="keep_trajectories"):
        load_bank(path, expect=keep_expectation({"shape": [8]}, n + 1))
    sched = make_schedule("edm", 4, 0.002, 80.0)
    got = keep_error(mixture8, sched, back)["keep_error"]
    assert got == pytest.approx(float(true_error(mixture8, bank.subset(torch.arange(k, k + n)), sched.tensor())),
                                rel=1e-6)
    assert keep_error(mixture8, sched, None) == {}


def _pair(r: int, *, select: float, keep: float, test: float) -> Candidate:
    return Candidate(Schedule([80.0, 1.0, 0.002], name=f"s{r}"), origin=f"round {r}", round=r,
                     weights=Path(f"r{r}.safetensors") if r else None,
                     scores=Scores(select=select, keep=keep, test=test))


def test_a_round_worse_on_select_but_better_on_the_keep_set_is_kept() -> None:
    """Phase-1's select E is optimistic (its winner was picked there): the keep set decides, select does not."""
    phase1 = _pair(0, select=0.157, keep=0.170, test=0.171)
    best = BestPair(phase1, on_keep_set=True)
    assert best.offer(_pair(1, select=0.166, keep=0.120, test=0.120))
    assert best.best.round == 1 and best.best.weights == Path("r1.safetensors") and best.best.scores.keep == 0.120
    assert not best.stalled(_pair(1, select=0.166, keep=0.120, test=0.120))  # 0.170 -> 0.120
    # round 2 better on select and on test, worse on keep: not kept, and it did not improve by 1%: stop
    r2 = _pair(2, select=0.100, keep=0.125, test=0.090)
    assert not best.offer(r2) and best.best.round == 1
    assert best.stalled(r2)

    on_select = BestPair(phase1, on_keep_set=False)  # bank.keep_trajectories = 0: the old rule
    assert not on_select.offer(_pair(1, select=0.166, keep=0.120, test=0.120))
    assert on_select.best.round == 0 and on_select.set_name == "select"


def test_the_stop_rule_asks_for_the_improvement_share(monkeypatch) -> None:
    monkeypatch.setattr(best_pair, "IMPROVEMENT", 0.2)
    best = BestPair(_pair(0, select=1.0, keep=1.0, test=1.0), on_keep_set=True)
    assert best.stalled(_pair(1, select=1.0, keep=0.85, test=1.0))  # 15% < 20%
    assert not best.stalled(_pair(2, select=1.0, keep=0.6, test=1.0))  # 0.85 -> 0.6: 29%
