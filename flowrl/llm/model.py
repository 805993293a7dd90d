"""Loading what an LLM run trains: tokenizer and causal LM (``from_pretrained``, ``toy:arith`` for the shipped
tiny model), LoRA through peft or full fine-tuning, the reference policy for the KL, optimizer and schedule on
accelerate's device. Tokenizer problems are ConfigErrors raised before anything is generated."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from flowrl.train.config import ConfigError
from flowrl.train.setup import optimizer_and_schedule

TOY_LM = "toy:arith"
TOY_LM_DIR = Path(__file__).resolve().parent / "base"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve(path: str) -> str:
    """``toy:arith`` names the tiny LM shipped in the package; anything else is used as given."""
    if path == TOY_LM:
        if not (TOY_LM_DIR / "config.json").is_file():
            raise ConfigError(f"model.path: {TOY_LM} is not installed ({TOY_LM_DIR} is missing; "
                              "scripts/pretrain_llm_toy.py writes it)")
        return str(TOY_LM_DIR)
    return path


def load_tokenizer(path: str, chat_template: bool = False):
    """The tokenizer, left-padded for batched generation; no pad token or a missing chat template is an error."""
    tok = AutoTokenizer.from_pretrained(resolve(path))
    if tok.pad_token_id is None:
        raise ConfigError(f"model.path: the tokenizer of {path} has no pad token; batched generation needs one "
                          "(give it one in the tokenizer's files, e.g. its eos token, and save it)")
    if tok.eos_token_id is None:
        raise ConfigError(f"model.path: the tokenizer of {path} has no eos token; completions could never end")
    if chat_template and not getattr(tok, "chat_template", None):
        raise ConfigError(f"model.chat_template: the tokenizer of {path} has no chat template")
    tok.padding_side = "left"
    return tok


def format_prompts(tokenizer, prompts: list[str], chat_template: bool) -> list[str]:
    """What the model reads: the raw prompt, or one user message through the tokenizer's chat template."""
    if not chat_template:
        return list(prompts)
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts]


def check_prompt_lengths(tokenizer, texts: list[str], limit: int, where: str) -> None:
    """Every prompt within ``model.max_prompt_tokens`` (which with the completion budget fits the model's
    context): else one error naming the first that does not."""
    for i, ids in enumerate(tokenizer(texts)["input_ids"]):
        if len(ids) > limit:
            raise ConfigError(f"{where}: prompt {i} has {len(ids)} tokens, above model.max_prompt_tokens ({limit}): "
                              f"{texts[i][:80]!r}")


@dataclass
class LMModel:
    tokenizer: Any
    model: Any                  # the (DDP-)wrapped trained module
    params: list
    optimizer: Any
    lr_scheduler: Any
    reference: Any              # frozen copy of the initial weights (full fine-tuning with KL) or None
    lora_config: Any            # peft LoraConfig or None
    context: int | None         # the model's maximum positions


def preflight(cfg, prompt_sets: dict):
    """What can be checked from the small files alone, before a run folder or a model exists: the tokenizer, the
    budget against the model's context, every prompt's length. Returns (tokenizer, the model's context)."""
    m = cfg.model
    tokenizer = load_tokenizer(m.path, m.chat_template)
    context = getattr(AutoConfig.from_pretrained(resolve(m.path)), "max_position_embeddings", None)
    if context is not None and m.max_prompt_tokens + m.max_completion_tokens > context:
        raise ConfigError(f"model.max_prompt_tokens + model.max_completion_tokens = "
                          f"{m.max_prompt_tokens + m.max_completion_tokens} exceeds the model's context ({context})")
    for key, prompts in prompt_sets.items():
        if prompts is not None:
            check_prompt_lengths(tokenizer, format_prompts(tokenizer, prompts, m.chat_template), m.max_prompt_tokens,
                                 key)
    return tokenizer, context


def build_lm(cfg, acc, tokenizer, context: int | None) -> LMModel:
    set_seed(cfg.run.seed)  # LoRA's initialisation draws from the global generators
    m, f, t = cfg.model, cfg.finetune, cfg.training
    model = AutoModelForCausalLM.from_pretrained(resolve(m.path), dtype=DTYPES[m.dtype]).to(acc.device)
    model.eval()  # dropout off: the recomputed log-probs must be the rollout's
    lora_config, reference = None, None
    if f.mode == "lora":
        model.requires_grad_(False)
        lora_config = LoraConfig(r=f.lora_rank, lora_alpha=f.lora_alpha or f.lora_rank, lora_dropout=f.lora_dropout,
                                 target_modules=f.lora_target_modules or "all-linear", bias="none",
                                 task_type="CAUSAL_LM")
        model = get_peft_model(model, lora_config)
    else:
        model.float().requires_grad_(True)
        if t.kl_beta > 0:
            reference = copy.deepcopy(model).requires_grad_(False)
    if f.gradient_checkpointing:  # non-reentrant: with LoRA the checkpointed blocks' inputs need no grad
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = optimizer_and_schedule(params, t, cfg.run.iterations)
    wrapped, optimizer = acc.prepare(model, optimizer)
    return LMModel(tokenizer, wrapped, params, optimizer, scheduler, reference, lora_config, context)
