"""Policy losses (docs/algorithms.md §6-7): clipped surrogate, chunk/sequence ratios, RatioNorm, KL, aggregation, and
DiffusionNFT's forward-process loss (no log-probs: flow matching on clean samples).

A *unit* is what carries one log-prob: a denoising step (image) or a token (LLM). Image log-probs are
per-element means over the latent (the convention every clip default here assumes).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .chunks import chunk_mean
from .ratio_losses import cispo_surrogate, gmpo_surrogate, ratio_extremes

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _expand_like(x: Tensor, ref: Tensor, name: str) -> Tensor:
    # Per-sample values (B,) against per-unit tensors (B, T): append singleton dims.
    if x.dim() < ref.dim() and x.shape == ref.shape[: x.dim()]:
        x = x.reshape(x.shape + (1,) * (ref.dim() - x.dim()))
    try:
        torch.broadcast_shapes(x.shape, ref.shape)
    except RuntimeError:
        raise ValueError(f"{name} shape {tuple(x.shape)} does not broadcast to {tuple(ref.shape)}") from None
    return x


def _per_sample(std: Tensor | float, n: int, like: Tensor) -> Tensor:
    s = torch.as_tensor(std, dtype=like.dtype, device=like.device)
    if s.dim() == 0:
        return s.expand(n)
    if s.shape != (n,):
        raise ValueError(f"std must be a scalar or shape ({n},), got {tuple(s.shape)}")
    return s


def clipped_surrogate_from_log_ratio(
    log_ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float | None = None, mask: Tensor | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clip on a given log-ratio: ``max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high))`` per unit.

    eps_high defaults to eps_low (DAPO: 0.2 / 0.28; flow models: 1e-4 with mean-reduced log-probs).
    Stats (detached, over ``mask`` if given): clip_frac (units whose clipped branch is active, i.e. zero
    gradient), approx_kl = mean(0.5 * log_ratio^2) (Flow-GRPO's form, the k2 estimator), ratio mean/min/max.
    """
    eps_high = eps_low if eps_high is None else eps_high
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"clip ranges must be >= 0, got eps_low={eps_low}, eps_high={eps_high}")
    adv = _expand_like(adv, log_ratio, "adv").to(log_ratio.dtype)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    with torch.no_grad():
        m = torch.ones_like(ratio) if mask is None else _expand_like(mask, ratio, "mask").to(ratio.dtype)
        m = m.expand_as(ratio)
        n = m.sum().clamp(min=1)
        valid = m > 0
        r = ratio.detach()
        stats = {
            "clip_frac": ((clipped > unclipped).to(r.dtype) * m).sum() / n,
            "approx_kl": (0.5 * log_ratio.detach().pow(2) * m).sum() / n,
            "ratio_mean": (r * m).sum() / n,
            **ratio_extremes(r, valid),
        }
    return loss, stats


def clipped_surrogate(
    logp: Tensor,
    logp_old: Tensor,
    adv: Tensor,
    eps_low: float,
    eps_high: float | None = None,
    *,
    chunk_ids: Tensor | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-unit clipped surrogate with ``rho = exp(logp - logp_old)``, or the chunk ratio when
    ``chunk_ids`` is given (GCPO / Chunk-GRPO; GSPO = one chunk per sequence). See
    ``clipped_surrogate_from_log_ratio`` for eps defaults and stats."""
    if chunk_ids is None:
        log_ratio = logp - logp_old
    else:
        log_ratio = chunk_log_ratios(logp, logp_old, chunk_ids, mask)
    return clipped_surrogate_from_log_ratio(log_ratio, adv, eps_low, eps_high, mask)


def chunk_log_ratios(logp: Tensor, logp_old: Tensor, chunk_ids: Tensor, mask: Tensor | None = None) -> Tensor:
    """``log rho_chunk`` = mean of the unit log-ratios in each chunk, broadcast back to the units.

    chunk_ids: LongTensor of logp's shape, ids unique across the batch (e.g. for GSPO on (B, T) tokens:
    ``arange(B)[:, None].expand(B, T)``). Units with mask 0 are left out of the mean (they still receive
    their chunk's value); a chunk with no valid unit gets 0. Gradient reaches every unit of the chunk.
    """
    if chunk_ids.shape != logp.shape or logp_old.shape != logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)}, logp_old {tuple(logp_old.shape)} and chunk_ids "
                         f"{tuple(chunk_ids.shape)} must have one shape")
    return chunk_mean(logp - logp_old, chunk_ids, None if mask is None else mask.reshape(logp.shape))


def chunk_ratios(logp: Tensor, logp_old: Tensor, chunk_ids: Tensor, mask: Tensor | None = None) -> Tensor:
    """``rho_chunk = exp(mean of step log-ratios in the chunk)`` per unit (see ``chunk_log_ratios``)."""
    return torch.exp(chunk_log_ratios(logp, logp_old, chunk_ids, mask))


def ratio_norm_log_ratio(
    logp: Tensor, logp_old: Tensor, mean: Tensor, mean_old: Tensor, std: Tensor | float
) -> Tensor:
    """GRPO-Guard RatioNorm: ``log rho_hat = s * (logp - logp_old + mean((mu - mu_old)^2) / (2 s^2))``.

    logp, logp_old: (N,) mean-reduced step log-probs; mean, mean_old: (N, ...) kernel means (mean_old
    stored at rollout); std: the step std s_k (includes sqrt(h_k)), scalar or (N,). Feed the result to
    ``clipped_surrogate_from_log_ratio`` (GRPO-Guard: eps about 2e-6, no KL).
    """
    n = logp.shape[0]
    s = _per_sample(std, n, logp)
    shift = (mean - mean_old).pow(2).reshape(n, -1).mean(1) / (2 * s * s)
    return s * (logp - logp_old + shift)


def kl_gaussian_mean(mean: Tensor, mean_ref: Tensor, std: Tensor | float, reduction: str = "mean") -> Tensor:
    """Closed-form KL(N(mu, s^2 I) || N(mu_ref, s^2 I)) per sample, shape (N,).

    reduction="mean": ``mean((mu - mu_ref)^2) / (2 s^2)`` over the latent elements (matches mean-reduced
    log-probs); "sum": the true KL of the whole latent. std: scalar or (N,), the step std s_k.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    dtype = torch.promote_types(mean.dtype, torch.float32)  # kernel arithmetic in float32 at least
    n = mean.shape[0]
    d2 = (mean.to(dtype) - mean_ref.to(dtype)).pow(2).reshape(n, -1)
    d2 = d2.mean(1) if reduction == "mean" else d2.sum(1)
    s = _per_sample(std, n, d2)
    return d2 / (2 * s * s)


def kl_estimator(logp: Tensor, logp_ref: Tensor, kind: str = "k3") -> Tensor:
    """Schulman's per-sample estimators of KL(pi || pi_ref) on samples from pi (the current policy).

    k1 = logp - logp_ref (unbiased, high variance, can be negative); k2 = 0.5 (logp - logp_ref)^2
    (biased, low variance); k3 = exp(logp_ref - logp) - 1 - (logp_ref - logp) (unbiased, >= 0; GRPO's).
    """
    if kind == "k1":
        return logp - logp_ref
    if kind == "k2":
        return 0.5 * (logp - logp_ref).pow(2)
    if kind == "k3":
        d = logp_ref - logp
        return torch.exp(d) - 1 - d
    raise ValueError(f"kl kind must be 'k1', 'k2' or 'k3', got {kind!r}")


def aggregate(
    loss: Tensor,
    mask: Tensor | None = None,
    mode: str = "token-mean",
    global_tokens: int | Tensor | None = None,
    global_seqs: int | Tensor | None = None,
    norm_len: int | None = None,
) -> Tensor:
    """Reduce per-unit losses to a scalar whose SUM over all micro-batches and processes of one update
    equals the full-batch value, so the gradient does not depend on world size, accumulation or micro-batch.

    token-mean: ``sum(loss * mask) / global_tokens`` (DAPO; image steps use this with loss of shape (N,)).
    seq-mean-token-mean: ``sum_seq(mean_tok(loss)) / global_seqs`` (GRPO).
    seq-mean-token-sum-norm: ``sum_seq(sum_tok(loss) / norm_len) / global_seqs`` (Dr. GRPO; norm_len is a
        fixed budget such as the max response length, required so padding width cannot change it).
    global_tokens: valid units in the whole update; global_seqs: sequences with >= 1 valid unit in the whole
    update (all-reduce them). Left None they are counted here, which is right only when this call sees the
    whole update. Undo any averaging the framework adds (DDP's mean over processes, accelerate's division
    by accumulation steps): the sum is the target.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"mode must be one of {AGGREGATIONS}, got {mode!r}")
    m = torch.ones_like(loss) if mask is None else mask.to(loss.dtype)
    if m.shape != loss.shape:
        raise ValueError(f"mask shape {tuple(m.shape)} does not match loss shape {tuple(loss.shape)}")
    if mode == "token-mean":
        denom = m.sum() if global_tokens is None else global_tokens
        return (loss * m).sum() / torch.as_tensor(denom, dtype=loss.dtype, device=loss.device).clamp(min=1)
    if loss.dim() != 2:
        raise ValueError(f"mode {mode!r} needs loss of shape (seqs, tokens), got {tuple(loss.shape)}")
    tokens = m.sum(-1)
    seq_sum = (loss * m).sum(-1)
    if mode == "seq-mean-token-mean":
        per_seq = seq_sum / tokens.clamp(min=1)
    else:
        if norm_len is None or norm_len <= 0:
            raise ValueError(f"mode {mode!r} needs a positive norm_len (e.g. the max response length)")
        per_seq = seq_sum / norm_len
    denom = (tokens > 0).sum() if global_seqs is None else global_seqs
    return per_seq.sum() / torch.as_tensor(denom, dtype=loss.dtype, device=loss.device).clamp(min=1)


def nft_optimality(adv: Tensor, clip: float) -> Tensor:
    """DiffusionNFT's optimality probability ``r = clip(A, -C, C) / (2C) + 1/2`` in [0, 1]: 1 for the best
    samples, 1/2 for an average one, 0 for the worst."""
    if clip <= 0:
        raise ValueError(f"nft_optimality needs a positive clip C, got {clip}")
    return adv.clamp(-clip, clip) / (2 * clip) + 0.5


def nft_loss(v: Tensor, v_old: Tensor, x0: Tensor, noise: Tensor, t: Tensor, r: Tensor, beta: float = 1.0,
             adaptive: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """DiffusionNFT per-sample loss on the forward process ``x_t = (1 - t) x0 + t noise`` (target ``noise - x0``).

    The implicit positive and negative policies ``v+ = (1 - beta) v_old + beta v`` and
    ``v- = (1 + beta) v_old - beta v`` are regressed onto the sample with weights r and 1 - r:
    ``loss = (r * L(v+) + (1 - r) * L(v-)) / beta``. With the plain error its pointwise minimiser is
    ``v* = v_old + (2r - 1) / beta * (target - v_old)``: toward good samples, away from bad ones, by a step set
    by beta. At ``v = v_old`` (on-policy) its gradient is advantage-weighted flow matching,
    ``2 (2r - 1) (v - target) dv`` (times t^2 / weight with the adaptive error).
    ``adaptive``: L is the x0-space error ``|x0_hat - x0|^2`` over its own detached mean absolute value (the
    paper's adaptive weighting, x0_hat = x_t - t v); otherwise the plain velocity error ``|v - target|^2``.
    v, v_old, x0, noise: (N, ...); t, r: (N,). Returns (N,) losses and stats.
    """
    if beta <= 0:
        raise ValueError(f"nft_loss needs beta > 0, got {beta}")
    n = v.shape[0]
    v, v_old, x0, noise = v.float(), v_old.detach().float(), x0.float(), noise.float()
    tb = t.float().reshape(n, *([1] * (v.dim() - 1)))
    target = noise - x0
    x_t = (1 - tb) * x0 + tb * noise

    def err(u: Tensor) -> Tensor:
        if not adaptive:
            return (u - target).pow(2).reshape(n, -1).mean(1)
        d = (x_t - tb * u - x0).reshape(n, -1)  # x0_hat - x0 = t (target - u)
        return d.pow(2).mean(1) / d.detach().abs().mean(1).clamp(min=1e-5)

    pos, neg = err((1 - beta) * v_old + beta * v), err((1 + beta) * v_old - beta * v)
    r = r.float()
    loss = (r * pos + (1 - r) * neg) / beta
    return loss, {"nft_pos": pos.detach(), "nft_neg": neg.detach(), "nft_r": r.detach()}



# ------------------------------------------------------------------------------------------ registries
# A recipe names a policy loss (training.policy_loss), a KL form (training.kl) and an aggregation
# (training.aggregation); each registry has one signature, so a trainer calls any entry the same way
# (the image trainer with denoising steps as units, the LLM trainer with tokens).


def clip_loss(logp: Tensor, logp_old: Tensor, adv: Tensor, *, eps_low: float, eps_high: float | None = None,
              chunk_ids: Tensor | None = None, mask: Tensor | None = None, mean: Tensor | None = None,
              mean_old: Tensor | None = None, std: Tensor | None = None,
              seq_ids: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clip on ``rho = exp(logp - logp_old)`` (Flow-GRPO, DanceGRPO, GRPO), or on the chunk ratio when
    ``chunk_ids`` is given (GCPO). mean / mean_old / std / seq_ids are unused."""
    return clipped_surrogate(logp, logp_old, adv, eps_low, eps_high, chunk_ids=chunk_ids, mask=mask)


def ratio_norm_loss(logp: Tensor, logp_old: Tensor, adv: Tensor, *, eps_low: float, eps_high: float | None = None,
                    chunk_ids: Tensor | None = None, mask: Tensor | None = None, mean: Tensor | None = None,
                    mean_old: Tensor | None = None, std: Tensor | None = None,
                    seq_ids: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO-Guard: PPO clip on the RatioNorm log-ratio (``ratio_norm_log_ratio``: the Gaussian kernel's negative
    mean shift added back, scaled by the step std s_k so every step's ratio has the same spread). Needs the
    kernel means of the update and of the rollout and the step std. With ``chunk_ids`` the normalised log-ratios
    are averaged per chunk."""
    if mean is None or mean_old is None or std is None:
        raise ValueError("ratio_norm needs mean, mean_old (recorded at rollout) and std")
    log_ratio = ratio_norm_log_ratio(logp, logp_old, mean, mean_old, std)
    if chunk_ids is not None:
        log_ratio = chunk_mean(log_ratio, chunk_ids, mask)
    return clipped_surrogate_from_log_ratio(log_ratio, adv, eps_low, eps_high, mask)


def _need_seq_ids(name: str, seq_ids: Tensor | None) -> Tensor:
    if seq_ids is None:
        raise ValueError(f"{name} is a sequence-level loss: pass seq_ids (the sequence of every unit)")
    return seq_ids


def gspo_loss(logp: Tensor, logp_old: Tensor, adv: Tensor, *, eps_low: float, eps_high: float | None = None,
              chunk_ids: Tensor | None = None, mask: Tensor | None = None, mean: Tensor | None = None,
              mean_old: Tensor | None = None, std: Tensor | None = None,
              seq_ids: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO: PPO clip on the sequence ratio ``s_i = exp(mean_t log w_t)``, one ratio and one clip decision per
    sequence (the paper's eps 3e-4 / 4e-4). Every unit of a sequence gets its loss (ratio_losses.py says how
    aggregation weights it)."""
    return clipped_surrogate(logp, logp_old, adv, eps_low, eps_high, chunk_ids=_need_seq_ids("gspo", seq_ids),
                             mask=mask)


def gmpo_loss(logp: Tensor, logp_old: Tensor, adv: Tensor, *, eps_low: float, eps_high: float | None = None,
              chunk_ids: Tensor | None = None, mask: Tensor | None = None, mean: Tensor | None = None,
              mean_old: Tensor | None = None, std: Tensor | None = None,
              seq_ids: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """GMPO: the geometric mean of sign-aware log-space-clipped token ratios per sequence (ratio_losses)."""
    return gmpo_surrogate(logp, logp_old, adv, _need_seq_ids("gmpo", seq_ids), eps_low, eps_high, mask)


def cispo_loss(logp: Tensor, logp_old: Tensor, adv: Tensor, *, eps_low: float, eps_high: float | None = None,
               chunk_ids: Tensor | None = None, mask: Tensor | None = None, mean: Tensor | None = None,
               mean_old: Tensor | None = None, std: Tensor | None = None,
               seq_ids: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO: REINFORCE with the importance weight capped at 1 + eps_high (ratio_losses)."""
    return cispo_surrogate(logp, logp_old, adv, eps_low, eps_low if eps_high is None else eps_high, mask)


# what the rollout must record for a loss, and whether it needs whole sequences per micro-batch (seq_ids)
ratio_norm_loss.requires, ratio_norm_loss.sequence_level = ("mean",), False
clip_loss.requires, clip_loss.sequence_level = (), False
cispo_loss.requires, cispo_loss.sequence_level = (), False
gspo_loss.requires, gspo_loss.sequence_level = (), True
gmpo_loss.requires, gmpo_loss.sequence_level = (), True

POLICY_LOSSES: dict[str, Callable[..., tuple[Tensor, dict[str, Tensor]]]] = {
    "clip": clip_loss,
    "ratio_norm": ratio_norm_loss,
    "gspo": gspo_loss,
    "gmpo": gmpo_loss,
    "cispo": cispo_loss,
}


def _gaussian_kl(*, logp, logp_ref, mean, mean_ref, std, h):
    return kl_gaussian_mean(mean, mean_ref, std)


def _flow_grpo_kl(*, logp, logp_ref, mean, mean_ref, std, h):
    # flow_grpo divides by g^2, the diffusion coefficient without the step's sqrt(h): h times the closed form
    return kl_gaussian_mean(mean, mean_ref, std / torch.as_tensor(h, dtype=std.dtype, device=std.device).sqrt())


def _estimator(kind):
    def kl(*, logp, logp_ref, mean, mean_ref, std, h):
        return kl_estimator(logp, logp_ref, kind)
    kl.__doc__ = f"Schulman's {kind} estimator on the unit log-probs (kl_estimator)."
    return kl


# KL to the reference policy per unit, shape (N,). One keyword signature: logp / logp_ref (unit log-probs under
# the trained and the reference policy), mean / mean_ref (Gaussian kernel means), std (the step std s_k,
# including sqrt(h)), h (the step length |dt|). LLM units pass logp / logp_ref only and use k1 / k2 / k3.
KL_FORMS: dict[str, Callable[..., Tensor]] = {
    "gaussian": _gaussian_kl,     # closed form mean((mu - mu_ref)^2) / (2 s^2), matching mean-reduced log-probs
    "flow_grpo": _flow_grpo_kl,   # flow_grpo's scale: mean((mu - mu_ref)^2) / (2 g^2), g = s / sqrt(h)
    "k1": _estimator("k1"),
    "k2": _estimator("k2"),
    "k3": _estimator("k3"),
}


def _token_mean(seq_ids: Tensor, norm_len: int | None):
    return torch.ones(seq_ids.shape[0], dtype=torch.float64), seq_ids.shape[0]


def _seq_mean_token_mean(seq_ids: Tensor, norm_len: int | None):
    _, inverse, counts = torch.unique(seq_ids, return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse].double(), len(counts)


def _seq_mean_token_sum_norm(seq_ids: Tensor, norm_len: int | None):
    if norm_len is None or norm_len <= 0:
        raise ValueError("seq-mean-token-sum-norm needs a positive norm_len (e.g. the max response length)")
    return torch.full((seq_ids.shape[0],), 1.0 / norm_len, dtype=torch.float64), len(torch.unique(seq_ids))


# Aggregation as per-unit weights and a denominator over the units of one whole update: the update's loss is
# sum(w * loss) / denominator, so micro-batches add up to it whatever their size (and DDP's mean over processes
# with equal unit counts keeps it). ``aggregate`` is the same reduction on a (seqs, tokens) layout.
# One signature: (seq_ids (N,) of the update's units, norm_len) -> (weights (N,) float64, denominator).
AGGREGATION_WEIGHTS: dict[str, Callable[[Tensor, int | None], tuple[Tensor, int]]] = {
    "token-mean": _token_mean,
    "seq-mean-token-mean": _seq_mean_token_mean,
    "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,
}
