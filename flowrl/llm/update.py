"""One optimizer update of a language model on the shared core: token units, the registered policy loss, KL and
mismatch weights, aggregated with global denominators so the gradient does not depend on the number of
processes, the accumulation or the micro-batch size (tests/test_llm_invariance.py).

The units of an update are the valid completion tokens of its sequences, flattened in sequence order; each
carries its sequence's advantage and id. ``AGGREGATION_WEIGHTS`` turns the update's sequence ids into one weight
per token and a denominator, the denominator is summed over processes, and every micro-batch backpropagates
``sum(w * loss) / denominator`` of its own tokens: the micro-batches and processes add up to the update's loss
(DDP's mean over processes is undone by the same sum).
"""
from __future__ import annotations

import contextlib

import torch

from flowrl.core import AGGREGATION_WEIGHTS, KL_FORMS, POLICY_LOSSES, mismatch_weights
from flowrl.llm.rollout import token_logprobs


def token_weights(mask: torch.Tensor, seq_ids: torch.Tensor, mode: str, norm_len: int | None):
    """Per-token aggregation weights of one update (tokens flattened row by row) and its local denominator."""
    ids = seq_ids[:, None].expand_as(mask)[mask.bool()]
    return AGGREGATION_WEIGHTS[mode](ids, norm_len)


def micro_batch_loss(model, batch, adv, logp_old, seq_ids, cfg, device, reference=None):
    """Per-token losses of one micro-batch (flattened valid tokens, in row order) and detached stats.

    ``logp_old``: (n, Lc) log-probs of the policy that sampled (None: on-policy, the current ones detached);
    ``reference``: a context manager factory yielding the module that computes the reference policy's log-probs
    (KL in the loss)."""
    t, g = cfg.training, cfg.generation
    logp, entropy = token_logprobs(model, batch, g.temperature, device, entropy=True)
    mask = batch.completion_mask.to(device).bool()
    old = logp.detach() if logp_old is None else logp_old.to(device)
    per_seq = adv.to(device).float()[:, None].expand_as(mask)
    ids = seq_ids.to(device)[:, None].expand_as(mask)
    logp_u, old_u = logp[mask], old[mask]
    loss, s = POLICY_LOSSES[t.policy_loss](logp_u, old_u, per_seq[mask], eps_low=t.clip_eps_low,
                                           eps_high=t.clip_eps_high, seq_ids=ids[mask])
    stats = {"loss": loss.detach(), "entropy": entropy.reshape(1), **{k: s[k].reshape(-1) for k in
                                                                       ("clip_frac", "approx_kl", "ratio_mean",
                                                                        "ratio_min", "ratio_max")}}
    if g.mismatch is not None:
        w, ws = mismatch_weights(old_u, batch.logp_rollout.to(device)[mask], ids[mask],
                                 level=g.mismatch.get("level", "sequence"), mode=g.mismatch.get("mode", "mask"),
                                 clip_max=g.mismatch.get("clip_max", 3.0), clip_min=g.mismatch.get("clip_min"))
        loss = loss * w
        stats.update({k: v.reshape(1) for k, v in ws.items()})
    if t.kl_beta > 0 and not t.kl_in_reward:
        with torch.no_grad(), reference() as reference_model:
            ref = token_logprobs(reference_model, batch, g.temperature, device)
        kl = KL_FORMS[t.kl](logp=logp_u, logp_ref=ref[mask], mean=None, mean_ref=None, std=None, h=None)
        loss = loss + t.kl_beta * kl
        stats["kl"] = kl.detach()
    return loss, stats


def backward_update(model, acc, batch, adv, logp_old, seq_ids, cfg, micro_batch_size: int, reference=None):
    """Backpropagate one update's loss over micro-batches of ``micro_batch_size`` sequences (no optimizer step).

    Every process must hold the same number of sequences. Returns (stats lists, the positions in ``batch`` of the
    sequences with a non-finite token loss on this process)."""
    t = cfg.training
    mask = batch.completion_mask
    weights, denom = token_weights(mask, seq_ids, t.aggregation, t.norm_len or cfg.model.max_completion_tokens)
    denom = float(acc.gather(torch.tensor([float(denom)], device=acc.device)).sum()) / acc.num_processes
    denom = denom or 1.0
    counts = mask.sum(1).tolist()
    logs: dict[str, list] = {}
    bad, start, n = [], 0, len(batch)
    for j, lo in enumerate(range(0, n, micro_batch_size)):
        idx = torch.arange(lo, min(lo + micro_batch_size, n))
        last = lo + micro_batch_size >= n
        sync = contextlib.nullcontext() if last else acc.no_sync(model)
        with sync, acc.autocast():
            loss, s = micro_batch_loss(model, batch.take(idx), adv[idx], None if logp_old is None else logp_old[idx],
                                       seq_ids[idx], cfg, acc.device, reference)
            k = int(sum(counts[i] for i in idx.tolist()))
            w = weights[start:start + k].to(loss)
            start += k
            acc.backward((loss * w).sum() / denom)
        per_row = torch.split((~torch.isfinite(loss.detach())).cpu(), [counts[i] for i in idx.tolist()])
        bad += [int(i) for i, r in zip(idx, per_row) if bool(r.any())]
        for key, v in s.items():
            logs.setdefault(key, []).append(v.detach().float().reshape(-1).cpu())
    return logs, bad


def batched_logprobs(model, batch, temperature: float, device, size: int) -> torch.Tensor:
    """(N, Lc) token log-probs without gradient, ``size`` sequences per forward, on the CPU."""
    out = []
    with torch.no_grad():
        for lo in range(0, len(batch), size):
            part = batch.take(torch.arange(lo, min(lo + size, len(batch))))
            out.append(token_logprobs(model, part, temperature, device).cpu())
    return torch.cat(out)


def sequence_kl(logp: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sequence sum of a token KL estimator (KL in the reward: r - beta * sum_t KL_t)."""
    kl = KL_FORMS[kind](logp=logp, logp_ref=logp_ref, mean=None, mean_ref=None, std=None, h=None)
    return (kl * mask).sum(1)


def reduce_stats(acc, logs: dict[str, list]) -> dict[str, float]:
    """Means over every process's values, the ratio's min and max. Per-token stats come in different numbers per
    process, so each sends its sum, count, min and max. Collective, keys in sorted order."""
    out = {}
    for k in sorted(logs):
        v = torch.cat(logs[k]).double()
        lo, hi = (v.min(), v.max()) if v.numel() else (torch.tensor(float("inf")), torch.tensor(float("-inf")))
        local = torch.stack([v.sum(), torch.tensor(float(v.numel()), dtype=torch.float64), lo.double(), hi.double()])
        parts = acc.gather(local[None].to(acc.device)).cpu()
        if k == "ratio_min":
            out[k] = float(parts[:, 2].min())
        elif k == "ratio_max":
            out[k] = float(parts[:, 3].max())
        elif parts[:, 1].sum() > 0:  # a stat no process has values of (e.g. every token masked) is left out
            out[k] = float(parts[:, 0].sum() / parts[:, 1].sum())
    return out
