"""The typed training config: YAML in, validated dataclasses out, before any model is loaded.

Every section is a dataclass; a YAML key that is not a field, or a value of the wrong type, is an error that
names the dotted key. ``--set a.b=value`` overrides parse ``value`` as YAML. Kernel / schedule / plan are
``{name: ..., <params>}`` mappings checked against the registries in ``flowrl.sampling`` (their params are the
dataclass fields of the chosen class), so a recipe can name any of them without new config code.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad config value; the message names the dotted key."""


# keys an earlier flowrl read, with what replaced them
RENAMED = {"advantages.std": "advantages.estimator (std group -> grpo, global -> flow_grpo, none -> dr_grpo)"}


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    iterations: int = 10
    mixed_precision: str = "no"          # accelerate: no | fp16 | bf16
    save_every: int = 0                  # iterations between checkpoints; 0: only at the end (and on a stop signal)
    keep_checkpoints: int = 2            # newest complete checkpoints kept, plus the best by eval score; 0: all
    log_samples_every: int = 0           # iterations between training sample grids; 0: never
    progress: bool = True
    dump_advantages: bool = False        # write advantages.jsonl (per sample: prompt id, rewards, advantage)
    report_to: str | list[str] = "tensorboard"  # accelerate trackers: tensorboard, wandb, mlflow, ..., all, none
    collective_timeout: float = 600.0    # seconds a collective (all-gather, barrier, DDP all-reduce) may wait for
                                         # the other processes before the run fails: a lost or hung process ends
                                         # the run instead of hanging it (torch.distributed's process group timeout)

    def __post_init__(self):  # checked here, so both trainers' configs (which share this section) have it
        if not self.collective_timeout > 0:
            raise ConfigError(f"run.collective_timeout: must be > 0 seconds, got {self.collective_timeout!r}")


@dataclass
class ModelConfig:
    path: str = "tiny:sd3"               # a diffusers folder, a hub id, toy:shapes (shipped) or tiny:<family>
    dtype: str = "float32"               # weights of the frozen parts; trained weights stay float32
    max_sequence_length: int = 256       # T5 tokens (SD3 / FLUX)
    height: int | None = None            # None: the pipeline's default resolution
    width: int | None = None
    true_cfg_scale: float = 1.0          # FLUX / Kontext only: true CFG with a negative prompt
    auto_resize: bool = True             # Kontext: input images resized to its preferred resolutions
    num_frames: int = 81                 # Wan: frames per clip (4k + 1)
    image_area: int | None = None        # Qwen-Image-Edit: input images sized to this many pixels (None: 1024 ** 2)


@dataclass
class FinetuneConfig:
    mode: str = "lora"                   # lora | full
    lora_rank: int = 32
    lora_alpha: float | None = None      # None: = rank
    lora_target_modules: list[str] | None = None  # None: the family's default (flowrl.models.families)
    lora_dropout: float = 0.0
    gradient_checkpointing: bool = False
    ema_decay: float = 0.0               # EMA of the trained weights (0: off); used for eval and the output
    merged_sampling: bool = False        # LoRA + nft: rollouts, v_old and evals through the LoRA merged into
                                         # the base weights (no gradient there; one matmul per layer)


@dataclass
class SamplingConfig:
    num_steps: int = 10
    guidance_scale: float = 4.5
    negative_prompt: str = ""
    kernel: dict = field(default_factory=lambda: {"name": "flow_sde", "a": 0.7})
    schedule: dict = field(default_factory=lambda: {"name": "constant"})
    plan: dict = field(default_factory=lambda: {"name": "flat", "G": 8})
    ode_solver: str = "euler"
    post_window: dict | None = None      # MixGRPO-Flash: after the last SDE step, the rest re-discretised and solved
                                         # by DPM-Solver++ ({ratio: 0.4, order: 2, solver_type: midpoint | heun,
                                         # history: window | restart}; flowrl.sampling.solvers.PostWindow)
    max_batch: int | None = None         # cap on states per model call during rollout (memory)


@dataclass
class DataConfig:
    train_prompts: str = ""              # .txt (one prompt a line) or .jsonl ({"prompt": ..., ...metadata})
    eval_prompts: str | None = None
    prompts_per_iteration: int = 8       # global; every process takes whole prompt groups
    balance_key: str | None = None       # a metadata field (e.g. "tag") whose values are sampled equally often
    balance_weights: dict = field(default_factory=dict)  # with balance_key: each value's share relative to the
                                         # others (unnamed: 1); {position: 2.0} draws position prompts twice as often


@dataclass
class RewardConfig:
    components: Any = "brightness:1.0"   # "name:w,name:w", a list, or {name: weight}
    kwargs: dict = field(default_factory=dict)  # per reward name: constructor arguments
    combine: str = "sum_then_normalize"  # or normalize_then_sum
    modules: list[str] = field(default_factory=list)  # Python modules imported first (they register rewards)
    retries: int = 2                     # retries of a reward call that raises or times out, then the run fails
    retry_backoff: float = 2.0           # seconds before the first retry, doubled for each further one
    timeout: float | None = None         # seconds a reward call may take (None: no limit)


@dataclass
class AdvantageConfig:
    estimator: str = "flow_grpo"         # flowrl.core.ADVANTAGE_ESTIMATORS: flow_grpo (per-prompt mean, std of the
                                         # whole batch) | grpo (per-group std) | dr_grpo (no std)
    credit: str | dict = "broadcast"     # per-sample advantages -> trained steps (flowrl.train.credit), a name or
                                         # {name: ..., <params>}: broadcast (the one sample below an edge: chains,
                                         # TempFlow's branches) | depth (BranchGRPO: {fusion: mean | path, beta})
                                         # | backprop (TreeGRPO: {beta})
    group: str = "prompt"                # samples compared in one advantage group: prompt | step (prompt and the
                                         # sample's branching step) | seed_step (prompt, tree and branching step:
                                         # TempFlow's seed grouping); step forms need one stochastic step per sample
    eps: float = 1e-4
    clip: float | None = 5.0
    per_prompt_tracker: bool = False     # Flow-GRPO's history-based per-prompt stats


@dataclass
class TrainingConfig:
    objective: str = "grpo"              # flowrl.train.objectives.OBJECTIVES: grpo (a policy loss on SDE step
                                         # log-probs: the Flow-GRPO family) | nft (DiffusionNFT, no log-probs)
    policy_loss: str = "clip"            # grpo: flowrl.core.POLICY_LOSSES: clip (PPO clip) | ratio_norm (GRPO-Guard)
    kl: str | None = None                # with kl_beta > 0, flowrl.core.KL_FORMS: gaussian | flow_grpo | k1 | k2 |
                                         # k3 (None: the objective's own: gaussian for grpo, velocity for nft)
    aggregation: str = "token-mean"      # flowrl.core.AGGREGATION_WEIGHTS: token-mean | seq-mean-token-mean |
                                         # seq-mean-token-sum-norm (a trajectory's steps are its tokens)
    step_weights: str = "uniform"        # grpo: uniform | inverse_dt (GRPO-Guard: loss x 1 / h_k) | noise_aware
                                         # (TempFlow: x s_k, mean 1 over the trained steps)
    chunks: dict | None = None           # grpo: chunk-level ratio (GCPO): {name: fixed, sizes: [2, 3, 4, 7]} |
                                         # {name: uniform, size: 4} | {name: adaptive, max_size: 4}; None: per step
    chunk_weighted: bool = False         # chunks: draw the timestep_fraction of chunks weighted by their mean
                                         # relative L1 change (GCPO's weighted sampling), not uniformly
    prune: dict | None = None            # grpo on trees, BranchGRPO's pruning of the trained edges (rollout and
                                         # rewards untouched): {width: {mode: parent_top | extreme, ratio: 0.5},
                                         # depth: {depths: [..], interval: 0, stop: null}, until: 1.0}
                                         # (flowrl.train.pruning)
    keep_extremes: int = 0               # grpo: per prompt group train only the k/2 best and k/2 worst samples by
                                         # advantage (DanceGRPO's best-of-N); 0: every sample
    cfg_detach_uncond: bool = False      # grpo under CFG: no gradient through the unconditional branch of the
                                         # re-scored velocity (flow_grpo's training forward)
    drop_zero_advantage: bool = False    # grpo: samples whose advantage is exactly 0 leave the loss and its
                                         # denominator (flow_grpo); they are still computed, see units.py
    lr: float = 3e-4
    weight_decay: float = 1e-4
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    warmup_iterations: int = 0
    lr_schedule: str = "constant"        # after warm-up: constant | cosine | linear (to 0 at run.iterations; diffusers'
                                         # get_scheduler, counted in optimizer steps)
    inner_epochs: int = 1
    updates_per_epoch: int = 1           # optimizer steps per pass over the iteration's units (flow_grpo: 2)
    micro_batch_size: int = 8            # training units (denoising steps) per forward/backward per process
    clip_eps_low: float = 1e-4           # for mean-reduced log-probs
    clip_eps_high: float | None = None   # None: = clip_eps_low
    kl_beta: float = 0.0                 # KL to the base weights (adapter off): closed-form Gaussian for grpo,
                                         # squared guided-velocity difference for nft
    kl_old_beta: float = 0.0             # grpo: + beta 1/2 (log pi - log pi_old)^2, a pull toward the rollout's policy
                                         # (MixGRPO's kl_coeff; 0 in its scripts), no extra forward pass
    rerange: str = "random"              # order of the units before they are cut into updates: random (a seeded
                                         # shuffle) | balance (positive and negative advantages alternate, zero ones
                                         # last: MixGRPO's advantage_rerange_strategy balance)
    timestep_fraction: float = 1.0       # fraction of each trajectory's stochastic steps (or chunks) trained,
                                         # ceil(fraction * n) drawn per trajectory (DanceGRPO, GCPO)
    log_prob_reduction: str = "mean"
    nft_beta: float = 1.0                # nft: step of the implicit positive / negative policies v+- (losses.nft_loss)
    nft_timesteps: int = 2               # nft: forward-process draws (t, noise) per sample per iteration
    nft_adaptive_weight: bool = True     # nft: x0-space error over its detached mean (the paper's weighting)
    nft_guided: bool = False             # nft: train the CFG-guided velocity the sampler uses (default: the
                                         # conditional one, the paper's CFG-free training; nft.velocity says more)
    nft_eta_max: float = 0.0             # nft: sampling policy soft-updated after iteration i, theta_old <- eta_i
    nft_eta_rate: float = 0.001          # theta_old + (1 - eta_i) theta, eta_i = min(rate * i, max) (DiffusionNFT
                                         # uses 0.001, 0.5); 0: sample with the current weights (nft.SoftPolicy)
    max_consecutive_skips: int = 3       # iterations in a row skipped for a non-finite reward / advantage / loss /
                                         # gradient before the run stops (with a checkpoint of the last good state)


@dataclass
class EvalConfig:
    every: int = 0                       # iterations between evaluations (ODE sampler, eval prompts); 0: never
    num_prompts: int = 8
    num_steps: int | None = None         # None: sampling.num_steps
    guidance_scale: float | None = None  # None: sampling.guidance_scale (a policy trained CFG-free may sample
                                         # best with some guidance); also the before/after grid's
    seed: int = 1234


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)
    advantages: AdvantageConfig = field(default_factory=AdvantageConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ------------------------------------------------------------------------------------------ typed building


def _check_type(value, tp, key: str):
    """``value`` converted to ``tp`` (int -> float widening only), or ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_type(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads "1e-4" (no dot) as a string: a YAML 1.1 quirk, not a typo
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: must be finite, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads no / yes / off / on as booleans
            raise ConfigError(f"{key}: expected a string, got {value!r} (quote it: '{key}=\"no\"')")
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")


def _name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def build_dataclass(cls, data: dict | None, prefix: str = ""):
    """Instantiate dataclass ``cls`` from a mapping, strictly: unknown keys and wrong types name the key."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            if f"{prefix}{key}" in RENAMED:
                raise ConfigError(f"unknown config key {prefix}{key}: replaced by {RENAMED[prefix + key]}")
            close = difflib.get_close_matches(str(key).lower(), sorted(names), n=1, cutoff=0.75)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {prefix}{key}{hint}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = build_dataclass(tp, data[f.name], f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _check_type(data[f.name], tp, f"{prefix}{f.name}")
    return cls(**kwargs)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``["a.b=value", ...]`` applied to a nested mapping; values are parsed as YAML (``lr=1e-4``, ``x=[1,2]``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: cannot parse {raw!r}: {e}") from None
    return data


def read_recipe(path: str | Path | None, overrides: list[str] | None = None) -> dict:
    """A YAML recipe's mapping with ``--set`` overrides applied (both trainers' loaders start here)."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
        relative_to(data, path.resolve().parent)
    return apply_overrides(data, overrides or [])


# Input paths a recipe names, resolved against the recipe's folder so it runs from any working directory. Values
# given by --set are the user's own typing and stay relative to the working directory; run.output_dir is where
# the user wants the run, so it does too. Names (prompts:<name>, toy:shapes, tiny:sd3) and hub ids are kept.
RECIPE_PATHS = (("data", "train_prompts"), ("data", "eval_prompts"), ("model", "path"))


def relative_to(data: dict, folder: Path) -> None:
    for section, key in RECIPE_PATHS:
        value = data.get(section, {}).get(key) if isinstance(data.get(section), dict) else None
        if not isinstance(value, str) or not value or ":" in value.split("/")[0] or Path(value).is_absolute():
            continue
        candidate = folder / value
        # a model value may be a hub id (org/name): only a path that exists beside the recipe is taken as one
        if key != "path" or candidate.exists():
            data[section][key] = str(candidate)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML recipe, apply overrides, build and validate the Config (no model is touched)."""
    data = read_recipe(path, overrides)
    kind = data.pop("trainer", "image")
    if kind != "image":
        raise ConfigError(f"trainer: {kind!r} recipes are read by flowrl.llm.config.load_llm_config (flowrl train "
                          "picks the loader by this key); this loader reads image recipes")
    cfg = build_dataclass(Config, data)
    from flowrl.train.validate import validate  # noqa: PLC0415 (validation needs the registries)

    validate(cfg)
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
