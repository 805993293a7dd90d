"""Rollout / training mismatch weights (docs/algorithms.md §6): when samples come from a different engine than
the one training recomputes log-probs with (vLLM against transformers, a quantised sampler, another precision),
the behaviour policy is the rollout engine's, and each unit's loss is multiplied by the constant
``rho = exp(logp_train_old - logp_rollout)``, truncated (TIS) or masked (MIS / IcePop) outside its bounds.

``level="token"`` uses each unit's own ratio; ``"sequence"`` the product over the sequence's units
(``exp(sum_t log rho_t)``, broadcast back), the form trl defaults to. Everything is detached: a weight, not a
term to differentiate.
"""
from __future__ import annotations

import torch
from torch import Tensor

IS_LEVELS = ("token", "sequence")
IS_MODES = ("truncate", "mask")


def mismatch_weights(logp_train: Tensor, logp_rollout: Tensor, seq_ids: Tensor | None = None, level: str = "sequence",
                     mode: str = "mask", clip_max: float = 3.0, clip_min: float | None = None
                     ) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-unit weights (same shape as the log-probs) and stats: the mean weight and the fraction of units
    whose ratio fell outside ``[clip_min, clip_max]`` (truncated to the bound, or given weight 0)."""
    if level not in IS_LEVELS:
        raise ValueError(f"level must be one of {IS_LEVELS}, got {level!r}")
    if mode not in IS_MODES:
        raise ValueError(f"mode must be one of {IS_MODES}, got {mode!r}")
    if clip_max <= 0 or (clip_min is not None and not 0 <= clip_min < clip_max):
        raise ValueError(f"need 0 <= clip_min < clip_max, got clip_min={clip_min}, clip_max={clip_max}")
    if logp_train.shape != logp_rollout.shape:
        raise ValueError(f"logp_train {tuple(logp_train.shape)} and logp_rollout {tuple(logp_rollout.shape)} differ")
    log_rho = (logp_train - logp_rollout).detach().double()
    if level == "sequence":
        if seq_ids is None or seq_ids.shape != log_rho.shape:
            raise ValueError("level='sequence' needs seq_ids of the log-probs' shape")
        ids = seq_ids.reshape(-1).long()
        total = log_rho.new_zeros(int(ids.max()) + 1 if ids.numel() else 0).index_add(0, ids, log_rho.reshape(-1))
        log_rho = total[ids].reshape(log_rho.shape)
    rho = torch.exp(log_rho.clamp(max=80.0))
    low = 0.0 if clip_min is None else clip_min
    outside = (rho > clip_max) | (rho < low)
    if mode == "truncate":
        w = rho.clamp(min=low, max=clip_max)
    else:
        w = torch.where(outside, torch.zeros_like(rho), rho)
    w = w.to(logp_train.dtype)
    return w, {"is_weight_mean": w.mean() if w.numel() else w.new_zeros(()),
               "is_outside_frac": outside.to(w.dtype).mean() if w.numel() else w.new_zeros(())}
