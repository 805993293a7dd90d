"""Training units: what one iteration trains, as one typed record, and how it is cut into updates and
micro-batches.

A unit carries one loss term: a stored SDE step for the policy-gradient objectives, a forward-process draw of a
clean sample for DiffusionNFT. An objective produces the record from the rollout forest; the loop only shuffles,
cuts and aggregates it. Every draw is seeded by identity (run seed, iteration, prompt id, sample, epoch), never
by batch position.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from flowrl.core import AGGREGATION_WEIGHTS
from flowrl.sampling import Forest
from flowrl.sampling.seeding import derive_seed


@dataclass
class Units:
    sample: Tensor   # (U,) the sample (leaf, i.e. trajectory or clean image) the unit belongs to, local index
    prompt: Tensor   # (U,) local prompt position (index into forest.prompts)
    group: Tensor    # (U,) advantage group (the prompt's global slot)
    tree: Tensor     # (U,) forest tree
    edge: Tensor     # (U,) forest edge trained, -1 when the unit is no stored step (NFT)
    step: Tensor     # (U,) grid step k
    adv: Tensor      # (U,) advantage
    chunk: Tensor    # (U,) chunk id, unique in the iteration (the unit's own index when not chunked)
    weight: Tensor   # (U,) step weight multiplying the unit's loss (1: uniform)
    keep: Tensor     # (U,) 1, or 0 for a unit left out of the loss and its denominator
    block: Tensor    # (U,) units of one block are never split over micro-batches (a chunk, a trajectory)

    def __len__(self) -> int:
        return int(self.sample.shape[0])

    def take(self, idx: Tensor) -> "Units":
        return Units(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    @classmethod
    def make(cls, sample, prompt, group, tree, edge, step, adv, chunk=None, weight=None, keep=None,
             block=None) -> "Units":
        """Defaults: every unit its own chunk and block, weight 1, kept."""
        n = len(sample)
        own = torch.arange(n)
        return cls(sample=sample, prompt=prompt, group=group, tree=tree, edge=edge, step=step, adv=adv,
                   chunk=own if chunk is None else chunk, weight=torch.ones(n) if weight is None else weight,
                   keep=torch.ones(n) if keep is None else keep, block=own if block is None else block)


def select_steps(forest: Forest, edges: Tensor, fraction: float, seed: int, iteration: int) -> Tensor:
    """Of ``edges`` (trainable, ascending), ceil(fraction * n) of each tree's n, drawn per tree from a stream keyed
    by its prompt id and rank among the prompt's trees (DanceGRPO's timestep fraction)."""
    if fraction >= 1:
        return edges
    tree_of_edge = forest.node_tree[forest.src[edges]]
    keep = []
    for tree in torch.unique(tree_of_edge).tolist():
        own = edges[tree_of_edge == tree]
        n = max(1, math.ceil(fraction * len(own)))
        keep.append(own[torch.randperm(len(own), generator=tree_generator(forest, tree, seed, iteration))[:n]]
                    .sort().values)
    return torch.cat(keep)


def tree_generator(forest: Forest, tree: int, seed: int, iteration: int) -> torch.Generator:
    pid = forest.prompt_ids[int(forest.tree_prompt[tree])]
    local = tree - int(torch.nonzero(forest.tree_prompt == forest.tree_prompt[tree])[0])
    return torch.Generator().manual_seed(derive_seed(seed, iteration, pid, local, "units"))


def micro_batches(units: Units, updates: int, size: int, seed: int, iteration: int, epoch: int,
                  rank: int, rerange: str = "random") -> list[list[Tensor]]:
    """The unit ids of each update's micro-batches for one inner epoch.

    Blocks are shuffled (a fresh order per iteration, epoch and process), cut into ``updates`` near-equal runs,
    and packed in order into micro-batches of at most ``size`` units; a block is never split, so a block longer
    than ``size`` makes a micro-batch of its own. With one unit per block this is a plain shuffle and split
    (the shuffle's stream is the one flowrl has always used, so runs reproduce across versions). ``rerange``
    "balance" orders the shuffled blocks so that positive and negative advantages alternate (the rarer sign
    first), then the rest of the commoner sign, then zero advantages: every update sees both signs. (MixGRPO's
    balance drops zero-advantage samples; here they stay, last.)
    """
    _, inverse, counts = torch.unique(units.block, return_inverse=True, return_counts=True)
    members = torch.split(torch.argsort(inverse, stable=True), counts.tolist())  # unit ids of each block
    g = torch.Generator().manual_seed(derive_seed(seed, iteration, epoch, rank, "shuffle"))
    order = torch.randperm(len(members), generator=g)
    if rerange == "balance":
        order = balanced(order, torch.stack([units.adv[m].mean() for m in members]))
    out = []
    for run in torch.tensor_split(order, updates):
        batches, current, n = [], [], 0
        for b in run.tolist():
            if current and n + len(members[b]) > size:
                batches.append(torch.cat(current))
                current, n = [], 0
            current.append(members[b])
            n += len(members[b])
        if current:
            batches.append(torch.cat(current))
        out.append(batches)
    return out


def balanced(order: Tensor, adv: Tensor) -> Tensor:
    """``order`` rearranged so that blocks with positive and negative ``adv`` alternate, the rarer sign first,
    then the remaining blocks of the commoner sign, then those with advantage 0; each sign keeps its order."""
    pos, neg, zero = (order[adv[order] > 0], order[adv[order] < 0], order[adv[order] == 0])
    small, large = (pos, neg) if len(pos) < len(neg) else (neg, pos)
    n = len(small)
    pairs = torch.stack([small, large[:n]], 1).flatten() if n else small
    return torch.cat([pairs, large[n:], zero])


def aggregation(units: Units, ids: Tensor, mode: str, norm_len: int | None = None) -> tuple[Tensor, float]:
    """Per-unit weights and the denominator of one update's loss, ``sum(w * loss) / denominator`` over its
    units (flowrl.core.AGGREGATION_WEIGHTS; a trajectory's steps are its tokens). Units with keep 0 get weight 0
    and leave the denominator."""
    sub = units.take(ids)
    kept = sub.keep > 0
    w, denom = AGGREGATION_WEIGHTS[mode](sub.sample[kept], norm_len)
    weights = torch.zeros(len(sub), dtype=torch.float64)
    weights[kept] = w
    return weights, denom


def iteration_costs(acc, forest: Forest, units: Units, train_passes: int) -> dict:
    """An iteration's work, summed over processes (collective): rollout model evaluations (a CFG pair counts
    once), leaves, trained units, and the training forward passes with gradient (each has its backward)."""
    local = [forest.nfe, len(forest.leaves()), len(units), train_passes]
    total = acc.gather(torch.tensor([local], device=acc.device)).sum(0).tolist()
    out = dict(zip(("nfe/rollout_calls", "nfe/leaves", "nfe/trained_units", "nfe/train_forward"), map(int, total)))
    return {**out, **window_stats(forest)}


def window_stats(forest: Forest) -> dict:
    """The iteration's stochastic window as the schedule set it (first SDE step, one past the last; -1 when
    none) and the rollout's grid steps (fewer than sampling.num_steps under MixGRPO-Flash's tail)."""
    sde = torch.nonzero(forest.info["noise_scales"] > 0).flatten()
    first, end = (int(sde[0]), int(sde[-1]) + 1) if len(sde) else (-1, -1)
    return {"window/start": first, "window/end": end, "sampling/steps": forest.grid.num_steps}
