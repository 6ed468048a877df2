"""Published schedule optimizers ("peers"), written from their papers' descriptions, as pure, tested math.

| module          | method                                                                          |
|-----------------|---------------------------------------------------------------------------------|
| `gits`          | GITS (Chen et al., ICML 2024): DP on a teacher grid, one-step deviation cost    |
| `dm_nonuniform` | DM-NonUniform (Xue et al., CVPR 2024): model-free lambda objective, trust-constr |
| `ays`           | Align Your Steps (Sabour et al., ICML 2024): KLUB on data, coordinate search    |
| `ld3`           | LD3 (Tong et al., ICLR 2025): end-point error with a soft ball around the noise |
| `wrappers`      | the five as Phase-1 optimizers (`PEER_OPTIMIZERS`, B_0's grid DP included)       |

The math modules import numpy / torch / scipy and the project's math floor only; `PEER_OPTIMIZERS` (which needs
`fewstep_search.phase1.optimizers`) is loaded on first access, so importing a math module stays light.
docs/peers.md describes each objective, what differs from the paper, and the published cost.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PEER_OPTIMIZERS"]


def __getattr__(name: str) -> Any:
    if name == "PEER_OPTIMIZERS":
        from fewstep_search.phase1.peers.wrappers import PEER_OPTIMIZERS

        return PEER_OPTIMIZERS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
