"""Which samples one advantage is relative to (``advantages.group``): the keys the advantage estimator groups by.

``prompt`` compares all samples of a prompt (Flow-GRPO, BranchGRPO's leaves, TreeGRPO). The step forms are for
plans whose samples each carry one stochastic step (TempFlow's branches, finished by ODE): ``step`` compares the
samples of a prompt that branched at the same step, ``seed_step`` those that also share the tree (the initial
noise: TempFlow's seed grouping), so all the spread of a group comes from that one step's noise. Keys are built
from the prompt's global slot, the tree's rank among its prompt's trees and the step, so they are the same
however prompts are sharded over processes.
"""
from __future__ import annotations

import torch
from torch import Tensor

from flowrl.sampling import Forest, TrunkBranches

GROUPINGS = ("prompt", "step", "seed_step")


def check(group: str, plan) -> str | None:
    """An error message for a grouping the plan cannot serve, or None."""
    if group != "prompt" and not isinstance(plan, TrunkBranches):
        return (f"advantages.group {group}: needs samples with one stochastic step each (plan trunk_branches), "
                f"not {type(plan).__name__}")
    return None


def branch_steps(forest: Forest) -> Tensor:
    """(L,) the grid step of the one stochastic edge on each leaf's path (in ``forest.leaves()`` order)."""
    step = torch.full((forest.num_nodes,), -1, dtype=torch.long)
    many = torch.zeros(forest.num_nodes, dtype=torch.bool)
    for e in range(forest.num_edges):  # parents before children
        s, d = int(forest.src[e]), int(forest.dst[e])
        step[d], many[d] = step[s], many[s]
        if bool(forest.sde[e]):
            many[d] = many[d] | (step[d] >= 0)
            step[d] = int(forest.edge_step[e])
    leaves = forest.leaves()
    if bool((step[leaves] < 0).any() | many[leaves].any()):
        raise ValueError("advantages.group: a sample has no or several stochastic steps")
    return step[leaves]


def advantage_groups(forest: Forest, slots: Tensor, group: str) -> Tensor:
    """(L,) group keys of the leaves: the prompt slot alone, or combined with the branching step (and tree)."""
    if group == "prompt":
        return slots
    leaves = forest.leaves()
    tree = forest.node_tree[leaves]
    first = {}
    for t, p in enumerate(forest.tree_prompt.tolist()):
        first.setdefault(p, t)
    rank = tree - torch.tensor([first[int(p)] for p in forest.tree_prompt[tree]])
    S = len(forest.info["noise_scales"])
    T = forest.info["plan"].trees_per_prompt
    sub = branch_steps(forest) + (rank * S if group == "seed_step" else 0)
    return slots.long() * (T * S) + sub
