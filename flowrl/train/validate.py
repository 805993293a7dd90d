"""Semantic checks of a built Config: choices, ranges, files, registries. Runs before any model is loaded and
raises one ConfigError naming the key."""
from __future__ import annotations

import importlib

import torch

from flowrl.models.families import FAMILIES
from flowrl.sampling.plans import Flat
from flowrl.sampling.rollout import check_plan
from flowrl.train import builders
from flowrl.train.config import Config, ConfigError

CHOICES = {
    "run.mixed_precision": ("no", "fp16", "bf16"),
    "model.dtype": ("float32", "float16", "bfloat16"),
    "finetune.mode": ("lora", "full"),
    "sampling.ode_solver": ("euler", "dpm2m"),
    "rewards.combine": ("sum_then_normalize", "normalize_then_sum"),
    "training.log_prob_reduction": ("mean", "sum"),
    "training.lr_schedule": ("constant", "cosine", "linear"),
    "training.rerange": ("random", "balance"),
}
POSITIVE = ("run.iterations", "sampling.num_steps", "data.prompts_per_iteration", "training.lr",
            "training.inner_epochs", "training.updates_per_epoch", "training.micro_batch_size",
            "training.clip_eps_low", "finetune.lora_rank", "training.max_consecutive_skips",
            "eval.num_prompts", "training.nft_beta", "training.nft_timesteps")
NON_NEGATIVE = ("run.save_every", "run.log_samples_every", "eval.every", "training.kl_beta", "training.kl_old_beta",
                "training.weight_decay", "training.max_grad_norm", "training.warmup_iterations",
                "sampling.guidance_scale", "advantages.eps", "run.keep_checkpoints", "rewards.retries",
                "rewards.retry_backoff", "training.nft_eta_rate")


def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def import_reward_modules(modules: list[str]) -> None:
    """Import the modules named in rewards.modules, so the rewards they register can be named in a recipe."""
    for i, name in enumerate(modules):
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"rewards.modules[{i}]: cannot import {name!r}: {e}") from None


def check_ranges(cfg, choices: dict, positive, non_negative) -> None:
    """Each key's value among its choices, > 0 or >= 0; one ConfigError naming the first that is not."""
    for key, allowed in choices.items():
        if _get(cfg, key) not in allowed:
            raise ConfigError(f"{key}: {_get(cfg, key)!r} is not one of {list(allowed)}")
    for key in positive:
        if _get(cfg, key) <= 0:
            raise ConfigError(f"{key}: must be > 0, got {_get(cfg, key)}")
    for key in non_negative:
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key}: must be >= 0, got {_get(cfg, key)}")


def trackers(report_to) -> list[str]:
    """run.report_to as accelerate's ``log_with``: named trackers, each installed ("all": every installed one,
    "none": no tracker). Checked before anything runs: accelerate itself would only warn and log nothing."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    names = [report_to] if isinstance(report_to, str) else report_to
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"run.report_to: a tracker name or a list of them, got {report_to!r}")
    if names == ["none"]:
        return []
    known = [t.value for t in LoggerType]
    for n in names:
        if n not in known:
            raise ConfigError(f"run.report_to: unknown tracker {n!r}; accelerate knows {known} (or none)")
    available = [str(t) for t in get_available_trackers()]
    missing = [n for n in names if n != "all" and n not in available]
    if missing:
        raise ConfigError(f"run.report_to: {missing} not installed here (installed: {available}); pip install it "
                          "or drop it")
    return names


def validate(cfg: Config) -> None:
    check_ranges(cfg, CHOICES, POSITIVE, NON_NEGATIVE)
    trackers(cfg.run.report_to)
    if not 0 < cfg.training.timestep_fraction <= 1:
        raise ConfigError(f"training.timestep_fraction: must be in (0, 1], got {cfg.training.timestep_fraction}")
    if not 0 <= cfg.finetune.ema_decay < 1:
        raise ConfigError(f"finetune.ema_decay: must be in [0, 1), got {cfg.finetune.ema_decay}")
    if len(cfg.training.adam_betas) != 2:
        raise ConfigError("training.adam_betas: expected two numbers")
    if cfg.eval.guidance_scale is not None and cfg.eval.guidance_scale < 0:
        raise ConfigError(f"eval.guidance_scale: must be >= 0 or null, got {cfg.eval.guidance_scale}")
    if cfg.rewards.timeout is not None and cfg.rewards.timeout <= 0:
        raise ConfigError(f"rewards.timeout: must be > 0 seconds or null, got {cfg.rewards.timeout}")
    from flowrl.core import ADVANTAGE_ESTIMATORS, AGGREGATION_WEIGHTS  # noqa: PLC0415
    from flowrl.train.credit import credit_spec  # noqa: PLC0415
    from flowrl.train.grouping import GROUPINGS  # noqa: PLC0415
    from flowrl.train.objectives import OBJECTIVES  # noqa: PLC0415
    from flowrl.train.scoring import TRACKER_STD  # noqa: PLC0415

    credit_spec(cfg.advantages.credit)
    if cfg.advantages.group not in GROUPINGS:
        raise ConfigError(f"advantages.group: {cfg.advantages.group!r} is not one of {list(GROUPINGS)}")
    if cfg.advantages.group != "prompt" and cfg.advantages.per_prompt_tracker:
        raise ConfigError("advantages.per_prompt_tracker: keeps one history per prompt; it cannot serve "
                          f"advantages.group {cfg.advantages.group}")
    for key, registry in (("training.objective", OBJECTIVES), ("advantages.estimator", ADVANTAGE_ESTIMATORS),
                          ("training.aggregation", AGGREGATION_WEIGHTS)):
        if _get(cfg, key) not in registry:
            raise ConfigError(f"{key}: {_get(cfg, key)!r} is not one of {sorted(registry)}")
    if cfg.advantages.per_prompt_tracker:
        if cfg.advantages.estimator not in TRACKER_STD:
            raise ConfigError(f"advantages.estimator: {cfg.advantages.estimator} has no per-prompt tracker form; use "
                              f"one of {sorted(TRACKER_STD)}")
        if cfg.rewards.combine != "sum_then_normalize":
            raise ConfigError("rewards.combine: the per-prompt tracker normalises the weighted sum; "
                              "use sum_then_normalize")

    # sampler pieces build and fit the step count; the objective refuses what it cannot train
    kernel = builders.make_kernel(cfg.sampling.kernel)
    schedule = builders.make_schedule(cfg.sampling.schedule, cfg.run.seed)
    plan = builders.make_plan(cfg.sampling.plan)
    try:
        scales = schedule.noise_scales(cfg.sampling.num_steps, 0)
    except ValueError as e:
        raise ConfigError(f"sampling.schedule: {e}") from None
    if plan.owns_noise and cfg.sampling.schedule.get("name") != "constant":
        raise ConfigError(f"sampling.schedule: {cfg.sampling.plan['name']} decides which steps are stochastic; the "
                          "schedule only gives their noise scale: use {name: constant, scale: ...}")
    try:
        check_plan(plan, scales, cfg.sampling.num_steps, 0)
    except ValueError as e:
        raise ConfigError(f"sampling.plan: {e}") from None
    post = builders.make_post_window(cfg.sampling.post_window)
    if post is not None:
        if cfg.sampling.ode_solver != "euler":
            raise ConfigError("sampling.post_window: the tail has its own DPM-Solver++ and the steps before it stay "
                              f"Euler; sampling.ode_solver must be euler, got {cfg.sampling.ode_solver!r}")
        if plan.owns_noise:
            raise ConfigError(f"sampling.post_window: {cfg.sampling.plan['name']} decides its stochastic steps "
                              "itself; the tail follows a schedule's window (flat or split_at plans)")
        if not bool((scales > 0).any()):
            raise ConfigError("sampling.post_window: the schedule makes no step stochastic, so there is no window")
    if cfg.sampling.ode_solver == "dpm2m" and not plan.homogeneous:
        raise ConfigError(f"sampling.ode_solver: dpm2m keeps one multistep memory per chain; "
                          f"{cfg.sampling.plan['name']} mixes stochastic and ODE children in a step: use euler")

    family = builders.model_family(cfg.model.path)
    if not 0 <= cfg.training.nft_eta_max < 1:
        raise ConfigError(f"training.nft_eta_max: the sampling policy's soft-update weight must be in [0, 1), got "
                          f"{cfg.training.nft_eta_max!r}")
    if cfg.finetune.merged_sampling and cfg.finetune.mode != "lora":
        raise ConfigError("finetune.merged_sampling: needs finetune.mode lora (it merges the adapter)")
    OBJECTIVES[cfg.training.objective].check(cfg, kernel, scales, plan)
    check_group_size(cfg, plan, scales)
    model_kernel = FAMILIES[family].kernel if family in FAMILIES else None
    if post is not None and model_kernel == "ddim":
        raise ConfigError(f"sampling.post_window: re-discretises a flow model's grid; {family} samples with DDIM")
    if model_kernel is not None and model_kernel != kernel.family:
        raise ConfigError(f"sampling.kernel: {cfg.sampling.kernel['name']} does not fit a {family} model "
                          f"({'ddim' if model_kernel == 'ddim' else 'a flow kernel: flow_sde, flow_sde_const, cps'})")

    check_data_and_rewards(cfg)
    if family in FAMILIES and FAMILIES[family].task == "edit":  # every row needs its input image, found now
        for key in ("data.train_prompts", "data.eval_prompts"):
            path = getattr(cfg.data, key.split(".")[1])
            rows = builders.load_prompts(path, key).metadata if path else []
            missing = [i for i, m in enumerate(rows) if "image" not in m]
            if missing:
                raise ConfigError(f"{key}: {family} edits an input image: every row needs an 'image' field "
                                  f"(a path relative to the prompt file); rows {missing[:5]} have none")


# Why each registered estimator (flowrl.core.ADVANTAGE_ESTIMATORS) gives 0 to every sample of a group of one. None
# of them has a baseline outside the group: flow_grpo takes the batch's std but the group's mean, and
# reinforce_pp_baseline whitens over the batch only after subtracting the group mean. An estimator registered
# later is judged by what it does (vanishes_on_singletons), so one with a batch baseline passes.
SINGLETON_REASONS = {
    "grpo": "the group mean is the sample itself",
    "flow_grpo": "the group mean is the sample itself; only the std is the batch's",
    "dr_grpo": "the group mean is the sample itself",
    "rloo": "the leave-one-out baseline has no other sample",
    "reinforce_pp_baseline": "the group mean is subtracted before the batch whitening",
}
# per plan, how its groups get a second sample
MORE_SAMPLES = {
    "flat": "G >= 2",
    "split_at": "a split step inside the grid or trees >= 2",
    "trunk_branches": "K >= 2 or seeds >= 2",
    "trunk_branches/seed_step": "K >= 2 or advantages.group step (it pools the prompt's seeds)",
}


def samples_per_group(plan, group: str, num_steps: int) -> int:
    """Samples in one advantage group (every group of a plan holds as many; leaf counts do not change with the
    iteration). ``prompt``: the prompt's trees times each tree's leaves. ``step`` / ``seed_step`` (trunk_branches
    only, flowrl.train.grouping): the K branches a seed sends off at one step, over the prompt's seeds (step) or
    one seed (seed_step)."""
    if group == "prompt":
        return plan.trees_per_prompt * plan.num_leaves(num_steps)
    return plan.K * (plan.trees_per_prompt if group == "step" else 1)


def one_trajectory(plan, scales: torch.Tensor) -> bool:
    """A flat plan whose G chains start from one shared noise and take no stochastic step: every chain of a prompt
    is the same trajectory, so a group holds one distinct sample (reachable with objective nft, which samples by
    ODE; grpo refuses a schedule without a stochastic step). Every shipped schedule that gives no noise at
    iteration 0 gives none at any iteration (a zero scale, or an all-zero table)."""
    return isinstance(plan, Flat) and plan.shared_noise and not bool((scales > 0).any())


def vanishes_on_singletons(estimator: str, combine: str, eps: float, clip: float | None) -> bool:
    """Whether ``estimator`` gives every advantage exactly 0 when each group holds one sample: run on distinct
    rewards in groups of one through the combine_rewards call the trainer makes (flowrl.train.scoring)."""
    from flowrl.core import combine_rewards  # noqa: PLC0415

    r = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    adv = combine_rewards({"r": r}, {"r": 1.0}, torch.arange(3), mode=combine, estimator=estimator, eps=eps,
                          clip=clip)
    return bool((adv == 0).all())


def check_group_size(cfg, plan, scales: torch.Tensor) -> None:
    """Refuse a plan whose advantage groups hold one (distinct) sample under an estimator that then gives every
    advantage 0: the run would train on zero advantages (a zero policy loss for grpo; for nft r = 1/2 everywhere,
    whose loss only pulls v back to v_old) and say nothing. Accepted: the per-prompt tracker
    (advantages.per_prompt_tracker), whose history across iterations is a baseline outside the batch (it is never
    cleared), and any estimator with a batch baseline. A grouping the plan cannot serve is refused elsewhere."""
    from flowrl.core import ADVANTAGE_ESTIMATORS  # noqa: PLC0415
    from flowrl.train import grouping  # noqa: PLC0415
    from flowrl.train.scoring import TRACKER_STD  # noqa: PLC0415

    a, name = cfg.advantages, cfg.sampling.plan["name"]
    if a.per_prompt_tracker or grouping.check(a.group, plan):
        return
    shared = one_trajectory(plan, scales)
    if not shared and samples_per_group(plan, a.group, cfg.sampling.num_steps) > 1:
        return
    if not vanishes_on_singletons(a.estimator, cfg.rewards.combine, a.eps, a.clip):
        return
    ways = ["shared_noise: false or a schedule with a stochastic step" if shared
            else MORE_SAMPLES.get(f"{name}/{a.group}", MORE_SAMPLES.get(name, "more samples per group"))]
    ways += [f"advantages.estimator {e} (a batch baseline)" for e in sorted(ADVANTAGE_ESTIMATORS)
             if not vanishes_on_singletons(e, cfg.rewards.combine, a.eps, a.clip)]
    if a.estimator in TRACKER_STD and a.group == "prompt":
        ways.append("advantages.per_prompt_tracker: true (each prompt's reward history is its baseline)")
    reason = ("copies' rewards agree: the group has no spread" if shared
              else SINGLETON_REASONS.get(a.estimator, "it compares a sample with its own group only"))
    what = ("with shared_noise and no stochastic step makes G copies of one sample per prompt" if shared
            else f"makes groups of 1 sample (advantages.group {a.group})")
    raise ConfigError(f"sampling.plan: {name} {what}, which give every advantage 0 under "
                      f"advantages.estimator={a.estimator} ({reason}); use {' or '.join(ways)}")


def check_data_and_rewards(cfg) -> dict[str, float]:
    """The data and rewards sections, which both trainers share: prompt files, balance keys, reward names and
    their kwargs. Returns the reward weights."""
    train_set = builders.load_prompts(cfg.data.train_prompts, "data.train_prompts")
    if cfg.data.balance_weights and not cfg.data.balance_key:
        raise ConfigError("data.balance_weights: needs data.balance_key (the field whose values the weights name)")
    if cfg.data.balance_key:
        builders.balance_weights(train_set.metadata, cfg.data.balance_key, cfg.data.balance_weights)
    if cfg.data.eval_prompts:
        builders.load_prompts(cfg.data.eval_prompts, "data.eval_prompts")
    elif cfg.eval.every:
        raise ConfigError("data.eval_prompts: eval.every is set but no eval prompt file is given")

    import rewards  # noqa: PLC0415

    import_reward_modules(cfg.rewards.modules)
    try:
        weights = rewards.parse_reward_spec(cfg.rewards.components)
    except ValueError as e:
        raise ConfigError(f"rewards.components: {e}") from None
    for name in cfg.rewards.kwargs:
        if name not in weights:
            raise ConfigError(f"rewards.kwargs.{name}: not one of the components {sorted(weights)}")
    return weights
