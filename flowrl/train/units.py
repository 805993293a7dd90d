"""From a rollout forest and per-leaf advantages to training units: which stored steps are trained, with what
advantage, in which micro-batches. Pure index arithmetic over the forest; seeded by identity, not position."""
from __future__ import annotations

import math

import torch

from flowrl.sampling import Flat, Forest
from flowrl.sampling.seeding import derive_seed


def broadcast_advantages(forest: Forest, leaf_adv: torch.Tensor) -> torch.Tensor:
    """Flow-GRPO's step-level credit: every edge of a chain gets its trajectory's advantage. (num_edges,)

    Only chains (Flat plans) have one trajectory per edge; tree plans need a tree estimator (depth-wise,
    back-propagated), which a method config selects.
    """
    if not isinstance(forest.info.get("plan"), Flat):
        raise ValueError("broadcast advantages need a Flat plan: an edge shared by several leaves has no single "
                         "trajectory advantage")
    adv = torch.zeros(forest.num_edges, dtype=leaf_adv.dtype)
    leaves = forest.leaves()
    for leaf, a in zip(leaves.tolist(), leaf_adv.tolist()):
        adv[forest.path_edges(leaf)] = a
    return adv


def select_units(forest: Forest, fraction: float, seed: int, iteration: int) -> torch.Tensor:
    """Trainable edges to train this iteration. ``fraction`` < 1 keeps ceil(fraction * n) of each tree's
    trainable steps (DanceGRPO's timestep fraction), drawn per tree from a stream keyed by the tree's prompt id."""
    edges = forest.trainable_edges()
    if fraction >= 1:
        return edges
    tree_of_edge = forest.node_tree[forest.src[edges]]
    keep = []
    for tree in torch.unique(tree_of_edge).tolist():
        own = edges[tree_of_edge == tree]
        n = max(1, math.ceil(fraction * len(own)))
        pid = forest.prompt_ids[int(forest.tree_prompt[tree])]
        local = tree - int(torch.nonzero(forest.tree_prompt == forest.tree_prompt[tree])[0])
        g = torch.Generator().manual_seed(derive_seed(seed, iteration, pid, local, "units"))
        keep.append(own[torch.randperm(len(own), generator=g)[:n]].sort().values)
    return torch.cat(keep)


def shuffle_units(units: torch.Tensor, seed: int, iteration: int, epoch: int, rank: int) -> torch.Tensor:
    """The units in a fresh order per (iteration, epoch, process), before they are cut into updates and
    micro-batches."""
    g = torch.Generator().manual_seed(derive_seed(seed, iteration, epoch, rank, "shuffle"))
    return units[torch.randperm(len(units), generator=g)]
