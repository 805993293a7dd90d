"""Chunk partitions of a trajectory's trained denoising steps (Chunk-GRPO / GCPO): pure tensor math, no models.

A chunk is a run of consecutive steps that shares one importance ratio, the geometric mean of its step ratios
(``chunk_mean`` of the step log-ratios; see ``flowrl.core.losses.chunk_log_ratios``). One chunk per step is
Flow-GRPO's per-step ratio, one chunk per trajectory the sequence-level (GSPO) ratio. Steps are indexed from
the high-noise end: step 0 is the first denoising step, taken from pure noise.

Partitions here are per trajectory, ids 0..K-1 in step order; offset them by ``b * K`` (or any running count)
to make them unique across a batch before ``chunk_mean`` / ``chunk_log_ratios``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def fixed_chunks(num_steps: int, sizes: Sequence[int]) -> Tensor:
    """Chunk id of each step for chunks of the given ``sizes``, laid from step 0 (high noise) on.

    GCPO's released default is ``sizes=[2, 3, 4, 7]`` over 16 trained steps: short chunks where the image
    changes fast (high noise), long ones where it settles.
    """
    sizes = [int(s) for s in sizes]
    if not sizes or any(s <= 0 for s in sizes):
        raise ValueError(f"sizes must be a non-empty list of positive ints, got {sizes}")
    if sum(sizes) != num_steps:
        raise ValueError(f"sizes must sum to num_steps: sum(sizes)={sum(sizes)} != num_steps={num_steps}")
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))


def uniform_chunks(num_steps: int, size: int) -> Tensor:
    """Chunks of ``size`` steps from step 0, the last one shorter if ``size`` does not divide ``num_steps``.

    size 1 gives per-step ratios; size >= num_steps one chunk, i.e. the sequence-level ratio.
    """
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}")
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    return torch.arange(num_steps) // size


def relative_l1_change(states: Tensor) -> Tensor:
    """``L1_rel(k) = ||x_k - x_{k+1}||_1 / ||x_k||_1`` along one trajectory, shape (n,), float32.

    states: (n + 1, ...), x_0 the initial noise. GCPO partitions and weights chunks by this curve: how much
    each step moves the latent, relative to where it starts. Computed in float64 so bf16 latents do not
    quantise the small late-step changes to zero.
    """
    if states.dim() < 2 or states.shape[0] < 2:
        raise ValueError(f"states must have shape (n + 1, ...) with n >= 1, got {tuple(states.shape)}")
    return step_l1_change(states[:-1], states[1:])


def step_l1_change(x: Tensor, x_next: Tensor) -> Tensor:
    """``||x - x_next||_1 / ||x||_1`` per row of (n, ...) pairs of states, float32 (float64 inside): the same
    curve for steps that are not one contiguous chain (e.g. the stored steps of a rollout forest)."""
    x, x_next = x.detach().double().flatten(1), x_next.detach().double().flatten(1)
    return ((x - x_next).abs().sum(1) / x.abs().sum(1)).float()


def _sign_change_cuts(values: Tensor, order: int) -> list[int]:
    # Positions p (1..m-1) such that a cut goes before value p: D_k = order-th difference, a cut before k + 1
    # whenever sign(D_k) is opposite to the last nonzero sign before it. Zeros never cut.
    if values.numel() - order < 2:
        return []
    signs = torch.sign(torch.diff(values, n=order)).tolist()
    cuts, last = [], 0.0
    for k, s in enumerate(signs):
        if s != 0:
            if last != 0 and s != last:
                cuts.append(k + 1)
            last = s
    return cuts


def _split(values: Tensor, order: int, max_size: int, force: bool) -> list[int]:
    # Chunk lengths for one part of the curve; `force` makes the top level cut even when m <= max_size.
    m = values.numel()
    if m <= 1 or (m <= max_size and not force):
        return [m]
    cuts = _sign_change_cuts(values, order) or [m // 2]
    bounds = [0, *cuts, m]
    lengths: list[int] = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        lengths += _split(values[a:b], order + 1, max_size, False)
    return lengths


def adaptive_chunks(l1_rel: Tensor, max_size: int = 4) -> Tensor:
    """GCPO v3's adaptive partition of n steps from their ``L1_rel`` curve, chunk ids (n,) in step order.

    Cuts follow the curve's turning points, so a chunk groups steps whose change evolves the same way. Rule
    (order r, values v_0..v_{m-1} of the part being split, D_k = r-th difference ``diff(v, n=r)[k]``):
    a cut goes between steps k and k+1 whenever D_k has the opposite sign of the last nonzero D_j, j < k
    (zero differences never cut; for r = 1 the turning step ends its chunk). Without any such sign change,
    or with fewer than two differences, the part is split at its midpoint (first half ``m // 2`` steps).
    Level 1 always splits the whole curve with r = 1; then every chunk longer than ``max_size`` is split
    again by the same rule on its own values with r + 1, recursively, until no chunk exceeds ``max_size``.
    Deterministic; ids consecutive from 0.
    """
    if l1_rel.dim() != 1:
        raise ValueError(f"l1_rel must be 1-D (one value per step), got shape {tuple(l1_rel.shape)}")
    if max_size < 1:
        raise ValueError(f"max_size must be >= 1, got {max_size}")
    v = l1_rel.detach().double().cpu()
    if v.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    lengths = _split(v, 1, max_size, True)
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))


def chunk_weights(l1_rel: Tensor, chunk_ids: Tensor) -> Tensor:
    """GCPO's chunk sampling weights (K,): mean ``L1_rel`` of each chunk, normalised to sum 1.

    Chunks where the latent moves most are trained most often. A chunk id with no step gets weight 0.
    """
    if l1_rel.dim() != 1 or chunk_ids.shape != l1_rel.shape:
        raise ValueError(f"l1_rel and chunk_ids must be 1-D of one shape, got {tuple(l1_rel.shape)} and "
                         f"{tuple(chunk_ids.shape)}")
    if l1_rel.numel() == 0:
        raise ValueError("l1_rel is empty: no chunks to weight")
    ids = chunk_ids.long()
    if int(ids.min()) < 0:
        raise ValueError(f"chunk_ids must be >= 0, got min {int(ids.min())}")
    v = l1_rel.detach().to(torch.promote_types(l1_rel.dtype, torch.float32))
    k = int(ids.max()) + 1
    total = v.new_zeros(k).index_add(0, ids, v)
    count = v.new_zeros(k).index_add(0, ids, torch.ones_like(v))
    mean = total / count.clamp(min=1)
    if not bool((mean >= 0).all()) or float(mean.sum()) <= 0:
        raise ValueError(f"chunk means of l1_rel must be >= 0 with a positive sum, got {mean.tolist()}")
    return mean / mean.sum()


def sample_chunks(num_chunks: int, keep: int, generator: torch.Generator, weights: Tensor | None = None) -> Tensor:
    """``keep`` distinct chunk ids, sorted ascending: uniform (a randperm) or, given ``weights`` (num_chunks,),
    weighted without replacement (GCPO's weighted chunk sampling). Reproducible from ``generator``.

    Training only the sampled chunks cuts the backward passes per trajectory from K to ``keep``.
    """
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
    if not 0 <= keep <= num_chunks:
        raise ValueError(f"keep must be in [0, num_chunks={num_chunks}], got {keep}")
    device = generator.device
    if weights is None:
        picked = torch.randperm(num_chunks, generator=generator, device=device)[:keep]
    else:
        if weights.shape != (num_chunks,):
            raise ValueError(f"weights must have shape ({num_chunks},), got {tuple(weights.shape)}")
        w = weights.detach().to(device=device, dtype=torch.float64)
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError(f"weights must be finite and >= 0, got {weights.tolist()}")
        if int((w > 0).sum()) < keep:
            raise ValueError(f"weights has {int((w > 0).sum())} positive entries, fewer than keep={keep}")
        if keep == 0:
            return torch.zeros(0, dtype=torch.long, device=device)
        picked = torch.multinomial(w, keep, replacement=False, generator=generator)
    return picked.sort().values


def chunk_mean(values: Tensor, chunk_ids: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean of ``values`` over each unit's chunk, broadcast back to the units (shape of ``values``).

    ``chunk_mean(logp - logp_old, ids, mask)`` is ``chunk_log_ratios``; use it on already computed per-unit
    values too (e.g. a RatioNorm log-ratio). chunk_ids: ints >= 0, unique across the batch. Units with mask 0
    are left out of the mean but still receive their chunk's value; a chunk with no valid unit gets 0.
    Gradient reaches every valid unit of the chunk.
    """
    if chunk_ids.shape != values.shape:
        raise ValueError(f"chunk_ids shape {tuple(chunk_ids.shape)} must match values shape {tuple(values.shape)}")
    if mask is not None and mask.shape != values.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must match values shape {tuple(values.shape)}")
    if values.numel() == 0:
        return values.clone()
    ids = chunk_ids.reshape(-1).long()
    if int(ids.min()) < 0:
        raise ValueError(f"chunk_ids must be >= 0, got min {int(ids.min())}")
    v = values.reshape(-1)
    w = torch.ones_like(v) if mask is None else mask.reshape(-1).to(v.dtype)
    k = int(ids.max()) + 1
    total = v.new_zeros(k).index_add(0, ids, v * w)
    count = v.new_zeros(k).index_add(0, ids, w)
    return (total / count.clamp(min=1))[ids].reshape(values.shape)
