"""The rollout forest: every method's rollout is recorded in this one structure (docs/design.md).

Nodes are latent states (node i is x at grid step ``node_step[i]``), edges are transitions between them. Per
prompt there are one or more trees; flat GRPO is a forest of chains, BranchGRPO a forest of binary trees.
Everything is stored as flat tensors indexed by node / edge id, so selections (trainable edges, the edges of one
depth, the leaves of one prompt) are tensor indexing, not Python walks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class Forest:
    # nodes
    latents: Tensor          # (num_nodes, *latent_shape) float32
    node_step: Tensor        # (num_nodes,) grid step of the state, 0 = initial noise, S = clean latent
    node_tree: Tensor        # (num_nodes,) tree id
    node_prompt: Tensor      # (num_nodes,) index into ``prompts``
    parent_edge: Tensor      # (num_nodes,) edge into the node, -1 for roots
    # edges
    src: Tensor              # (num_edges,) node the step starts from
    dst: Tensor              # (num_edges,) node it produces
    edge_step: Tensor        # (num_edges,) grid step k of the transition t_k -> t_{k+1}
    sde: Tensor              # (num_edges,) bool: stochastic (has a log-prob) or ODE
    trainable: Tensor        # (num_edges,) bool
    noise_scale: Tensor      # (num_edges,) schedule scale the kernel used (0 for ODE)
    std: Tensor              # (num_edges,) kernel std (0 for ODE)
    logp_old: Tensor         # (num_edges,) behaviour log-prob (NaN for ODE edges)
    mean: Tensor | None      # (num_edges, *latent_shape) kernel mean, if recorded (RatioNorm, KL diagnostics)
    noise: Tensor | None     # (num_edges, *latent_shape) standard noise used, if recorded (replay)
    # trees and context
    tree_prompt: Tensor      # (num_trees,) prompt index of each tree
    prompts: list[str]
    prompt_ids: list[Any]    # caller's stable ids (group keys, seeding)
    nfe: int                 # model evaluations, one per frontier node and step (a CFG pair counts once)
    cfg_factor: int          # forward passes per evaluation (2 under classifier-free guidance)
    grid: Any = None         # flowrl.sampling.kernels.Grid
    kernel: Any = None
    cond: Any = None         # the policy's encoded prompts, reused when re-scoring
    guidance_scale: float = 1.0
    reduction: str = "mean"
    info: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ sizes
    @property
    def num_nodes(self) -> int:
        return int(self.node_step.shape[0])

    @property
    def num_edges(self) -> int:
        return int(self.src.shape[0])

    @property
    def num_trees(self) -> int:
        return int(self.tree_prompt.shape[0])

    @property
    def forward_passes(self) -> int:
        return self.nfe * self.cfg_factor

    # ------------------------------------------------------------------ selections
    def leaves(self) -> Tensor:
        """Node ids without children, ordered by tree then creation order."""
        has_child = torch.zeros(self.num_nodes, dtype=torch.bool)
        has_child[self.src] = True
        ids = torch.nonzero(~has_child).flatten()
        return ids[torch.argsort(self.node_tree[ids], stable=True)]

    def trainable_edges(self) -> Tensor:
        return torch.nonzero(self.trainable).flatten()

    def children(self, node: int) -> Tensor:
        return self.dst[self.src == node]

    def path_edges(self, node: int) -> list[int]:
        """Edge ids from the root down to ``node``."""
        path, e = [], int(self.parent_edge[node])
        while e >= 0:
            path.append(e)
            e = int(self.parent_edge[self.src[e]])
        return path[::-1]

    def per_tree(self, what: str) -> Tensor:
        """Counts per tree of "edges", "leaves" or "nfe" (model evaluations = edges' distinct sources)."""
        if what == "edges":
            return torch.bincount(self.node_tree[self.src], minlength=self.num_trees)
        if what == "leaves":
            return torch.bincount(self.node_tree[self.leaves()], minlength=self.num_trees)
        if what == "nfe":
            return torch.bincount(self.node_tree[torch.unique(self.src)], minlength=self.num_trees)
        raise ValueError(f"unknown count {what!r}: expected 'edges', 'leaves' or 'nfe'")

    def leaf_prompt_ids(self) -> list[Any]:
        return [self.prompt_ids[int(p)] for p in self.node_prompt[self.leaves()]]
