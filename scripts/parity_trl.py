"""flowrl's registered losses and aggregations against trl's own GRPO loss code, on one fixed batch.

trl's ``GRPOTrainer._compute_loss`` (its real code path: ratio, clipping, KL, normalisation by ``loss_type``) is
called with a stand-in trainer whose ``_get_per_token_logps_and_entropies`` returns the batch's fixed current
log-probs; flowrl's side is what its LLM update computes for one micro-batch holding the whole batch on one
process (``POLICY_LOSSES``, ``KL_FORMS``, ``flowrl.llm.update.token_weights``). Losses and the gradients with
respect to the current log-probs must agree to 1e-6 (float64). Mapping:

    trl loss_type             flowrl policy_loss + aggregation
    grpo                      clip + seq-mean-token-mean
    bnpo                      clip + token-mean (trl: over the local micro-batch; here the micro-batch is the batch)
    dr_grpo                   clip + seq-mean-token-sum-norm, norm_len = max_completion_length
    dapo                      clip + token-mean (trl: num_items_in_batch, the generation batch's tokens)
    cispo                     cispo + token-mean; trl's epsilon_high is the cap itself, flowrl's cap is 1 + eps_high
    grpo, sequence-level IS   gspo + seq-mean-token-mean (GSPO)

Known difference, outside this batch: trl's grpo / dr_grpo divide by every row of the micro-batch, flowrl by the
sequences with at least one valid token; a completion with no valid token (fully masked) counts in trl's mean.

    .venv-trl/bin/python scripts/parity_trl.py      (an environment with trl: pip install -e ".[test,trl]")
"""
from __future__ import annotations

import sys
import types
from collections import defaultdict

import torch

from flowrl.core import KL_FORMS, POLICY_LOSSES
from flowrl.llm.update import token_weights

B, T, L_MAX = 6, 8, 10
# (name, trl loss_type, trl importance_sampling_level, trl eps low / high, beta, flowrl loss, aggregation, eps high)
CASES = [
    ("grpo", "grpo", "token", 0.2, 0.28, 0.0, "clip", "seq-mean-token-mean", 0.28),
    ("grpo + k3 KL", "grpo", "token", 0.2, 0.28, 0.04, "clip", "seq-mean-token-mean", 0.28),
    ("bnpo", "bnpo", "token", 0.2, 0.28, 0.0, "clip", "token-mean", 0.28),
    ("dr_grpo", "dr_grpo", "token", 0.2, 0.28, 0.0, "clip", "seq-mean-token-sum-norm", 0.28),
    ("dapo", "dapo", "token", 0.2, 0.28, 0.0, "clip", "token-mean", 0.28),
    ("dapo + k3 KL", "dapo", "token", 0.2, 0.28, 0.1, "clip", "token-mean", 0.28),
    ("cispo", "cispo", "token", 0.2, 1.5, 0.0, "cispo", "token-mean", 0.5),
    ("gspo (sequence IS)", "grpo", "sequence", 3e-4, 4e-4, 0.0, "gspo", "seq-mean-token-mean", 4e-4),
    ("gspo + k3 KL", "grpo", "sequence", 3e-4, 4e-4, 0.04, "gspo", "seq-mean-token-mean", 4e-4),
]


def fixed_batch(seq_level: bool):
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([1, 3, 8, 5, 2, 7])
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3 - 0.05
    # old log-probs off by noise: token ratios in about (0.6, 1.6), so the clip binds on both sides; for the
    # sequence ratio (clip 3e-4) a smaller drift keeps some sequences inside the range
    scale = 2e-3 if seq_level else 0.25
    old = logp + scale * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.2, -0.7, 0.4, -1.5, 0.9, -0.3], dtype=torch.float64)
    return logp, old, ref, adv, mask


def _stand_in(loss_type, level, eps_low, eps_high, beta, logp):
    """The attributes trl's _compute_loss reads, for one process, no accumulation, no vLLM."""
    acc = types.SimpleNamespace(num_processes=1, sync_gradients=True, gather=lambda x: x,
                                gather_for_metrics=lambda x: x, reduce=lambda x, reduction="sum": x)
    args = types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1)
    return types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=level, beta=beta, args=args, loss_type=loss_type, epsilon_low=eps_low,
        epsilon_high=eps_high, use_vllm=False, vllm_importance_sampling_correction=False,
        model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=L_MAX, accelerator=acc, _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)})


def trl_loss(case, logp, old, ref, adv, mask):
    from trl import GRPOTrainer

    _, loss_type, level, lo, hi, beta, *_ = case
    cur = logp.clone().requires_grad_()
    inputs = {"prompt_ids": torch.ones(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.ones(B, T, dtype=torch.long), "completion_mask": mask, "advantages": adv,
              "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum().to(torch.float64)}
    loss = GRPOTrainer._compute_loss(_stand_in(loss_type, level, lo, hi, beta, cur), None, inputs)
    loss.backward()
    return loss.detach(), cur.grad


def flowrl_loss(case, logp, old, ref, adv, mask):
    _, _, _, lo, _, beta, policy_loss, aggregation, hi = case
    cur = logp.clone().requires_grad_()
    m = mask.bool()
    seq = torch.arange(B)
    per_unit, _ = POLICY_LOSSES[policy_loss](cur[m], old[m], adv[:, None].expand(B, T)[m], eps_low=lo, eps_high=hi,
                                             seq_ids=seq[:, None].expand(B, T)[m])
    if beta:
        per_unit = per_unit + beta * KL_FORMS["k3"](logp=cur[m], logp_ref=ref[m], mean=None, mean_ref=None,
                                                   std=None, h=None)
    w, denom = token_weights(mask, seq, aggregation, L_MAX)
    loss = (per_unit * w.to(per_unit)).sum() / denom
    loss.backward()
    return loss.detach(), cur.grad


def compare() -> list[tuple[str, float, float, float, float]]:
    rows = []
    for case in CASES:
        batch = fixed_batch(case[2] == "sequence")
        (a, ga), (b, gb) = trl_loss(case, *batch), flowrl_loss(case, *batch)
        rows.append((case[0], float(a), float(b), abs(float(a) - float(b)), float((ga - gb).abs().max())))
    return rows


def main() -> int:
    import trl

    rows = compare()
    print(f"trl {trl.__version__}; batch of {B} completions of lengths 1-8, max_completion_length {L_MAX}, float64")
    print("| case | trl loss | flowrl loss | loss diff | max grad diff |\n|---|---|---|---|---|")
    for name, a, b, d, g in rows:
        print(f"| {name} | {a:+.10f} | {b:+.10f} | {d:.1e} | {g:.1e} |")
    bad = [r[0] for r in rows if r[3] > 1e-6 or r[4] > 1e-6]
    if bad:
        print(f"differ beyond 1e-6: {bad}")
        return 1
    print("all agree to 1e-6")
    return 0


if __name__ == "__main__":
    sys.exit(main())
