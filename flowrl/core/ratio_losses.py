"""Policy losses that change the importance ratio itself (docs/algorithms.md §6): GSPO's sequence ratio, GMPO's
geometric mean of clipped token ratios, CISPO's clipped-weight REINFORCE. Per-unit losses like the PPO clip in
losses.py, so any aggregation applies; a unit is a token of a completion (or a denoising step of a trajectory).

``seq_ids`` (same shape as ``logp``): the sequence each unit belongs to, ints >= 0, unique across the batch.
The sequence-level losses give every unit of a sequence that sequence's loss, so ``seq-mean-token-mean``
aggregation makes the objective the mean over sequences (GSPO's and GMPO's papers); ``token-mean`` weights
each sequence by its length instead (trl's ``dapo`` loss type with sequence-level sampling does this).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .chunks import chunk_mean


def ratio_extremes(r: Tensor, valid: Tensor) -> dict[str, Tensor]:
    """The ratio's min and max over valid units (+inf / -inf when there are none, e.g. every token masked)."""
    if not bool(valid.any()):
        return {"ratio_min": r.new_tensor(float("inf")), "ratio_max": r.new_tensor(float("-inf"))}
    return {"ratio_min": r[valid].min(), "ratio_max": r[valid].max()}


def _stats(ratio: Tensor, log_ratio: Tensor, clipped: Tensor, mask: Tensor | None) -> dict[str, Tensor]:
    with torch.no_grad():
        m = torch.ones_like(ratio) if mask is None else mask.reshape(ratio.shape).to(ratio.dtype)
        n = m.sum().clamp(min=1)
        r = ratio.detach()
        valid = m > 0
        return {
            "clip_frac": (clipped.to(r.dtype) * m).sum() / n,
            "approx_kl": (0.5 * log_ratio.detach().pow(2) * m).sum() / n,
            "ratio_mean": (r * m).sum() / n,
            **ratio_extremes(r, valid),
        }


def _adv(adv: Tensor, like: Tensor) -> Tensor:
    adv = adv.to(like.dtype)
    if adv.shape != like.shape:
        raise ValueError(f"adv shape {tuple(adv.shape)} must match logp shape {tuple(like.shape)} (one per unit)")
    return adv


def gmpo_surrogate(logp: Tensor, logp_old: Tensor, adv: Tensor, seq_ids: Tensor, eps_low: float = 0.4,
                   eps_high: float | None = None, mask: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """GMPO: ``-A_i exp(mean_t clip(log w_t))`` per sequence, the clip sign-aware and in log space.

    For ``A > 0`` only the upper bound binds (``log w <= eps_high``), for ``A < 0`` only the lower one
    (``log w >= -eps_low``): the pessimistic side, as PPO's max(., .) picks per token, applied before the mean;
    the paper's ``(e^-0.4, e^0.4)`` is ``eps_low = eps_high = 0.4``. Clipped tokens carry no gradient.
    """
    eps_high = eps_low if eps_high is None else eps_high
    adv = _adv(adv, logp)
    log_w = logp - logp_old
    sign = torch.sign(adv)
    bounded = torch.clamp(log_w, -eps_low, eps_high)
    chosen = sign * torch.minimum(sign * log_w, sign * bounded)  # = log_w unless the pessimistic bound binds
    log_r = chunk_mean(chosen, seq_ids, mask)
    ratio = torch.exp(log_r)
    loss = -adv * ratio
    return loss, _stats(ratio, log_r, chosen.detach() != log_w.detach(), mask)


def cispo_surrogate(logp: Tensor, logp_old: Tensor, adv: Tensor, eps_low: float | None = None,
                    eps_high: float = 4.0, mask: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO (MiniMax-M1): ``-sg[min(w, 1 + eps_high)] A log pi`` per token; a REINFORCE step whose importance
    weight is capped but never zeroed, so clipped tokens keep their gradient (PPO's clip drops it).

    The cap is ``1 + eps_high`` as the clip ranges elsewhere count from 1 (trl's ``epsilon_high`` is the cap
    itself: trl's 5.0 is eps_high 4.0 here). eps_low is unused: CISPO sets no lower bound.
    """
    adv = _adv(adv, logp)
    log_w = logp - logp_old
    w = torch.exp(log_w.detach())
    capped = torch.clamp(w, max=1.0 + eps_high)
    loss = -capped * adv * logp
    return loss, _stats(torch.exp(log_w), log_w, w > 1.0 + eps_high, mask)
