"""Step-level credit: per-sample rewards and advantages -> per-edge advantages of the rollout forest.

An entry takes (forest, leaf advantages, leaf rewards, its parameters), the leaves in ``forest.leaves()`` order,
and returns (num_edges,) advantages; it names the plans it can credit. A recipe names it as
``advantages.credit: NAME`` or ``{name: NAME, <params>}``.

- ``broadcast`` (Flow-GRPO): an edge with one leaf below gets that leaf's advantage (every step of a chain;
  TempFlow's one-step branches, whose leaf is their ODE completion).
- ``depth`` (BranchGRPO): leaf rewards fused into node values (``fusion: mean`` or ``path`` with ``beta``),
  z-scored per tree and depth; per-prompt advantages are not used.
- ``backprop`` (TreeGRPO): the per-prompt leaf advantages propagated upward by the old policy's normalised
  child probabilities (``beta`` scales the mean-reduced log-probs in the softmax).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from flowrl.core.tree_credit import backprop_advantages, depth_advantages, fuse_leaf_values
from flowrl.sampling import Flat, Forest, SplitAt, TrunkBranches, WindowTree
from flowrl.train.config import ConfigError


def single_leaf(forest: Forest) -> Tensor:
    """(num_nodes,) the position (in ``forest.leaves()``) of the one leaf below each node, -1 where there are
    several."""
    leaf = torch.full((forest.num_nodes,), -1, dtype=torch.long)
    seen = torch.zeros(forest.num_nodes, dtype=torch.long)
    leaves = forest.leaves()
    leaf[leaves] = torch.arange(len(leaves))
    seen[leaves] = 1
    for e in reversed(range(forest.num_edges)):  # children after parents: one backward pass
        s, d = int(forest.src[e]), int(forest.dst[e])
        seen[s] += seen[d]
        leaf[s] = leaf[d] if seen[s] == 1 else -1
    return leaf


def broadcast(forest: Forest, leaf_adv: Tensor, leaf_reward: Tensor | None = None) -> Tensor:
    """Every trainable edge gets the advantage of the one leaf below it (untrained shared edges get 0)."""
    below = single_leaf(forest)[forest.dst]
    trained = forest.trainable
    if bool((below[trained] < 0).any()):
        raise ValueError("broadcast credit: a trained edge has several leaves below it (a tree); use depth or "
                         "backprop credit")
    adv = torch.zeros(forest.num_edges, dtype=leaf_adv.dtype)
    adv[trained] = leaf_adv[below[trained]]
    return adv


def depth(forest: Forest, leaf_adv: Tensor, leaf_reward: Tensor, fusion: str = "mean",
          beta: float = 1.0) -> Tensor:
    node_values = fuse_leaf_values(forest.src, forest.dst, forest.logp_old, forest.num_nodes, forest.leaves(),
                                   leaf_reward, beta if fusion == "path" else 0.0)
    node_adv = depth_advantages(node_values, forest.node_tree, forest.node_step)
    return node_adv[forest.dst].to(leaf_adv.dtype)


def backprop(forest: Forest, leaf_adv: Tensor, leaf_reward: Tensor | None = None, beta: float = 1.0) -> Tensor:
    node_adv = backprop_advantages(forest.src, forest.dst, forest.logp_old, forest.num_nodes, forest.leaves(),
                                   leaf_adv, beta)
    return node_adv[forest.dst].to(leaf_adv.dtype)


@dataclass(frozen=True)
class Credit:
    fn: Callable[..., Tensor]
    plans: tuple[type, ...]                     # plan classes it can credit
    params: dict = field(default_factory=dict)  # parameter -> allowed values (a tuple) or type


CREDIT = {
    "broadcast": Credit(broadcast, (Flat, TrunkBranches)),
    "depth": Credit(depth, (SplitAt, WindowTree), {"fusion": ("mean", "path"), "beta": float}),
    "backprop": Credit(backprop, (SplitAt, WindowTree), {"beta": float}),
}


def credit_spec(spec) -> tuple[str, dict]:
    """``advantages.credit`` (a name or ``{name: ..., <params>}``) -> (name, params), checked."""
    spec = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = spec.pop("name", None)
    if name not in CREDIT:
        raise ConfigError(f"advantages.credit: {name!r} is not one of {sorted(CREDIT)}")
    allowed = CREDIT[name].params
    for key, value in spec.items():
        if key not in allowed:
            raise ConfigError(f"advantages.credit.{key}: not a parameter of {name} credit (its parameters: "
                              f"{sorted(allowed) or 'none'})")
        ok = allowed[key]
        if isinstance(ok, tuple) and value not in ok:
            raise ConfigError(f"advantages.credit.{key}: {value!r} is not one of {list(ok)}")
        if ok is float and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise ConfigError(f"advantages.credit.{key}: expected a number >= 0, got {value!r}")
    return name, spec


def edge_advantages(spec, forest: Forest, leaf_adv: Tensor, leaf_reward: Tensor) -> Tensor:
    name, params = credit_spec(spec)
    return CREDIT[name].fn(forest, leaf_adv, leaf_reward, **params)
