"""Tiny random-weight Qwen-Image / Qwen-Image-Edit pipelines: a small MMDiT, a small causal 3D VAE and a tiny
Qwen2.5-VL text encoder behind the real QwenImagePipeline / QwenImageEditPipeline code paths, built offline.

The tokenizer is a byte-level BPE Qwen2Tokenizer whose merges make every word of ``WORDS`` and of the pipelines'
own prompt templates one token, as the real vocabulary does for plain English: the template's system prefix then
tokenizes to exactly the pipeline's drop index (34 / 64 tokens), so what the pipeline drops is the system prompt and
what it keeps starts at the user turn, as with the real model.

64x64 images (VAE scale factor 2, 4 latent channels packed 2x2 into 16-channel tokens): pass ``height=width=64``.
"""
from __future__ import annotations

import re

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageEditPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen2VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.utils import is_torchvision_available

from flowrl.models.tiny import WORDS, _apply_bpe, _build, _byte_alphabet

SPECIAL = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
# the VL image processor's pixel budget: any input image becomes 56 x 56 pixels, 16 patches of 14, 4 merged tokens
_PIXELS = 56 * 56


def prompt_templates() -> tuple[str, str]:
    """The text-to-image and edit prompt templates, read off the pipelines themselves (set in their __init__)."""
    t2i = QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None)
    edit = QwenImageEditPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, processor=None,
                                 transformer=None)
    return t2i.prompt_template_encode, edit.prompt_template_encode


def qwen_tokenizer(words=WORDS) -> Qwen2Tokenizer:
    """Byte-level BPE with Qwen2's pre-tokenizer: every pre-token of the templates and of ``words`` (bare, with a
    leading space, capitalised) is one token; anything else spells out in bytes. Special tokens as in Qwen2.5-VL."""
    pre = Qwen2Tokenizer()._tokenizer.pre_tokenizer  # the stock Qwen2 regex + byte-level mapping
    special = re.compile("|".join(re.escape(s) for s in SPECIAL))
    texts = [t.replace("{}", "") for t in prompt_templates()]
    texts += [" ".join(words), " ".join(w.capitalize() for w in words), *words]
    pieces = [p for text in texts for part in special.split(text) for p, _ in pre.pre_tokenize_str(part)]
    tokens, ranks = list(_byte_alphabet()), {}
    for piece in dict.fromkeys(pieces):  # merges appended at the lowest priority never re-split earlier pieces
        symbols = _apply_bpe(list(piece), ranks)
        while len(symbols) > 1:
            ranks[(symbols[0], symbols[1])] = len(ranks)
            tokens.append(symbols[0] + symbols[1])
            symbols = _apply_bpe(symbols, ranks)
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    tok = Qwen2Tokenizer(vocab=vocab, merges=list(ranks), model_max_length=2048)
    tok.add_special_tokens({"additional_special_tokens": list(SPECIAL)})
    return tok


def _text_encoder(tok: Qwen2Tokenizer) -> Qwen2_5_VLForConditionalGeneration:
    """Qwen2.5-VL: 2 text layers of width 32 (the transformer's joint_attention_dim) with multimodal RoPE, and a
    2-block vision tower (one windowed, one full attention) with the stock patch 14, merge 2, temporal patch 2."""
    ids = tok.convert_tokens_to_ids
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
                         bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>")),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=56, out_hidden_size=32,
                           fullatt_block_indexes=[1]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>")))


def qwen_vl_processor(tok: Qwen2Tokenizer) -> Qwen2VLProcessor:
    """Qwen2VLProcessor over a PIL image processor built from its config. Without torchvision, transformers cannot
    construct (or load) a Qwen2VLProcessor: its __init__ type-checks the video processor slot against a class it
    only exports with torchvision. The edit pipeline never passes videos, so there the processor is assembled
    with a bare video-processor config instead of going through that check."""
    image_processor = Qwen2VLImageProcessorPil(min_pixels=_PIXELS, max_pixels=_PIXELS, patch_size=14,
                                               temporal_patch_size=2, merge_size=2)
    if is_torchvision_available():
        from transformers import Qwen2VLVideoProcessor

        video = Qwen2VLVideoProcessor(min_pixels=_PIXELS, max_pixels=_PIXELS, patch_size=14, temporal_patch_size=2,
                                      merge_size=2)
        return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tok, video_processor=video)
    from transformers.video_processing_utils import VideoProcessorMixin

    proc = Qwen2VLProcessor.__new__(Qwen2VLProcessor)
    proc.chat_template = None
    proc.image_processor, proc.tokenizer, proc.video_processor = image_processor, tok, VideoProcessorMixin()
    proc.image_token, proc.video_token = "<|image_pad|>", "<|video_pad|>"
    proc.image_token_id, proc.video_token_id = tok.convert_tokens_to_ids([proc.image_token, proc.video_token])
    return proc


def _builders(tok: Qwen2Tokenizer) -> dict:
    return {
        # stock layout (patch 2 over 4 * z channels in, z out) at width 32; RoPE axes (4, 6, 6) fill head dim 16
        "transformer": lambda: QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, axes_dims_rope=(4, 6, 6)),
        # one down level without temporal downsampling: scale factor 2; non-trivial latents_mean / std
        "vae": lambda: AutoencoderKLQwenImage(
            base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
            latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.8, 1.2, 2.0]),
        "text_encoder": lambda: _text_encoder(tok),
        # Qwen-Image's scheduler config: resolution-dependent exponential shift, terminal sigma 0.02
        "scheduler": lambda: FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
            base_image_seq_len=256, max_image_seq_len=8192, time_shift_type="exponential", shift_terminal=0.02,
            invert_sigmas=False, stochastic_sampling=False, use_karras_sigmas=False, use_exponential_sigmas=False,
            use_beta_sigmas=False),
        "tokenizer": lambda: tok,
    }


def tiny_qwen_image_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32) -> QwenImagePipeline:
    """Qwen-Image-like text-to-image pipeline; call it with ``height=width=64``."""
    return _build(seed, dtype, QwenImagePipeline, _builders(qwen_tokenizer()))


def tiny_qwen_image_edit_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32) -> QwenImageEditPipeline:
    """Qwen-Image-Edit-like: the same modules as ``tiny_qwen_image_pipeline`` (same weights for the same seed) plus
    the VL processor. The pipeline sizes the input image to about 1024 ** 2 pixels (``calculate_dimensions`` of
    its module, a hard-coded area): the adapter's ``image_area`` is that area."""
    tok = qwen_tokenizer()
    return _build(seed, dtype, QwenImageEditPipeline, {**_builders(tok), "processor": lambda: qwen_vl_processor(tok)})
