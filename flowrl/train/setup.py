"""Building what a run trains: the pipeline and its policy adapter, LoRA or full fine-tuning, the optimizer, the
learning-rate schedule and the EMA, placed on accelerate's device. Model-family knowledge comes from
flowrl.models.families; nothing here depends on the method."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from flowrl.models import DTYPES, adapter_options, family_of_pipeline, load_pipeline, policy_from_pipeline
from flowrl.train import finetune


@dataclass
class Model:
    pipe: Any
    family: str
    policy: Any
    model: Any                  # the (DDP-)wrapped trained module; the pipeline keeps the plain one for rollouts
    params: list
    optimizer: Any
    lr_scheduler: Any
    ema: Any                    # EMAModel or None
    reference: Any              # frozen copy of the initial weights (full fine-tuning with KL) or None
    lora_config: Any            # peft LoraConfig or None


def build_model(cfg, acc, family: str) -> Model:
    set_seed(cfg.run.seed)  # module initialisers (LoRA's gaussian A) draw from the global generators
    pipe = load_pipeline(cfg.model.path, DTYPES[cfg.model.dtype]).to(acc.device)
    found = family_of_pipeline(type(pipe).__name__)  # a hub id validated online is resolved only now
    family = found.name if found is not None else family
    policy = policy_from_pipeline(pipe, **adapter_options(family, cfg.model))
    denoiser, f, t = policy.denoiser, cfg.finetune, cfg.training
    lora_config, reference = None, None
    if f.mode == "lora":
        lora_config = finetune.add_lora(denoiser, family, f.lora_rank, f.lora_alpha, f.lora_target_modules,
                                        f.lora_dropout)
    else:
        denoiser.float().requires_grad_(True)
        reference = finetune.frozen_copy(denoiser) if t.kl_beta > 0 else None
    if f.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    params = finetune.trainable_parameters(denoiser)
    optimizer, scheduler = optimizer_and_schedule(params, t, cfg.run.iterations)
    model, optimizer = acc.prepare(denoiser, optimizer)
    ema = EMAModel(params, decay=f.ema_decay) if f.ema_decay > 0 else None
    return Model(pipe, family, policy, model, params, optimizer, scheduler, ema, reference, lora_config)


def optimizer_and_schedule(params: list, t, iterations: int):
    """AdamW over ``params`` and its learning-rate schedule from a training section (both trainers')."""
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps,
                                  weight_decay=t.weight_decay)
    # the scheduler counts optimizer steps; the config counts iterations
    steps = t.inner_epochs * t.updates_per_epoch
    scheduler = get_scheduler("constant_with_warmup" if t.lr_schedule == "constant" else t.lr_schedule, optimizer,
                              num_warmup_steps=t.warmup_iterations * steps, num_training_steps=iterations * steps)
    # the scheduler stays unprepared: accelerate would step it once per process, changing warmup with W
    return optimizer, scheduler
