"""Semantic checks of a built LLMConfig before any model loads: one ConfigError naming the key."""
from __future__ import annotations

from flowrl.core import ADVANTAGE_ESTIMATORS, AGGREGATION_WEIGHTS, IS_LEVELS, IS_MODES, POLICY_LOSSES
from flowrl.train.config import ConfigError
from flowrl.train.validate import _get, check_data_and_rewards, check_ranges, trackers

CHOICES = {
    "trainer": ("llm",),
    "run.mixed_precision": ("no", "fp16", "bf16"),
    "model.dtype": ("float32", "float16", "bfloat16"),
    "finetune.mode": ("lora", "full"),
    "generation.backend": ("hf",),  # vLLM is not in flowrl yet (generation.mismatch is its correction)
    "rewards.combine": ("sum_then_normalize", "normalize_then_sum"),
    "training.kl": ("k1", "k2", "k3"),
    "training.lr_schedule": ("constant", "cosine", "linear"),
}
POSITIVE = ("run.iterations", "model.max_prompt_tokens", "model.max_completion_tokens", "finetune.lora_rank",
            "generation.temperature", "data.prompts_per_iteration", "data.max_draws", "training.lr",
            "training.inner_epochs", "training.updates_per_epoch", "training.micro_batch_size",
            "training.max_consecutive_skips")
NON_NEGATIVE = ("run.save_every", "run.keep_checkpoints", "generation.top_k", "advantages.eps", "training.clip_eps_low",
                "training.kl_beta", "training.weight_decay", "training.max_grad_norm", "training.warmup_iterations",
                "eval.every", "eval.num_prompts", "eval.pass_k", "rewards.retries", "rewards.retry_backoff")
MISMATCH_KEYS = {"level", "mode", "clip_max", "clip_min"}


def validate(cfg) -> None:
    check_ranges(cfg, CHOICES, POSITIVE, NON_NEGATIVE)
    trackers(cfg.run.report_to)
    g, t = cfg.generation, cfg.training
    if g.G < 2:
        raise ConfigError(f"generation.G: a group needs at least 2 completions to compare, got {g.G}")
    if not 0 < g.top_p <= 1:
        raise ConfigError(f"generation.top_p: must be in (0, 1], got {g.top_p}")
    if g.max_batch is not None and g.max_batch <= 0:
        raise ConfigError(f"generation.max_batch: must be > 0 or null, got {g.max_batch}")
    if g.mismatch is not None:
        stray = sorted(set(g.mismatch) - MISMATCH_KEYS)
        if stray:
            raise ConfigError(f"generation.mismatch: unknown key(s) {stray}; known: {sorted(MISMATCH_KEYS)}")
        if g.mismatch.get("level", "sequence") not in IS_LEVELS:
            raise ConfigError(f"generation.mismatch.level: {g.mismatch['level']!r} is not one of {list(IS_LEVELS)}")
        if g.mismatch.get("mode", "mask") not in IS_MODES:
            raise ConfigError(f"generation.mismatch.mode: {g.mismatch['mode']!r} is not one of {list(IS_MODES)}")
    for key, registry in (("advantages.estimator", ADVANTAGE_ESTIMATORS), ("training.policy_loss", POLICY_LOSSES),
                          ("training.aggregation", AGGREGATION_WEIGHTS)):
        if _get(cfg, key) not in registry:
            raise ConfigError(f"{key}: {_get(cfg, key)!r} is not one of {sorted(registry)}")
    if POLICY_LOSSES[t.policy_loss].requires:
        raise ConfigError(f"training.policy_loss: {t.policy_loss} needs Gaussian kernel means "
                          f"({', '.join(POLICY_LOSSES[t.policy_loss].requires)}), which tokens do not have")
    if t.norm_len is not None and t.norm_len <= 0:
        raise ConfigError(f"training.norm_len: must be > 0 or null, got {t.norm_len}")
    if t.clip_eps_high is not None and t.clip_eps_high < 0:
        raise ConfigError(f"training.clip_eps_high: must be >= 0 or null, got {t.clip_eps_high}")
    if len(t.adam_betas) != 2:
        raise ConfigError("training.adam_betas: expected two numbers")
    if t.kl_in_reward and t.kl_beta == 0:
        raise ConfigError("training.kl_in_reward: needs training.kl_beta > 0")
    if cfg.eval.every and not cfg.data.eval_prompts:
        raise ConfigError("data.eval_prompts: eval.every is set but no eval prompt file is given")
    if cfg.rewards.timeout is not None and cfg.rewards.timeout <= 0:
        raise ConfigError(f"rewards.timeout: must be > 0 seconds or null, got {cfg.rewards.timeout}")
    check_data_and_rewards(cfg)
    import rewards  # noqa: PLC0415

    for name in rewards.parse_reward_spec(cfg.rewards.components):
        cls = rewards.REWARDS.get(name)
        if cls is None:
            raise ConfigError(f"rewards.components: unknown reward {name!r}; known: {sorted(rewards.REWARDS)}")
        if cls.modality != "text":
            raise ConfigError(f"rewards.components: {name} scores images; a language model's rewards score "
                              "completions (rewards.text)")
