"""What flowrl knows about each model family, in one place: its diffusers pipeline, adapter, trained component,
default LoRA targets and the adapter options a recipe's ``model`` section feeds it.

Kept free of diffusers imports (config validation reads it and must stay fast); the adapters themselves live in
sd3.py / flux.py / sd.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Attention projections of the joint (image + text) blocks: the modules the published recipes adapt.
_JOINT_ATTN = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
               "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
_UNET_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
_WAN_ATTN = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
             "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Family:
    name: str
    pipeline: str                  # diffusers pipeline class
    adapter: str                   # flowrl.models adapter class
    component: str                 # the trained module's name in the pipeline (and in its LoRA files)
    lora_targets: tuple[str, ...]  # default LoRA target modules
    options: tuple[str, ...]       # ModelConfig fields the adapter takes as keyword arguments
    kernel: str = "flow"           # "flow" (velocity: flow kernels) or "ddim" (epsilon / v UNets: DDIM-eta)
    task: str = "t2i"              # "t2i" text-to-image, "edit" (an input image per prompt), "t2v" text-to-video


FAMILIES = {
    # Flow-GRPO SD3.5: r 32, alpha 64 on the joint attention
    "sd3": Family("sd3", "StableDiffusion3Pipeline", "SD3Policy", "transformer", _JOINT_ATTN,
                  ("max_sequence_length",)),
    # FLUX single blocks share to_q / to_k / to_v, so they are covered too
    "flux": Family("flux", "FluxPipeline", "FluxPolicy", "transformer", _JOINT_ATTN,
                   ("max_sequence_length", "true_cfg_scale")),
    # DDPO: UNet attention
    "sd": Family("sd", "StableDiffusionPipeline", "SDPolicy", "unet", _UNET_ATTN, (), kernel="ddim"),
    "sdxl": Family("sdxl", "StableDiffusionXLPipeline", "SDXLPolicy", "unet", _UNET_ATTN, (), kernel="ddim"),
    # flow_grpo's Kontext and Qwen-Image recipes adapt the same attention projections as FLUX / SD3
    "flux_kontext": Family("flux_kontext", "FluxKontextPipeline", "FluxKontextPolicy", "transformer", _JOINT_ATTN,
                           ("max_sequence_length", "true_cfg_scale", "auto_resize"), task="edit"),
    "qwen_image": Family("qwen_image", "QwenImagePipeline", "QwenImagePolicy", "transformer", _JOINT_ATTN,
                         ("max_sequence_length",)),
    "qwen_image_edit": Family("qwen_image_edit", "QwenImageEditPipeline", "QwenImageEditPolicy", "transformer",
                              _JOINT_ATTN, ("max_sequence_length", "image_area"), task="edit"),
    # Wan 2.1: self- and cross-attention of every block (flow_grpo's Wan LoRA)
    "wan": Family("wan", "WanPipeline", "WanPolicy", "transformer", _WAN_ATTN, ("max_sequence_length", "num_frames"),
                  task="t2v"),
}


def family_of_pipeline(class_name: str) -> Family | None:
    return next((f for f in FAMILIES.values() if f.pipeline == class_name), None)


def adapter_options(family: str, model_cfg) -> dict:
    """The adapter keyword arguments a ``model`` config section gives ``family``'s adapter."""
    return {name: getattr(model_cfg, name) for name in FAMILIES[family].options}
