"""What is trained and how it is saved: LoRA through peft (diffusers' adapter integration) or full fine-tuning.

LoRA output is the diffusers LoRA format (``pipe.load_lora_weights(run_dir / "lora")`` in plain diffusers); full
fine-tuning writes a diffusers pipeline folder. The reference for KL is the base model: the adapter switched off
(LoRA) or a frozen copy of the initial weights (full).
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

from flowrl.models.families import FAMILIES

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name for a saved LoRA


def add_lora(denoiser, family: str, rank: int, alpha: float | None, targets: list[str] | None,
             dropout: float = 0.0) -> LoraConfig:
    """Freeze the base weights and add a trainable LoRA adapter (gaussian-initialised A, zero B: starts at base)."""
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=dropout,
                        init_lora_weights="gaussian", target_modules=targets or list(FAMILIES[family].lora_targets))
    denoiser.requires_grad_(False)
    denoiser.add_adapter(config)
    if not any(p.requires_grad for p in denoiser.parameters()):
        raise ValueError(f"finetune.lora_target_modules {config.target_modules} matched no module")
    return config


@contextlib.contextmanager
def base_weights(denoiser):
    """The base model's output for the KL reference: the LoRA adapter off for the duration."""
    if getattr(denoiser, "_lora_merged", False):  # the base weights are the merged ones in there
        raise RuntimeError("base_weights inside merged_lora: the base weights hold the merged LoRA there")
    denoiser.disable_adapters()
    try:
        yield
    finally:
        denoiser.enable_adapters()


@contextlib.contextmanager
def merged_lora(denoiser):
    """Forwards without gradient through the LoRA merged into the base weights (W + scaling * B A per layer, via
    peft's ``get_delta_weight``) with the adapter switched off: one matmul per layer instead of three (the toy
    recipes' rollouts take 0.84 of the time, scripts/bench_merged_lora.py). The merged weight has the base's
    dtype: a bfloat16 base rounds the LoRA's delta with it. The original base tensors are put back as they were,
    not unmerged by subtraction, so no rounding accumulates in the frozen weights. Does nothing while the adapter
    is already off."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in denoiser.modules() if isinstance(m, LoraLayer) and not m.disable_adapters and not m.merged]
    if not layers:
        yield
        return
    swapped = []
    try:
        with torch.no_grad():
            for layer in layers:
                active = [a for a in layer.active_adapters if a in layer.lora_A]
                if any(layer.use_dora.get(a, False) for a in active):
                    raise ValueError("merged_lora: DoRA layers are not supported (their magnitude is not a sum)")
                base = layer.get_base_layer()
                merged = base.weight + sum(layer.get_delta_weight(a) for a in active).to(base.weight.dtype)
                swapped.append((base, base.weight))
                base.weight = torch.nn.Parameter(merged, requires_grad=False)
        denoiser.disable_adapters()
        denoiser._lora_merged = True
        yield
    finally:
        denoiser._lora_merged = False
        if swapped:
            denoiser.enable_adapters()
        for base, weight in swapped:
            base.weight = weight


def frozen_copy(denoiser):
    ref = copy.deepcopy(denoiser).requires_grad_(False).eval()
    return ref


def trainable_parameters(denoiser) -> list[torch.nn.Parameter]:
    return [p for p in denoiser.parameters() if p.requires_grad]


def save_lora(pipe, denoiser, family: str, config: LoraConfig, out_dir: Path) -> Path:
    """Write the adapter in diffusers' LoRA format, with its config as metadata (keeps lora_alpha)."""
    comp = FAMILIES[family].component
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in get_peft_model_state_dict(denoiser).items()}
    meta = config.to_dict()
    if isinstance(meta.get("target_modules"), (set, list)):  # a set in peft: sort it so equal runs give equal files
        meta["target_modules"] = sorted(meta["target_modules"])
    type(pipe).save_lora_weights(str(out_dir), **{f"{comp}_lora_layers": state,
                                                  f"{comp}_lora_adapter_metadata": meta})
    return out_dir


def load_lora(denoiser, family: str, folder: Path) -> None:
    """Put a LoRA written by ``save_lora`` back into the adapter ``add_lora`` made, bit for bit (a checkpoint's
    weights; ``pipe.load_lora_weights`` would add a second adapter instead)."""
    prefix = f"{FAMILIES[family].component}."
    saved = load_file(folder / LORA_FILE)
    state = {k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)}
    if len(state) != len(saved):
        raise ValueError(f"{folder / LORA_FILE}: keys outside {prefix!r}, not a {family} LoRA from flowrl")
    expected = get_peft_model_state_dict(denoiser)
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ValueError(f"{folder / LORA_FILE} does not fit the adapter: missing {missing[:3]}, unexpected "
                         f"{extra[:3]}")
    set_peft_model_state_dict(denoiser, state)


def save_full(pipe, out_dir: Path) -> Path:
    pipe.save_pretrained(str(out_dir))
    return out_dir
