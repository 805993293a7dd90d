"""BranchGRPO's pruning of the trained edges (``training.prune``): the rollout and its rewards are untouched,
fewer edges are back-propagated.

- ``width: {mode, ratio}`` acts on the edges after the last split (parent step > the last split step):
  ``parent_top`` keeps, within each branch the last split made, the ``ratio`` of its edges with the highest
  advantage (at least one; ties, which on a branch's chain are the rule since its nodes share one leaf, keep
  the earlier steps); ``extreme`` keeps, per tree, the best ratio/2 and the worst ratio/2 of those edges (at
  least two; the reference ranks over all trees on one GPU, which would tie the result to the sharding).
- ``depth: {depths, interval, stop}`` drops the edges whose child sits at one of ``depths`` (a node's depth is
  its grid step); with ``interval`` > 0 the depths move one shallower every ``interval`` iterations until the
  shallowest reaches ``stop`` (default: the last split step).
- ``until``: pruning applies while iteration <= until x run.iterations (1.0: always).
"""
from __future__ import annotations

import torch
from torch import Tensor

from flowrl.sampling import Forest
from flowrl.train.config import ConfigError

WIDTH_MODES = ("parent_top", "extreme")


def check(spec: dict | None, split_steps: list[int]) -> dict | None:
    """The spec with defaults filled in, or ConfigError naming the key."""
    if spec is None:
        return None
    spec = dict(spec)
    unknown = set(spec) - {"width", "depth", "until"}
    if unknown:
        raise ConfigError(f"training.prune: unknown key(s) {sorted(unknown)} (width, depth, until)")
    if not split_steps:
        raise ConfigError("training.prune: the plan never splits; pruning acts on trees")
    until = spec.get("until", 1.0)
    if isinstance(until, bool) or not isinstance(until, (int, float)) or not 0 < until <= 1:
        raise ConfigError(f"training.prune.until: a fraction of the run in (0, 1], got {until!r}")
    out = {"until": float(until), "width": None, "depth": None}
    if spec.get("width") is not None:
        w = dict(spec["width"])
        if set(w) - {"mode", "ratio"}:
            raise ConfigError(f"training.prune.width: unknown key(s) {sorted(set(w) - {'mode', 'ratio'})}")
        if w.get("mode") not in WIDTH_MODES:
            raise ConfigError(f"training.prune.width.mode: {w.get('mode')!r} is not one of {list(WIDTH_MODES)}")
        ratio = w.get("ratio", 0.5)
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ConfigError(f"training.prune.width.ratio: a fraction in (0, 1], got {ratio!r}")
        out["width"] = {"mode": w["mode"], "ratio": float(ratio)}
    if spec.get("depth") is not None:
        d = dict(spec["depth"])
        if set(d) - {"depths", "interval", "stop"}:
            raise ConfigError(f"training.prune.depth: unknown key(s) {sorted(set(d) - {'depths', 'interval', 'stop'})}")
        depths = d.get("depths")
        if not isinstance(depths, list) or not depths or not all(isinstance(x, int) and x > 0 for x in depths):
            raise ConfigError(f"training.prune.depth.depths: a list of positive depths, got {depths!r}")
        interval = d.get("interval", 0)
        stop = d.get("stop", max(split_steps))
        if not isinstance(interval, int) or interval < 0 or not isinstance(stop, int) or stop < 0:
            raise ConfigError("training.prune.depth: interval and stop must be integers >= 0")
        out["depth"] = {"depths": sorted(depths), "interval": interval, "stop": stop}
    return out


def active_depths(depth: dict, iteration: int) -> list[int]:
    """The pruned depths at ``iteration`` (the sliding window moved by iteration // interval, up to ``stop``)."""
    base = depth["depths"]
    if not depth["interval"]:
        return base
    shift = min(iteration // depth["interval"], max(0, base[0] - depth["stop"]))
    return [d - shift for d in base]


def _branch_of(forest: Forest, step: int) -> Tensor:
    """(num_nodes,) the node at grid step ``step`` each node descends from (itself there), -1 above it."""
    branch = torch.full((forest.num_nodes,), -1, dtype=torch.long)
    at = forest.node_step == step
    branch[at] = torch.nonzero(at).flatten()
    for e in range(forest.num_edges):  # parents before children
        d = forest.dst[e]
        if branch[d] < 0:
            branch[d] = branch[forest.src[e]]
    return branch


def _ranked(edges: Tensor, adv: Tensor) -> Tensor:
    """``edges`` by decreasing advantage, ties in edge order (earlier steps first)."""
    order = torch.sort(adv[edges], descending=True, stable=True).indices
    return edges[order]


def width(forest: Forest, edges: Tensor, edge_adv: Tensor, mode: str, ratio: float, last_split: int) -> Tensor:
    post = edges[forest.edge_step[edges] > last_split]
    keep = [edges[forest.edge_step[edges] <= last_split]]
    if mode == "parent_top":
        branch = _branch_of(forest, last_split + 1)[forest.src[post]]
        for b in torch.unique(branch).tolist():
            own = _ranked(post[branch == b], edge_adv)
            keep.append(own[:max(1, int(len(own) * ratio))])
    else:
        tree = forest.node_tree[forest.src[post]]
        for t in torch.unique(tree).tolist():
            own = _ranked(post[tree == t], edge_adv)
            n = min(len(own), max(2, int(len(own) * ratio)))
            best = n // 2
            keep.append(own[:best])
            keep.append(own[len(own) - (n - best):])
    return torch.cat(keep).sort().values


def prune(forest: Forest, edges: Tensor, edge_adv: Tensor, spec: dict | None, iteration: int,
          iterations: int) -> Tensor:
    """The kept subset of ``edges`` (ascending), as ``spec`` (from ``check``) says for this iteration."""
    if spec is None or iteration > int(iterations * spec["until"]):
        return edges
    splits = forest.info["plan"].split_steps(len(forest.info["noise_scales"]), iteration)
    if spec["depth"] is not None:
        drop = torch.tensor(active_depths(spec["depth"], iteration))
        edges = edges[~torch.isin(forest.edge_step[edges] + 1, drop)]
    if spec["width"] is not None:
        edges = width(forest, edges, edge_adv, spec["width"]["mode"], spec["width"]["ratio"], max(splits))
    return edges
