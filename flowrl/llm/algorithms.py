"""Published GRPO-family methods as named defaults (docs/algorithms.md §11): ``training.algorithm: dapo`` fills
the keys a recipe leaves out with the paper's settings; every key the recipe sets stays as set.

Each method is a choice of registered parts of flowrl.core: the advantage estimator, the policy loss, its
clip range, the aggregation and the KL. Learning rates, group sizes and lengths are the model's business and
stay with the recipe.
"""
from __future__ import annotations

import copy

from flowrl.train.config import ConfigError

ALGORITHMS: dict[str, dict[str, dict]] = {
    # DeepSeekMath: group z-score, token-level PPO clip, mean over each sequence's tokens then over sequences,
    # k3 KL to the reference in the loss
    "grpo": {"advantages": {"estimator": "grpo"},
             "training": {"policy_loss": "clip", "aggregation": "seq-mean-token-mean", "clip_eps_low": 0.2,
                          "kl_beta": 0.04, "kl": "k3"}},
    # Dr. GRPO: no std division, a constant length normaliser (the completion budget), no KL
    "dr_grpo": {"advantages": {"estimator": "dr_grpo"},
                "training": {"policy_loss": "clip", "aggregation": "seq-mean-token-sum-norm", "clip_eps_low": 0.2,
                             "kl_beta": 0.0}},
    # DAPO: clip-higher, token-level mean over the whole batch, dynamic sampling, no KL (its soft overlong
    # penalty is the "overlong" reward, weighted next to the correctness reward)
    "dapo": {"advantages": {"estimator": "grpo"},
             "data": {"dynamic_sampling": True},
             "training": {"policy_loss": "clip", "aggregation": "token-mean", "clip_eps_low": 0.2,
                          "clip_eps_high": 0.28, "kl_beta": 0.0}},
    # GSPO: one ratio and one clip decision per sequence, eps 3e-4 / 4e-4 (paper v2), mean over sequences
    "gspo": {"advantages": {"estimator": "grpo"},
             "training": {"policy_loss": "gspo", "aggregation": "seq-mean-token-mean", "clip_eps_low": 3e-4,
                          "clip_eps_high": 4e-4, "kl_beta": 0.0}},
    # GMPO: geometric mean of token ratios clipped in log space to (-0.4, 0.4)
    "gmpo": {"advantages": {"estimator": "grpo"},
             "training": {"policy_loss": "gmpo", "aggregation": "seq-mean-token-mean", "clip_eps_low": 0.4,
                          "clip_eps_high": 0.4, "kl_beta": 0.0}},
    # CISPO (MiniMax-M1, with ScaleRL's cap of 5 on the weight): token-level REINFORCE, capped weights
    "cispo": {"advantages": {"estimator": "grpo"},
              "training": {"policy_loss": "cispo", "aggregation": "token-mean", "clip_eps_high": 4.0,
                           "kl_beta": 0.0}},
    # RLOO: leave-one-out baseline, no std
    "rloo": {"advantages": {"estimator": "rloo"},
             "training": {"policy_loss": "clip", "aggregation": "token-mean", "clip_eps_low": 0.2, "kl_beta": 0.0}},
    # REINFORCE++-baseline: group mean subtracted, batch whitening, k2 KL in the loss at 1e-3 (verl's docs)
    "reinforce_pp_baseline": {"advantages": {"estimator": "reinforce_pp_baseline"},
                              "training": {"policy_loss": "clip", "aggregation": "token-mean", "clip_eps_low": 0.2,
                                           "kl_beta": 1e-3, "kl": "k2"}},
}


def apply_algorithm(data: dict) -> dict:
    """``data`` with ``training.algorithm``'s defaults filled in where the recipe is silent (a copy)."""
    training = data.get("training") or {}
    name = training.get("algorithm") if isinstance(training, dict) else None
    if name is None:
        return data
    if name not in ALGORITHMS:
        raise ConfigError(f"training.algorithm: {name!r} is not one of {sorted(ALGORITHMS)}")
    out = copy.deepcopy(data)
    for section, values in ALGORITHMS[name].items():
        node = out.setdefault(section, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{section}: expected a mapping, got {node!r}")
        for key, value in values.items():
            node.setdefault(key, value)
    return out
