"""Pretraining the shapes world's tiny SD3 base: VAE, then transformer + text encoders with flow matching.

Everything is deterministic given the seed (fixed step counts, seeded data, CPU float32), so
``scripts/pretrain_toy.py`` reproduces the shipped base. Architecture (sized for 2 CPU cores):
- VAE: AutoencoderKL (16, 32) channels, 32x32x3 <-> 16x16x4; latent scale / shift measured on the data, as SD3's
  are.
- Text: two tiny CLIPTextModelWithProjection over a tokenizer where every word of the world is one token, and a
  one-layer T5 (SD3 pipelines load only with all three encoders present); prompts are at most ``TEXT_TOKENS``
  tokens in each (use ``max_sequence_length=TEXT_TOKENS`` with this model).
- Transformer: SD3Transformer2DModel, patch 2 (64 image tokens), ``layers`` x ``width``.
Flow matching as SD3 trains: x_t = (1 - t) x0 + t eps with logit-normal t, target v = eps - x0, 10% empty prompts
so classifier-free guidance works.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from flowrl.models.tiny import clip_tokenizer, t5_tokenizer
from flowrl.toy import world

TEXT_TOKENS = 16


@dataclass
class PretrainConfig:
    seed: int = 0
    pool: int = 24000            # rendered training images (sampled from the train prompts)
    vae_steps: int = 1500
    vae_batch: int = 64
    vae_lr: float = 2e-3
    flow_steps: int = 4500
    flow_batch: int = 64
    flow_lr: float = 1e-3
    layers: int = 4
    width: int = 96              # attention heads of 24 dims
    text_hidden: int = 48
    cfg_dropout: float = 0.1
    log_every: int = 100


def build_pipeline(cfg: PretrainConfig) -> StableDiffusion3Pipeline:
    """The untrained toy architecture, seeded."""
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32),
                            layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32,
                            use_quant_conv=False, use_post_quant_conv=False)
        h = cfg.text_hidden

        def clip():
            return CLIPTextModelWithProjection(CLIPTextConfig(
                vocab_size=tok.vocab_size, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=TEXT_TOKENS, projection_dim=h,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                attention_dropout=0.0, dropout=0.0))

        tok = clip_tokenizer(words=world.WORDS)
        tok.model_max_length = TEXT_TOKENS
        tok2 = clip_tokenizer(words=world.WORDS, pad_token="!")
        tok2.model_max_length = TEXT_TOKENS
        te1, te2 = clip(), clip()
        tok3 = t5_tokenizer(words=world.WORDS)
        te3 = T5EncoderModel(T5Config(vocab_size=len(tok3), d_model=2 * h, d_kv=h, d_ff=2 * h, num_layers=1,
                                      num_heads=2, dropout_rate=0.0, feed_forward_proj="gated-gelu"))
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, num_layers=cfg.layers, attention_head_dim=24,
            num_attention_heads=cfg.width // 24, joint_attention_dim=2 * h, caption_projection_dim=cfg.width,
            pooled_projection_dim=2 * h, out_channels=4, pos_embed_max_size=16)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=te1,
                                    tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok2, text_encoder_3=te3,
                                    tokenizer_3=tok3)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _log(msg: str, t0: float):
    print(f"[{(time.perf_counter() - t0) / 60:5.1f} min] {msg}", flush=True)


def train_vae(pipe, images: torch.Tensor, cfg: PretrainConfig, t0: float) -> None:
    vae = pipe.vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    for step in range(cfg.vae_steps):
        lr = cfg.vae_lr * 0.5 * (1 + math.cos(math.pi * step / cfg.vae_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        x = images[torch.randint(len(images), (cfg.vae_batch,), generator=g)] * 2 - 1
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % cfg.log_every == 0:
            psnr = 10 * math.log10(4 / F.mse_loss(rec, x).item())
            _log(f"vae {step + 1}/{cfg.vae_steps} loss {loss.item():.5f} psnr {psnr:.1f} dB", t0)
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_latents(pipe, images: torch.Tensor) -> torch.Tensor:
    """Posterior means of the pool; sets the VAE's scaling / shift factors from their statistics (as SD3 did)."""
    vae = pipe.vae
    lat = torch.cat([vae.encode(images[i:i + 512] * 2 - 1).latent_dist.mean for i in range(0, len(images), 512)])
    shift = float(lat.mean())
    scale = float(1 / (lat - shift).std())
    vae.register_to_config(shift_factor=round(shift, 4), scaling_factor=round(scale, 4))
    return (lat - vae.config.shift_factor) * vae.config.scaling_factor


def train_flow(pipe, latents: torch.Tensor, prompts: list[str], cfg: PretrainConfig, t0: float) -> None:
    modules = (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3)
    tr = modules[0]
    params = [p for m in modules for p in m.parameters()]
    for m in modules:
        m.train().requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.flow_lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(cfg.seed + 2)
    warm = max(cfg.flow_steps // 20, 1)
    for step in range(cfg.flow_steps):
        lr = cfg.flow_lr * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / cfg.flow_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(latents), (cfg.flow_batch,), generator=g)
        x0 = latents[idx]
        drop = torch.rand(cfg.flow_batch, generator=g) < cfg.cfg_dropout
        texts = ["" if d else prompts[i] for d, i in zip(drop.tolist(), idx.tolist())]
        emb, _, pooled, _ = pipe.encode_prompt(texts, None, None, do_classifier_free_guidance=False,
                                               max_sequence_length=TEXT_TOKENS)
        t = torch.sigmoid(torch.randn(cfg.flow_batch, generator=g))  # logit-normal, SD3's training density
        eps = torch.randn(x0.shape, generator=g)
        tt = t.view(-1, 1, 1, 1)
        v = tr(hidden_states=(1 - tt) * x0 + tt * eps, timestep=t * 1000, encoder_hidden_states=emb,
               pooled_projections=pooled, return_dict=False)[0]
        loss = F.mse_loss(v, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % cfg.log_every == 0:
            _log(f"flow {step + 1}/{cfg.flow_steps} loss {loss.item():.4f} lr {lr:.2e}", t0)
    for m in modules:
        m.eval().requires_grad_(False)


def pretrain(cfg: PretrainConfig) -> StableDiffusion3Pipeline:
    t0 = time.perf_counter()
    train, _ = world.split_prompts(seed=0)
    images, prompts, _ = world.make_dataset(cfg.pool, cfg.seed, train)
    _log(f"rendered {len(images)} training images from {len(train)} train prompts", t0)
    pipe = build_pipeline(cfg)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed + 3)
        train_vae(pipe, images, cfg, t0)
        latents = encode_latents(pipe, images)
        _log(f"latents {tuple(latents.shape)}, shift {pipe.vae.config.shift_factor}, "
             f"scale {pipe.vae.config.scaling_factor}", t0)
        train_flow(pipe, latents, prompts, cfg, t0)
    _log("done", t0)
    return pipe
