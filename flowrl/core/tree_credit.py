"""Step-level credit on trees (docs/algorithms.md §5, "Step-level credit"): pure tensor math on edge lists.

A tree is given by its edges (``src``, ``dst``: node ids, edges listed parents before children, as a rollout
records them), each edge's behaviour log-prob (mean-reduced; NaN for ODE edges) and the nodes' tree and depth.

- BranchGRPO (``fuse_leaf_values`` then ``depth_advantages``): rewards are fused upward into node values, then
  z-scored over all nodes of one tree at one depth; the edge into a node is credited with its node's advantage.
- TreeGRPO (``backprop_advantages``): leaves are z-scored first (an ordinary GRPO advantage per prompt), then
  advantages flow upward, A(edge into u) = sum over u's child edges e of w_u(e) A(e), w_u = softmax of the
  children's old log-probs; a node with one child passes its child's advantage through.
"""
from __future__ import annotations

import torch
from torch import Tensor

# BranchGRPO's constants: a depth whose node values spread less than this gives every node advantage 0
DEPTH_MIN_STD = 1e-6
DEPTH_EPS = 1e-8


def leaf_membership(src: Tensor, dst: Tensor, num_nodes: int, leaves: Tensor) -> Tensor:
    """(num_leaves, num_nodes) bool: node n is on the path from its root to leaf l (the leaf included)."""
    parent = torch.full((num_nodes,), -1, dtype=torch.long)
    parent[dst] = src
    below = torch.zeros(len(leaves), num_nodes, dtype=torch.bool)
    current = leaves.clone()
    rows = torch.arange(len(leaves))
    while bool((current >= 0).any()):
        alive = current >= 0
        below[rows[alive], current[alive]] = True
        current = torch.where(alive, parent[current.clamp(min=0)], current)
    return below


def path_log_probs(src: Tensor, dst: Tensor, logp: Tensor, num_nodes: int) -> Tensor:
    """(num_nodes,) sum of the stochastic edges' log-probs from the root to each node (ODE edges add 0)."""
    step_logp = torch.nan_to_num(logp.double(), nan=0.0)
    cum = torch.zeros(num_nodes, dtype=torch.float64)
    for e in range(len(src)):  # parents before children: one pass
        cum[dst[e]] = cum[src[e]] + step_logp[e]
    return cum


def fuse_leaf_values(src: Tensor, dst: Tensor, logp: Tensor, num_nodes: int, leaves: Tensor, values: Tensor,
                     beta: float = 0.0) -> Tensor:
    """BranchGRPO's node values r(n) = sum over leaves l below n of w_l r_l (leaves carry their own value).

    beta = 0: the plain mean of the leaves below (unbiased). beta > 0: w = softmax over the leaves below n of
    beta * log p_old(path n -> l), the paper's path-probability weighting; the path's log-prob from n is the
    leaf's root-path log-prob minus n's, and n's part cancels in the softmax. (The reference code fuses
    recursively, a softmax over each node's child edges, which is not the same weighting.) Nodes with no leaf
    below are NaN."""
    below = leaf_membership(src, dst, num_nodes, leaves).double()
    v = values.double()
    if beta == 0:
        count = below.sum(0)
        return (below * v[:, None]).sum(0) / count
    score = beta * path_log_probs(src, dst, logp, num_nodes)[leaves]
    score = score - score.max()  # one shift for all nodes: exp stays finite, the ratios are unchanged
    w = below * torch.exp(score)[:, None]
    return (w * v[:, None]).sum(0) / w.sum(0)


def depth_advantages(values: Tensor, node_tree: Tensor, node_depth: Tensor, eps: float = DEPTH_EPS,
                     min_std: float = DEPTH_MIN_STD) -> Tensor:
    """(num_nodes,) z-score of node values over all nodes of one tree at one depth (sample std, as BranchGRPO's
    code); a depth with one node, or whose values spread less than ``min_std``, gives 0 (the root always).
    NaN values (nodes without leaves) are left out and get 0."""
    adv = torch.zeros(len(values), dtype=torch.float64)
    keys = node_tree.long() * (int(node_depth.max()) + 1) + node_depth.long()
    for key in torch.unique(keys).tolist():
        own = torch.nonzero((keys == key) & torch.isfinite(values)).flatten()
        if len(own) < 2:
            continue
        v = values[own].double()
        std = v.std()
        if std < min_std:
            continue
        adv[own] = (v - v.mean()) / (std + eps)
    return adv


def backprop_advantages(src: Tensor, dst: Tensor, logp: Tensor, num_nodes: int, leaves: Tensor,
                        leaf_adv: Tensor, beta: float = 1.0) -> Tensor:
    """(num_nodes,) TreeGRPO's advantage of each node (the edge into it is credited with it): leaves carry
    ``leaf_adv``; an inner node u gets sum_e softmax_e(beta * logp_old(e)) A(child of e) over its child edges
    (mean-reduced log-probs, as TreeGRPO's; with equal log-probs the plain mean). A node with one child (an ODE
    completion, a chain step) passes the child's advantage through."""
    adv = torch.full((num_nodes,), float("nan"), dtype=torch.float64)
    adv[leaves] = leaf_adv.double()
    score = beta * torch.nan_to_num(logp.double(), nan=0.0)
    # node ids grow from parents to children, so visiting parents in decreasing id order finds every child's
    # advantage already set
    parents, counts = torch.unique(src, return_counts=True)
    by_parent = torch.split(torch.argsort(src, stable=True), counts.tolist())
    for u, own in reversed(list(zip(parents.tolist(), by_parent))):
        a = adv[dst[own]]
        adv[u] = a[0] if len(own) == 1 else (torch.softmax(score[own], 0) * a).sum()
    return adv
