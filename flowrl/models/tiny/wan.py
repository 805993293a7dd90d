"""Tiny random-weight Wan 2.1 text-to-video pipeline, built offline: the real WanPipeline code path."""
from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from flowrl.models.tiny import _build, t5_tokenizer


def _umt5(tok, d_model: int = 32) -> UMT5EncoderModel:
    """UMT5 (gated-gelu, relative attention bias in every layer) like Wan's umt5-xxl; dropout 0 for determinism."""
    return UMT5EncoderModel(UMT5Config(
        vocab_size=len(tok), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=d_model // 8,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
    ))


def tiny_wan_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32) -> WanPipeline:
    """Wan2.1-T2V-like: 2 DiT blocks (self-attention with 3D RoPE, cross-attention to UMT5), the causal 3D VAE
    with Wan's 8x spatial / 4x temporal compression and 16 latent channels, flow matching with shift 3.0 (480p).

    Clips are ``num_frames = 4k + 1`` frames of height and width multiples of 16 (VAE 8 x patch 2): e.g. 5 frames
    at 32x32 give latents (16, 2, 4, 4). The stock checkpoints ship UniPC with ``flow_shift``; the flow kernels
    need Euler's grid, so the tiny one has FlowMatchEulerDiscreteScheduler with the same shift.
    """
    tok = t5_tokenizer()
    return _build(seed, dtype, WanPipeline, {
        "transformer": lambda: WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64),
        # the smallest Wan VAE: the stock layout of 3 downsamples (2 of them temporal), 4 base channels
        "vae": lambda: AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                        temperal_downsample=[False, True, True]),
        "text_encoder": lambda: _umt5(tok),
        "scheduler": lambda: FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        "tokenizer": lambda: tok,
    }, transformer_2=None, boundary_ratio=None)
