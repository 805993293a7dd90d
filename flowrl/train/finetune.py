"""What is trained and how it is saved: LoRA through peft (diffusers' adapter integration) or full fine-tuning.

LoRA output is the diffusers LoRA format (``pipe.load_lora_weights(run_dir / "lora")`` in plain diffusers); full
fine-tuning writes a diffusers pipeline folder. The reference for KL is the base model: the adapter switched off
(LoRA) or a frozen copy of the initial weights (full).
"""
from __future__ import annotations

import contextlib
import copy
import re
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from flowrl.models.families import FAMILIES
from flowrl.train.config import ConfigError

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
    for key in sorted(state):  # peft would print a size-mismatch traceback for every key
        if state[key].shape != expected[key].shape:
            raise ValueError(f"{folder / LORA_FILE}: {key} has shape {tuple(state[key].shape)} in the file but "
                             f"{tuple(expected[key].shape)} in the adapter (saved for another model or rank?)")
    set_peft_model_state_dict(denoiser, state)


# A diffusers-format LoRA key: <pipeline component>.<module path>.lora_A|lora_B[.weight] (what save_lora writes and
# peft-trained LoRAs from diffusers scripts use). Other layouts (kohya's lora_down / lora_up, attention-processor
# keys) are converted by diffusers itself and are left to it.
_LORA_KEY = re.compile(r"^(?P<component>\w+)\.(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.weight)?$")
# the components LoRA files of the known families name: one that is not in the pipeline is a misfit, not a layout
_COMPONENTS = {f.component for f in FAMILIES.values()} | {"text_encoder", "text_encoder_2", "text_encoder_3"}


def _short(module: str) -> str:
    """The module's own name for a message: to_q, to_out.0 (a bare index says nothing)."""
    parts = module.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def _misfit(pipe, component: str, module: str, part: str, shape: tuple[int, ...]) -> str | None:
    """Why one LoRA matrix cannot go into ``pipe``, or None. lora_A is (rank, inputs, ...) and lora_B
    (outputs, rank, ...) for Linear and Conv layers alike (peft's LoRA layers)."""
    owner = getattr(pipe, component, None)
    if not isinstance(owner, torch.nn.Module):
        return f"the LoRA adapts {component}, which {type(pipe).__name__} has none of"
    try:
        layer = owner.get_submodule(module)
    except AttributeError:
        return f"the LoRA adapts {module}, which the model's {component} does not have"
    layer = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2 or len(shape) < 2:
        return f"the LoRA adapts {module}, a {type(layer).__name__} of the model's {component} with no weight matrix"
    side = {"lora_A": (1, "inputs"), "lora_B": (0, "outputs")}[part]  # A: (rank, in, ...), B: (out, rank, ...)
    if shape[side[0]] != weight.shape[side[0]]:
        return (f"{module}.{part} has shape {shape} in the LoRA but the model's {_short(module)} weight has shape "
                f"{tuple(weight.shape)} ({shape[side[0]]} against {weight.shape[side[0]]} {side[1]})")
    return None


def check_lora_fits(pipe, folder: str | Path, flag: str = "--lora") -> None:
    """Raise one ConfigError naming the first LoRA matrix of ``folder`` that ``pipe`` cannot take: a module the
    pipeline does not have, or a shape that does not fit the module's inputs / outputs. Reads only the
    safetensors header (names and shapes), before ``load_lora_weights``, which would print peft's size-mismatch
    traceback for the first and silently drop the second. Keys in another layout than diffusers' are not checked
    (diffusers converts them)."""
    path = Path(folder) / LORA_FILE
    with safe_open(str(path), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    components = _COMPONENTS | set(getattr(pipe, "components", {}))
    for key, shape in shapes.items():
        m = _LORA_KEY.match(key)
        if m is None or m["component"] not in components:
            continue
        problem = _misfit(pipe, m["component"], m["module"], m["part"], shape)
        if problem:
            raise ConfigError(f"{flag} {folder}: {problem} (the LoRA was trained on another model?)")


def save_full(pipe, out_dir: Path) -> Path:
    pipe.save_pretrained(str(out_dir))
    return out_dir
