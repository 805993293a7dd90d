"""Tiny random-weight pipelines of every supported family (``FAMILIES``), built entirely offline.

Tests, benchmarks and quick starts need the *real* diffusers pipeline code paths (encode_prompt, latent
packing, schedulers, save/reload) without hub access or gigabytes of weights. Everything here, tokenizers
included, is built in code: a default pipeline builds in well under a second, saves to about 1 MB and runs
10 steps at 64x64 with batch 4 in a fraction of a second on CPU.

Default image size is 64x64 for the image families (VAE scale factor 2, 4 latent channels) and 32x32 for Wan
(its VAE compresses 8x). SD3 and SD pick it up from their configs; FluxPipeline hard-codes a 128-latent
default, so pass ``height=width=64`` for Flux (see ``DEFAULT_SIZE``). The SD3 / FLUX / SD builders live here;
the newer families' in their own modules (``_LAZY_BUILDERS``), imported on first use.
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PNDMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

__all__ = [
    "DEFAULT_SIZE", "FAMILIES", "WORDS", "build_tiny", "clip_tokenizer", "save_tiny", "t5_tokenizer",
    "tiny_flux_pipeline", "tiny_sd3_pipeline", "tiny_sd_pipeline",
]

FAMILIES = ("sd3", "flux", "sd", "sdxl", "flux_kontext", "wan", "qwen_image", "qwen_image_edit")
# pixels; latents are (4, 32, 32) before Flux packing
DEFAULT_SIZE = {"sd3": 64, "flux": 64, "sd": 64, "sdxl": 64, "flux_kontext": 64, "wan": 32,
                "qwen_image": 64, "qwen_image_edit": 64}

# Every word is a single token in both tokenizers, so short prompts never overflow short max lengths.
WORDS = tuple("""
a an the of and with on in at to by from near under over above below behind beside between next inside
outside top bottom left right center middle corner side front back up down one two three four five six
seven eight nine ten many some no single pair few several is are this that there it its
red orange yellow green blue purple pink brown black white gray grey cyan magenta gold silver colorful
dark light bright pale small large big tiny huge tall short long wide round square flat striped dotted
circle circles square squares triangle triangles star stars heart hearts cross crosses rectangle
rectangles ellipse ellipses hexagon hexagons diamond diamonds line lines dot dots shape shapes ring rings
photo picture image painting drawing sketch render illustration portrait landscape view close background
cat cats dog dogs bird birds horse fish person people man woman child car cars bus bike boat tree trees
flower flowers house houses city street road mountain river lake sea beach sky sun moon cloud clouds
water grass forest snow rain fire table chair cup book apple banana ball box clock window door
sitting standing running flying playing holding wearing looking high quality detailed realistic art
""".split())

_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


# ----------------------------------------------------------------------------------------------- tokenizers
def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP byte-to-unicode table: 256 printable symbols, one per byte, in CLIP's vocab order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(extra))]


def _apply_bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Greedy BPE: repeatedly merge the adjacent pair of lowest rank (leftmost on ties)."""
    symbols = list(symbols)
    while len(symbols) > 1:
        pairs = [(ranks.get(p, 1 << 30), i) for i, p in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def _clip_vocab_and_merges(words=WORDS) -> tuple[dict[str, int], list[str]]:
    """Byte alphabet, its ``</w>`` word-final variants, then merges that make every word one token.

    A merge is only added for the pair BPE actually reaches with the merges so far, and at the lowest
    priority, so it never changes how earlier words tokenize (naive left-to-right merges split words
    whose inner pairs were ranked higher by another word).
    """
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet]
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(w.lower() for w in words):
        symbols = _apply_bpe([*word[:-1], word[-1] + "</w>"], ranks)
        while len(symbols) > 1:
            ranks[(symbols[0], symbols[1])] = len(ranks)
            tokens.append(symbols[0] + symbols[1])
            symbols = _apply_bpe(symbols, ranks)
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens + [_BOS, _EOS]))}
    return vocab, [f"{a} {b}" for a, b in ranks]


def clip_tokenizer(pad_token: str = _EOS, words=WORDS) -> CLIPTokenizer:
    """CLIP BPE tokenizer from a vocab.json + merges.txt written to a temp dir (the portable loading path).

    SD3's first CLIP (and SD1.x / Flux) pad with ``<|endoftext|>``; SD3's second CLIP pads with ``"!"``.
    ``model_max_length=77`` matters: the SD3 pipeline pads CLIP prompts to it.
    """
    vocab, merges = _clip_vocab_and_merges(words)
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(os.path.join(tmp, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer.from_pretrained(
            tmp, model_max_length=77, bos_token=_BOS, eos_token=_EOS, unk_token=_EOS, pad_token=pad_token
        )


def t5_tokenizer(words=WORDS) -> T5TokenizerFast:
    """Unigram T5 tokenizer: ``<pad>=0, </s>=1, <unk>=2``, whole-word pieces, then single-character fallbacks.

    Word pieces score far above spelling a word out, so known words are one token; other ASCII text still
    tokenizes (character by character) and anything else maps to ``<unk>``.
    """
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    for w in dict.fromkeys(w.lower() for w in words):
        pieces += [(f"▁{w}", -2.0), (f"▁{w.capitalize()}", -2.5)]
    chars = [chr(c) for c in range(33, 127)]
    pieces += [(c, -10.0) for c in chars]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


# ------------------------------------------------------------------------------------------------- models
def _clip_config(tok: CLIPTokenizer, hidden: int, heads: int, proj: int, act: str) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=heads, max_position_embeddings=77, projection_dim=proj, hidden_act=act,
        dropout=0.0, attention_dropout=0.0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def _t5(tok: T5TokenizerFast, d_model: int = 32) -> T5EncoderModel:
    """T5 v1.1-style (gated-gelu) encoder like the T5-XXL that SD3 and FLUX use; dropout 0 for determinism."""
    return T5EncoderModel(T5Config(
        vocab_size=len(tok), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=d_model // 8,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
    ))


def _vae(scaling_factor: float, shift_factor: float | None, quant_conv: bool) -> AutoencoderKL:
    """(8, 16)-channel VAE: scale factor 2, 4 latent channels. Factors mirror each real family's VAE."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=64, scaling_factor=scaling_factor,
        shift_factor=shift_factor, use_quant_conv=quant_conv, use_post_quant_conv=quant_conv,
    )


def _build(seed: int, dtype: torch.dtype, pipeline_cls, builders: dict, **extra):
    """Build each component under its own seed (seed + index) inside a forked RNG.

    Per-component seeds keep one component's weights stable when another's shape changes; fork_rng leaves
    the caller's global RNG untouched. Modules built in code start in train mode, so all go to eval().
    """
    parts = {}
    with torch.random.fork_rng(devices=[]):
        for i, (name, make) in enumerate(builders.items()):
            torch.manual_seed(seed + 1000 * i)
            part = make()
            if isinstance(part, torch.nn.Module):
                part.eval()
                if dtype != torch.float32:  # skip the no-op cast: diffusers warns on every .to(dtype)
                    part.to(dtype)
            parts[name] = part
    return pipeline_cls(**parts, **extra)


def tiny_sd3_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32) -> StableDiffusion3Pipeline:
    """SD3.5-like: MMDiT with qk RMSNorm, two CLIPs + T5, flow matching with shift 3.0; 64x64 images.

    The CLIPs are 16 wide so their concatenated hidden states (32) exactly fill the T5 width / joint
    attention dim (32): wider CLIPs would get cropped by the pipeline's pad-to-T5-width step.
    """
    tok, tok2, tok3 = clip_tokenizer(), clip_tokenizer(pad_token="!"), t5_tokenizer()
    return _build(seed, dtype, StableDiffusion3Pipeline, {
        "transformer": lambda: SD3Transformer2DModel(
            sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
            pooled_projection_dim=64, out_channels=4, pos_embed_max_size=16, qk_norm="rms_norm"),
        "vae": lambda: _vae(1.5305, 0.0609, quant_conv=False),
        "text_encoder": lambda: CLIPTextModelWithProjection(_clip_config(tok, 16, 2, 32, "quick_gelu")),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(_clip_config(tok2, 16, 2, 32, "gelu")),
        "text_encoder_3": lambda: _t5(tok3),
        "scheduler": lambda: FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        "tokenizer": lambda: tok, "tokenizer_2": lambda: tok2, "tokenizer_3": lambda: tok3,
    })


def tiny_flux_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32) -> FluxPipeline:
    """FLUX.1-dev-like: 1 double + 1 single block, guidance embedding, resolution-dependent shift.

    Latents are 4 channels packed 2x2 into 16-channel tokens; call with ``height=width=64``.
    """
    return _build(seed, dtype, FluxPipeline, tiny_flux_builders())


def tiny_flux_builders() -> dict:
    """The tiny FLUX components as ``_build`` builders: shared by FluxPipeline and FluxKontextPipeline, which
    take the same modules (so one seed gives both the same weights)."""
    tok, tok2 = clip_tokenizer(), t5_tokenizer()
    return {
        "transformer": lambda: FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(4, 4, 8)),
        "vae": lambda: _vae(0.3611, 0.1159, quant_conv=False),
        "text_encoder": lambda: CLIPTextModel(_clip_config(tok, 32, 4, 32, "quick_gelu")),
        "text_encoder_2": lambda: _t5(tok2),
        "scheduler": lambda: FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096),
        "tokenizer": lambda: tok, "tokenizer_2": lambda: tok2,
    }


def sd_scheduler(kind: str = "ddim", prediction_type: str = "epsilon"):
    """SD1.5's noise schedule as DDIM (what DDPO samples with) or as the stock checkpoints ship it: PNDM with
    the config of runwayml/stable-diffusion-v1-5's scheduler folder."""
    common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    if kind == "pndm":
        sched = PNDMScheduler(**common, skip_prk_steps=True)
        sched.register_to_config(clip_sample=False)  # in the stock config, unused by PNDM
        return sched
    if kind != "ddim":
        raise ValueError(f"scheduler must be 'ddim' or 'pndm', got {kind!r}")
    return DDIMScheduler(**common, clip_sample=False)


def tiny_sd_pipeline(
    seed: int = 0, dtype: torch.dtype = torch.float32, prediction_type: str = "epsilon", scheduler: str = "ddim"
) -> StableDiffusionPipeline:
    """SD1.5-like: cross-attention UNet, one CLIP, DDIM with SD1.5's schedule; 64x64 images.

    ``prediction_type="v_prediction"`` gives an SD2.x-style v-parameterised model; ``scheduler="pndm"`` the
    stock checkpoints' scheduler (``load_pipeline`` swaps it for DDIM).
    """
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    sd_scheduler(scheduler, prediction_type)  # a bad name fails before anything is built
    tok = clip_tokenizer()
    return _build(seed, dtype, StableDiffusionPipeline, {
        "unet": lambda: UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
            attention_head_dim=2, norm_num_groups=8),
        "vae": lambda: _vae(0.18215, None, quant_conv=True),
        "text_encoder": lambda: CLIPTextModel(_clip_config(tok, 32, 4, 32, "quick_gelu")),
        "scheduler": lambda: sd_scheduler(scheduler, prediction_type),
        "tokenizer": lambda: tok,
    }, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


_BUILDERS = {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline, "sd": tiny_sd_pipeline}
# the newer families live in their own modules, imported on first use
_LAZY_BUILDERS = {
    "sdxl": "sdxl:tiny_sdxl_pipeline",
    "flux_kontext": "kontext:tiny_flux_kontext_pipeline",
    "wan": "wan:tiny_wan_pipeline",
    "qwen_image": "qwen:tiny_qwen_image_pipeline",
    "qwen_image_edit": "qwen:tiny_qwen_image_edit_pipeline",
}


def build_tiny(family: str, seed: int = 0, **kw):
    """Build the tiny pipeline of ``family`` (one of ``FAMILIES``); ``kw`` goes to the family builder."""
    if family in _LAZY_BUILDERS:
        module, name = _LAZY_BUILDERS[family].split(":")
        builder = getattr(importlib.import_module(f"flowrl.models.tiny.{module}"), name)
    elif family in _BUILDERS:
        builder = _BUILDERS[family]
    else:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    return builder(seed=seed, **kw)


def save_tiny(family: str, path: str | os.PathLike, seed: int = 0, **kw) -> str:
    """Build and ``save_pretrained`` a tiny pipeline, so code under test goes through real loading:
    ``DiffusionPipeline.from_pretrained(path)`` reloads it bit-identically. Returns ``path`` as a str."""
    path = os.fspath(path)
    build_tiny(family, seed=seed, **kw).save_pretrained(path)
    return path
