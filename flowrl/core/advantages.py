"""Group-relative advantages (docs/algorithms.md §5), shared by image and LLM training.

Rewards are a flat 1-D tensor; ``groups`` is a parallel LongTensor of group ids (see ``group_ids``).
A group is whatever a method compares against: a prompt, or (prompt, step), (tree, depth), ...

Sharding invariance. Every per-group quantity is computed from that group's own values only, by
elementwise adds in the group's own order, so a group gives the same bits whether it sits in the
whole batch or in a shard, at any position. Shards must hold whole groups and keep each group's
internal order. ``std="global"`` needs the std of the *whole* batch: either call on the all-gathered
rewards, or pass ``global_std=batch_std(gathered_rewards)`` to each shard. ``batch_std`` sorts first,
so any gather order gives the same value.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Hashable, Iterable, Mapping

import torch
from torch import Tensor

STD_MODES = ("group", "global", "none")
# A group whose population std is at or below this carries no signal (DAPO / Reinforce-Rej filter
# these); its advantages are set to exactly 0. Identical rewards give std exactly 0 (see group_stats).
ZERO_VAR_TOL = 1e-6


def group_ids(keys: Iterable[Hashable]) -> Tensor:
    """Map grouping keys (prompt ids, tuples like (prompt, step)) to ids 0..K-1 in order of first appearance."""
    index: dict = {}
    return torch.tensor([index.setdefault(k, len(index)) for k in keys], dtype=torch.long)


def check_finite(values: Tensor, name: str) -> None:
    """Raise ValueError naming ``name`` and the offending indices; core never propagates NaN/inf silently."""
    bad = (~torch.isfinite(values)).nonzero().flatten()
    if bad.numel():
        idx = bad[:10].tolist()
        more = f" (and {bad.numel() - 10} more)" if bad.numel() > 10 else ""
        raise ValueError(f"{name} has non-finite values at indices {idx}{more}")


def _check_inputs(rewards: Tensor, groups: Tensor, name: str = "rewards") -> None:
    if rewards.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(rewards.shape)}")
    if groups.shape != rewards.shape:
        raise ValueError(f"groups shape {tuple(groups.shape)} != {name} shape {tuple(rewards.shape)}")
    if groups.dtype != torch.long:
        raise ValueError(f"groups must be a LongTensor (use group_ids), got {groups.dtype}")
    if groups.numel() and int(groups.min()) < 0:
        raise ValueError("groups must be non-negative ids")
    check_finite(rewards, name)


def _group_sum(values: Tensor, groups: Tensor, pos: Tensor, num_groups: int, width: int) -> Tensor:
    # Lay each group out in one row (padding 0) and add the columns left to right: every group's sum is
    # its own elements added in its own order, independent of other groups and of the device
    # (index_add_ on CUDA uses atomics, whose order is not fixed). width = largest group, a few dozen adds.
    table = values.new_zeros(num_groups, width)
    table[groups, pos] = values
    acc = values.new_zeros(num_groups)
    for j in range(width):
        acc = acc + table[:, j]
    return acc


@dataclass
class GroupStats:
    mean: Tensor            # (K,) float64 group means
    std: Tensor             # (K,) float64 population std (unbiased=False, like np.std)
    count: Tensor           # (K,) long group sizes
    zero_variance: Tensor   # (K,) bool: non-empty group with std <= tol (includes groups of one)

    @property
    def num_zero_variance(self) -> int:
        return int(self.zero_variance.sum())


def _stats(rewards: Tensor, groups: Tensor, tol: float):
    """GroupStats plus per-element deviations from the group mean (float64)."""
    r = rewards.to(torch.float64)
    n = r.numel()
    num_groups = int(groups.max()) + 1 if n else 0
    count = torch.bincount(groups, minlength=num_groups)
    width = int(count.max()) if n else 0
    order = torch.argsort(groups, stable=True)
    start = torch.cumsum(count, 0) - count
    pos = torch.empty_like(groups)
    pos[order] = torch.arange(n, device=groups.device) - start[groups[order]]
    # Shift by each group's first value: identical rewards then give deviations, mean and std of exactly 0.
    first = r[order[start.clamp(max=max(n - 1, 0))]] if n else r.new_zeros(0)
    d = r - first[groups]
    cnt = count.clamp(min=1).to(torch.float64)
    mean_d = _group_sum(d, groups, pos, num_groups, width) / cnt
    dev = d - mean_d[groups]
    std = (_group_sum(dev * dev, groups, pos, num_groups, width) / cnt).sqrt()
    zero_var = (count > 0) & (std <= tol)
    return GroupStats(first + mean_d, std, count, zero_var), dev


def group_stats(rewards: Tensor, groups: Tensor, zero_var_tol: float = ZERO_VAR_TOL) -> GroupStats:
    """Per-group mean / population std / size and the zero-variance mask.

    ``(~stats.zero_variance)[groups]`` is the per-sample keep mask for dynamic sampling (DAPO).
    """
    _check_inputs(rewards, groups)
    return _stats(rewards, groups, zero_var_tol)[0]


def batch_std(rewards: Tensor) -> Tensor:
    """Population std of all rewards (float64 scalar); sorted first, so any gather order gives the same bits."""
    check_finite(rewards, "rewards")
    r = rewards.detach().to(torch.float64).flatten().sort().values
    if r.numel() == 0:
        return r.new_zeros(())
    return (r - r.mean()).pow(2).mean().sqrt()


def group_advantages(
    rewards: Tensor,
    groups: Tensor,
    std: str = "group",
    eps: float = 1e-4,
    clip: float | None = 5.0,
    zero_variance: str = "zero",
    global_std: float | Tensor | None = None,
    zero_var_tol: float = ZERO_VAR_TOL,
) -> Tensor:
    """Group z-score ``A = (r - mean_g) / (std + eps)``.

    std: "group" (per-group population std, GRPO), "global" (population std of the whole batch with
        per-group means, Flow-GRPO's default), "none" (``A = r - mean_g``, no eps, Dr. GRPO).
    eps: 1e-4 as in Flow-GRPO; only keeps the division finite, zero-variance groups are handled below.
    clip: clamp A to [-clip, clip] (Flow-GRPO uses 5). Clipping can break the zero group sum; with
        std="group" it never triggers for groups of <= 26 since |z| <= sqrt(G - 1).
    zero_variance: "zero" sets A = 0 for groups with std <= zero_var_tol (groups of one included);
        "keep" leaves them to the formula (identical rewards still give exactly 0).
    global_std: for std="global" only; the std of the all-gathered batch (``batch_std``) when this call
        sees one shard. Default: ``batch_std(rewards)``.
    Returns A in the rewards' float dtype (float32 for integer rewards); math in float64.
    """
    if std not in STD_MODES:
        raise ValueError(f"std must be one of {STD_MODES}, got {std!r}")
    if zero_variance not in ("zero", "keep"):
        raise ValueError(f"zero_variance must be 'zero' or 'keep', got {zero_variance!r}")
    if global_std is not None and std != "global":
        raise ValueError(f"global_std is only used with std='global', got std={std!r}")
    _check_inputs(rewards, groups)
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    stats, dev = _stats(rewards, groups, zero_var_tol)
    if std == "group":
        adv = dev / (stats.std[groups] + eps)
    elif std == "global":
        g = batch_std(rewards) if global_std is None else torch.as_tensor(global_std, dtype=torch.float64)
        g = g.to(dev.device)
        if float(g) <= zero_var_tol and bool((stats.std > zero_var_tol).any()):
            raise ValueError(f"global_std={float(g):.3g} but some group has spread; compute it with "
                             "batch_std over the all-gathered rewards")
        adv = dev / (g + eps)
    else:
        adv = dev
    if zero_variance == "zero":
        adv = torch.where(stats.zero_variance[groups], torch.zeros_like(adv), adv)
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv.to(out_dtype)


def combine_rewards(
    components: Mapping[str, Tensor],
    weights: Mapping[str, float],
    groups: Tensor,
    mode: str = "sum_then_normalize",
    estimator: str | Callable[..., Tensor] = "grpo",
    **adv_kwargs,
) -> Tensor:
    """Advantages from several named reward components (docs/algorithms.md §5, multiple rewards).

    "sum_then_normalize": ``group_advantages(sum_k w_k r_k)``.
    "normalize_then_sum" (GDPO / MixGRPO default): ``sum_k w_k group_advantages(r_k)``; a plain weighted
        sum, not re-normalised, so a component's scale is its weight. With std="global" pass
        ``global_std`` as a dict {component: std} in this mode.
    ``estimator``: a name in ADVANTAGE_ESTIMATORS (or such a function) that normalises within groups; adv_kwargs
    go to it (eps, clip, ...).
    Components are added in sorted-name order so the result does not depend on dict order.
    """
    est = get_advantage_estimator(estimator) if isinstance(estimator, str) else estimator
    missing = sorted(set(components) - set(weights))
    extra = sorted(set(weights) - set(components))
    if missing:
        raise ValueError(f"no weight for reward component(s) {missing}")
    if extra:
        raise ValueError(f"weight(s) for unknown reward component(s) {extra}; components: {sorted(components)}")
    if not components:
        raise ValueError("combine_rewards needs at least one reward component")
    names = sorted(components)
    for name in names:
        r = components[name]
        if r.shape != groups.shape:
            raise ValueError(f"reward component {name!r} has shape {tuple(r.shape)}, groups {tuple(groups.shape)}")
        check_finite(r, f"reward component {name!r}")
    out_dtype = torch.float32
    for name in names:
        if components[name].is_floating_point():
            out_dtype = torch.promote_types(out_dtype, components[name].dtype)
    if mode == "sum_then_normalize":
        total = sum(float(weights[n]) * components[n].to(torch.float64) for n in names)
        return est(total, groups, **adv_kwargs).to(out_dtype)
    if mode == "normalize_then_sum":
        gstd = adv_kwargs.pop("global_std", None)
        if gstd is not None and (not isinstance(gstd, Mapping) or set(gstd) != set(names)):
            raise ValueError(f"global_std must be a dict with one entry per component {names} in mode {mode!r}")
        total = sum(float(weights[n]) * est(components[n].to(torch.float64), groups,
                                            **({} if gstd is None else {"global_std": gstd[n]}), **adv_kwargs)
                    for n in names)
        return total.to(out_dtype)
    raise ValueError(f"mode must be 'sum_then_normalize' or 'normalize_then_sum', got {mode!r}")


def preference_matrix(pair_i: Tensor, pair_j: Tensor, p_i_wins: Tensor, group_size: int) -> Tensor:
    """(G, G) matrix from the C(G, 2) judge calls of one group: P[i, j] = p, P[j, i] = 1 - p, diagonal 1/2."""
    p = torch.full((group_size, group_size), 0.5, dtype=torch.float64)
    seen = torch.zeros(group_size, group_size, dtype=torch.bool)
    for i, j, w in zip(pair_i.tolist(), pair_j.tolist(), p_i_wins.tolist()):
        if i == j or not (0 <= i < group_size and 0 <= j < group_size):
            raise ValueError(f"bad pair ({i}, {j}) for group size {group_size}")
        if seen[i, j]:
            raise ValueError(f"pair ({i}, {j}) given twice")
        p[i, j], p[j, i] = w, 1.0 - w
        seen[i, j] = seen[j, i] = True
    missing = [(i, j) for i in range(group_size) for j in range(i + 1, group_size) if not seen[i, j]]
    if missing:
        raise ValueError(f"missing judgements for pairs {missing[:10]}")
    return p


def pairwise_win_rates(prefs: Tensor, tol: float = 1e-5) -> Tensor:
    """Pref-GRPO reward: win rate of each item over the other G - 1 of its group.

    prefs: (..., G, G), P[i, j] = probability that i beats j (ties 1/2), P[i, j] + P[j, i] = 1
    (average both presentation orders before calling if the judge saw both). Returns (..., G).
    """
    g = prefs.shape[-1]
    if prefs.dim() < 2 or prefs.shape[-2] != g or g < 2:
        raise ValueError(f"prefs must be (..., G, G) with G >= 2, got shape {tuple(prefs.shape)}")
    check_finite(prefs, "prefs")
    if bool(((prefs < 0) | (prefs > 1)).any()):
        raise ValueError("prefs must be probabilities in [0, 1]")
    off = ~torch.eye(g, dtype=torch.bool, device=prefs.device)
    bad = (((prefs + prefs.transpose(-1, -2)) - 1).abs() > tol) & off
    if bool(bad.any()):
        raise ValueError(f"prefs not complementary (P[i,j] + P[j,i] != 1) at {bad.nonzero()[0].tolist()}")
    return (prefs * off).sum(-1) / (g - 1)


def rloo_advantages(rewards: Tensor, groups: Tensor, eps: float = 0.0, clip: float | None = None,
                    zero_var_tol: float = ZERO_VAR_TOL) -> Tensor:
    """RLOO: ``A_i = r_i - mean_{j != i} r_j = G / (G - 1) (r_i - mean_g)``, the leave-one-out baseline that
    makes each sample's advantage independent of its own reward (so ``A * grad log pi`` is unbiased). Groups
    of one and zero-variance groups get 0. eps is unused (no division); clip as group_advantages."""
    _check_inputs(rewards, groups)
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    stats, dev = _stats(rewards, groups, zero_var_tol)
    g = stats.count[groups].to(torch.float64)
    adv = torch.where(g > 1, dev * g / (g - 1).clamp(min=1), torch.zeros_like(dev))
    adv = torch.where(stats.zero_variance[groups], torch.zeros_like(adv), adv)
    return (adv if clip is None else adv.clamp(-clip, clip)).to(out_dtype)


def reinforce_pp_baseline_advantages(rewards: Tensor, groups: Tensor, eps: float = 1e-4, clip: float | None = None,
                                     zero_var_tol: float = ZERO_VAR_TOL) -> Tensor:
    """REINFORCE++-baseline: the group mean subtracted, then the result whitened over the whole batch,
    ``A = (d - mean(d)) / (std(d) + eps)`` with ``d = r - mean_g`` (population std over samples; verl whitens
    over tokens, i.e. weights each sample by its length). Call it on the all-gathered batch: the batch
    statistics are global. Zero-variance groups get exactly 0."""
    _check_inputs(rewards, groups)
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    stats, dev = _stats(rewards, groups, zero_var_tol)
    ordered = dev.sort().values  # the batch moments in a fixed order: any gather order gives the same bits
    mu = ordered.mean() if dev.numel() else dev.new_zeros(())
    sd = (ordered - mu).pow(2).mean().sqrt() if dev.numel() else dev.new_zeros(())
    adv = (dev - mu) / (sd + eps)
    adv = torch.where(stats.zero_variance[groups], torch.zeros_like(adv), adv)
    return (adv if clip is None else adv.clamp(-clip, clip)).to(out_dtype)


# A recipe names its estimator (advantages.estimator). One signature: (rewards (N,), groups (N,) long, *, eps,
# clip, [global_std]) -> advantages (N,); each entry fixes how a group's spread is normalised.
ADVANTAGE_ESTIMATORS: dict[str, Callable[..., Tensor]] = {
    "grpo": partial(group_advantages, std="group"),
    "flow_grpo": partial(group_advantages, std="global"),
    "dr_grpo": partial(group_advantages, std="none", clip=None),
    "rloo": rloo_advantages,
    "reinforce_pp_baseline": reinforce_pp_baseline_advantages,
}


def get_advantage_estimator(name: str) -> Callable[..., Tensor]:
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; known: {sorted(ADVANTAGE_ESTIMATORS)}")
    return ADVANTAGE_ESTIMATORS[name]
