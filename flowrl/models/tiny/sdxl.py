"""Tiny random-weight SDXL pipeline: the real StableDiffusionXLPipeline code path, built offline."""
from __future__ import annotations

import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from flowrl.models.tiny import _build, _clip_config, _vae, clip_tokenizer, sd_scheduler

TIME_EMBED = 8  # addition_time_embed_dim: each of the 6 time ids gets 8 Fourier features


def sdxl_scheduler(kind: str = "euler"):
    """SDXL base ships EulerDiscreteScheduler on SD's noise schedule (its scheduler config also keeps DDIM's
    ``set_alpha_to_one: false`` and ``clip_sample: false``, so ``DDIMScheduler.from_config`` of it is DDPO's)."""
    if kind != "euler":
        return sd_scheduler(kind)
    sched = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
                                   interpolation_type="linear", use_karras_sigmas=False)
    sched.register_to_config(set_alpha_to_one=False, clip_sample=False, skip_prk_steps=True)  # unused by Euler
    return sched


def tiny_sdxl_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32,
                       scheduler: str = "euler") -> StableDiffusionXLPipeline:
    """SDXL-like: a UNet with ``text_time`` added conditioning, CLIP-L-like + CLIP-G-like text encoders (16 wide
    each: their hidden states concatenate to the 32-wide cross-attention), 64x64 images. ``scheduler``: the
    stock "euler" (``load_pipeline`` swaps it for DDIM), or "ddim" / "pndm"."""
    tok, tok2 = clip_tokenizer(), clip_tokenizer(pad_token="!")
    sdxl_scheduler(scheduler)  # a bad name fails before anything is built
    proj = 32
    return _build(seed, dtype, StableDiffusionXLPipeline, {
        "unet": lambda: UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
            attention_head_dim=2, norm_num_groups=8, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED,
            projection_class_embeddings_input_dim=proj + 6 * TIME_EMBED),
        "vae": lambda: _vae(0.13025, None, quant_conv=True),
        "text_encoder": lambda: CLIPTextModel(_clip_config(tok, 16, 2, proj, "quick_gelu")),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(_clip_config(tok2, 16, 2, proj, "gelu")),
        "scheduler": lambda: sdxl_scheduler(scheduler),
        "tokenizer": lambda: tok, "tokenizer_2": lambda: tok2,
    }, force_zeros_for_empty_prompt=True)
