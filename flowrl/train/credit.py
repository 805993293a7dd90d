"""Step-level credit: per-sample advantages -> per-edge advantages of the rollout forest (advantages.credit).

Each entry takes (forest, leaf_adv (L,) in ``forest.leaves()`` order) and returns (num_edges,) advantages, and
names the plans it can credit: an edge shared by several leaves (a tree) has no single trajectory advantage, so
broadcast credit needs chains. The tree methods add depth-wise and back-propagated credit here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from flowrl.sampling import Flat, Forest


def broadcast(forest: Forest, leaf_adv: Tensor) -> Tensor:
    """Flow-GRPO's credit: every edge of a chain gets its trajectory's advantage."""
    if not isinstance(forest.info.get("plan"), Flat):
        raise ValueError("broadcast credit needs a Flat plan: an edge shared by several leaves has no single "
                         "trajectory advantage")
    adv = torch.zeros(forest.num_edges, dtype=leaf_adv.dtype)
    for leaf, a in zip(forest.leaves().tolist(), leaf_adv.tolist()):
        adv[forest.path_edges(leaf)] = a
    return adv


@dataclass(frozen=True)
class Credit:
    fn: Callable[[Forest, Tensor], Tensor]
    plans: tuple[type, ...]   # plan classes it can credit


CREDIT = {"broadcast": Credit(broadcast, (Flat,))}
