"""The trajectory bank: K accurate reference trajectories of one model, cached on a log-sigma grid.

`container` holds the immutable `Bank` (the contract: what is stored, the fit / select / test split, the
on-disk format) and its safetensors I/O; `memory` predicts a build's peak memory; `build` plans and solves it
chunk by chunk (streaming: each chunk is projected and cast before the next is solved), in one process or shard
by shard.
"""

from fewstep_search.bank.build import BankPlan, build_bank, log_grid, plan_for, solve_chunk
from fewstep_search.bank.container import SPLIT_NAMES, Bank, BankMismatchError, load_bank
from fewstep_search.bank.memory import estimate_bank_bytes

__all__ = [
    "Bank",
    "BankMismatchError",
    "BankPlan",
    "SPLIT_NAMES",
    "build_bank",
    "estimate_bank_bytes",
    "load_bank",
    "log_grid",
    "plan_for",
    "solve_chunk",
]
