"""Pure tensor math shared by image and LLM GRPO training: advantages, policy losses, KL, aggregation, mismatch
weights, stat tracker, tree credit."""
from .advantages import (
    ADVANTAGE_ESTIMATORS,
    GroupStats,
    batch_std,
    combine_rewards,
    get_advantage_estimator,
    group_advantages,
    group_ids,
    group_stats,
    pairwise_win_rates,
    preference_matrix,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
)
from .importance import IS_LEVELS, IS_MODES, mismatch_weights
from .losses import (
    AGGREGATION_WEIGHTS,
    KL_FORMS,
    POLICY_LOSSES,
    aggregate,
    chunk_log_ratios,
    chunk_ratios,
    clipped_surrogate,
    clipped_surrogate_from_log_ratio,
    kl_estimator,
    kl_gaussian_mean,
    nft_loss,
    nft_optimality,
    ratio_norm_log_ratio,
)
from .ratio_losses import cispo_surrogate, gmpo_surrogate
from .stat_tracker import PerPromptStatTracker
from .tree_credit import backprop_advantages, depth_advantages, fuse_leaf_values

__all__ = [
    "ADVANTAGE_ESTIMATORS", "GroupStats", "batch_std", "combine_rewards", "get_advantage_estimator",
    "group_advantages", "group_ids", "group_stats", "pairwise_win_rates", "preference_matrix",
    "reinforce_pp_baseline_advantages", "rloo_advantages", "mismatch_weights", "IS_LEVELS", "IS_MODES",
    "cispo_surrogate", "gmpo_surrogate",
    "AGGREGATION_WEIGHTS", "KL_FORMS", "POLICY_LOSSES",
    "aggregate", "chunk_log_ratios", "chunk_ratios", "clipped_surrogate",
    "clipped_surrogate_from_log_ratio", "kl_estimator", "kl_gaussian_mean", "nft_loss", "nft_optimality",
    "ratio_norm_log_ratio",
    "PerPromptStatTracker",
    "backprop_advantages", "depth_advantages", "fuse_leaf_values",
]
