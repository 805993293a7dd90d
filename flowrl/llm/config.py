"""The language-model recipe: YAML with ``trainer: llm`` in, validated dataclasses out, before any model loads.

The run, reward and data sections are the image trainer's (same keys, same meaning); model, finetune,
generation, advantages, training and eval are the language model's. ``training.algorithm`` names a published
method whose defaults (flowrl.llm.algorithms) fill every key the recipe leaves out; a key the recipe sets wins.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from flowrl.train.config import DataConfig, RewardConfig, RunConfig, build_dataclass, read_recipe


@dataclass
class LMModelConfig:
    path: str = "toy:arith"              # a transformers folder, a hub id, or toy:arith (the shipped tiny LM)
    dtype: str = "float32"               # weights of the frozen parts; trained weights stay float32
    max_prompt_tokens: int = 64          # a longer prompt is an error before generation starts
    max_completion_tokens: int = 16      # generation stops here (the sample is then "truncated")
    chat_template: bool = False          # wrap each prompt as a user message with the tokenizer's chat template


@dataclass
class LMFinetuneConfig:
    mode: str = "lora"                   # lora (peft) | full
    lora_rank: int = 16
    lora_alpha: float | None = None      # None: = rank
    lora_target_modules: list[str] | None = None  # None: every linear layer but the output head (peft all-linear)
    lora_dropout: float = 0.0
    gradient_checkpointing: bool = False


@dataclass
class GenerationConfig:
    backend: str = "hf"                  # hf (transformers generate); vLLM is not in flowrl yet
    G: int = 8                           # completions per prompt: the group
    temperature: float = 1.0             # the policy trained is softmax(logits / temperature)
    top_p: float = 1.0
    top_k: int = 0                       # 0: off
    max_batch: int | None = None         # sequences per generate call (memory); None: all of a process's
    mismatch: dict | None = None         # rollout/training log-prob mismatch weights (flowrl.core.mismatch_weights):
                                         # {level: token | sequence, mode: truncate | mask, clip_max: 3.0,
                                         # clip_min: null}; None: none. With hf it corrects top-k / top-p
                                         # truncation; a faster engine's log-probs would enter the same way


@dataclass
class LMDataConfig(DataConfig):
    dynamic_sampling: bool = False       # DAPO: groups whose rewards all agree are dropped and more prompts drawn
                                         # until prompts_per_iteration informative groups are in hand
    max_draws: int = 3                   # with dynamic_sampling: rollout rounds per iteration at most (the batch
                                         # is then trained short of full, as verl's max_num_gen_batches)


@dataclass
class LMAdvantageConfig:
    estimator: str = "grpo"              # flowrl.core.ADVANTAGE_ESTIMATORS: grpo | dr_grpo | rloo |
                                         # reinforce_pp_baseline | flow_grpo
    eps: float = 1e-4
    clip: float | None = None
    per_prompt_tracker: bool = False     # baselines from each prompt's reward history (grpo / flow_grpo only)


@dataclass
class LMTrainingConfig:
    algorithm: str | None = None         # flowrl.llm.algorithms: grpo | dr_grpo | dapo | gspo | gmpo | cispo | rloo
                                         # | reinforce_pp_baseline: that paper's defaults for the keys left out
    policy_loss: str = "clip"            # flowrl.core.POLICY_LOSSES: clip | gspo | gmpo | cispo
    aggregation: str = "seq-mean-token-mean"  # flowrl.core.AGGREGATION_WEIGHTS, global denominators
    norm_len: int | None = None          # seq-mean-token-sum-norm's constant; None: model.max_completion_tokens
    clip_eps_low: float = 0.2
    clip_eps_high: float | None = None   # None: = clip_eps_low (DAPO's clip-higher: 0.28)
    kl_beta: float = 0.0                 # KL to the reference (the base: LoRA off, or a frozen copy)
    kl: str = "k3"                       # flowrl.core.KL_FORMS estimator: k1 | k2 | k3
    kl_in_reward: bool = False           # the KL enters the reward (r - beta sum_t KL_t) instead of the loss
    mask_truncated: bool = False         # DAPO's overlong filtering: truncated samples leave the loss
    lr: float = 1e-5
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    warmup_iterations: int = 0
    lr_schedule: str = "constant"        # constant | cosine | linear (after warm-up, in optimizer steps)
    inner_epochs: int = 1                # passes over one iteration's samples (PPO epochs, trl num_iterations)
    updates_per_epoch: int = 1           # optimizer steps per pass (mini-batches)
    micro_batch_size: int = 16           # sequences per forward / backward per process
    max_consecutive_skips: int = 3       # iterations in a row skipped for non-finite values before the run stops


@dataclass
class LMEvalConfig:
    every: int = 0                       # iterations between held-out evaluations; 0: never
    num_prompts: int = 0                 # 0: every eval prompt
    pass_k: int = 0                      # also pass@k from k samples at generation.temperature; 0: greedy only
    metric: str | None = None            # the reward component whose score 1 means solved; None: the first
    seed: int = 1234


@dataclass
class LLMConfig:
    trainer: str = "llm"
    run: RunConfig = field(default_factory=RunConfig)
    model: LMModelConfig = field(default_factory=LMModelConfig)
    finetune: LMFinetuneConfig = field(default_factory=LMFinetuneConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    data: LMDataConfig = field(default_factory=LMDataConfig)
    rewards: RewardConfig = field(default_factory=lambda: RewardConfig(components="exact_answer:1.0"))
    advantages: LMAdvantageConfig = field(default_factory=LMAdvantageConfig)
    training: LMTrainingConfig = field(default_factory=LMTrainingConfig)
    eval: LMEvalConfig = field(default_factory=LMEvalConfig)


def build_llm_config(data: dict) -> LLMConfig:
    """Fill the named algorithm's defaults, build strictly, validate."""
    from flowrl.llm.algorithms import apply_algorithm  # noqa: PLC0415
    from flowrl.llm.validate import validate  # noqa: PLC0415

    cfg = build_dataclass(LLMConfig, apply_algorithm(data))
    validate(cfg)
    return cfg


def load_llm_config(path: str | Path | None, overrides: list[str] | None = None) -> LLMConfig:
    return build_llm_config(read_recipe(path, overrides))
