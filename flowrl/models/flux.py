"""FLUX.1 (FluxPipeline) as a flow policy, on packed latent tokens."""
from __future__ import annotations

import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from flowrl.models.sd3 import flow_grid, flow_tail_grid
from flowrl.sampling.policy import Conditioning, Policy


class FluxPolicy(Policy):
    """The sampler state is the pipeline's packed latent, (seq, 4 * channels): every kernel is elementwise, so
    packing is invisible to it. ``guidance_scale`` feeds FLUX.1-dev's distilled guidance embedding; true CFG with
    a negative prompt (two passes per step in the pipeline, one stacked pass here) is ``true_cfg_scale`` > 1.
    """

    family = "flow"

    def __init__(self, pipe, max_sequence_length: int = 512, true_cfg_scale: float = 1.0):
        self.pipe = pipe
        self.denoiser = pipe.transformer
        self.max_sequence_length = max_sequence_length
        self.true_cfg_scale = true_cfg_scale
        self.default_height = self.default_width = pipe.default_sample_size * pipe.vae_scale_factor
        self._sizes: dict[int, tuple[int, int]] = {}  # packed sequence length -> (latent h, latent w)

    def cfg_weight(self, guidance_scale):
        return self.true_cfg_scale

    @torch.no_grad()
    def encode(self, prompts, negative_prompt=""):
        def enc(texts):
            embeds, pooled, text_ids = self.pipe.encode_prompt(prompt=texts, prompt_2=None, device=self.device,
                                                               max_sequence_length=self.max_sequence_length)
            return {"encoder_hidden_states": embeds, "pooled_projections": pooled}, text_ids

        cond, text_ids = enc(list(prompts))
        uncond = None
        if negative_prompt is not None and self.true_cfg_scale > 1:
            neg = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
            uncond, _ = enc(neg)
        return Conditioning(cond=cond, uncond=uncond, shared={"txt_ids": text_ids})

    def latent_shape(self, height=None, width=None):
        return packed_latent_shape(self, height, width)

    def _mu(self, height, width) -> float:
        return packed_mu(self, height, width)

    def grid(self, num_steps, height=None, width=None):
        cfg = self.pipe.scheduler.config
        sigmas = None if cfg.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / num_steps, num_steps)
        return flow_grid(self.pipe.scheduler, num_steps, self.device, mu=self._mu(height, width), sigmas=sigmas)

    def tail_grid(self, sigma_start, points, height=None, width=None):
        return flow_tail_grid(self.pipe.scheduler, sigma_start, points, self.device, self._mu(height, width))

    def _img_ids(self, seq, device, dtype):
        if seq not in self._sizes:
            raise ValueError(f"no resolution registered for {seq} latent tokens: call latent_shape(height, width)")
        h, w = self._sizes[seq]
        return self.pipe._prepare_latent_image_ids(1, h // 2, w // 2, device, dtype)

    def forward(self, x, timesteps, cond, shared, guidance_scale):
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full((x.shape[0],), float(guidance_scale), device=x.device, dtype=torch.float32)
        return self.denoiser(hidden_states=x, timestep=timesteps.to(x.dtype) / 1000, guidance=guidance,
                             pooled_projections=cond["pooled_projections"],
                             encoder_hidden_states=cond["encoder_hidden_states"], txt_ids=shared["txt_ids"],
                             img_ids=self._img_ids(x.shape[1], x.device, x.dtype), return_dict=False)[0]

    @torch.no_grad()
    def decode(self, latents):
        vae = self.pipe.vae
        h, w = self._sizes[latents.shape[1]]
        f = self.pipe.vae_scale_factor
        z = self.pipe._unpack_latents(latents.to(vae.dtype), h * f, w * f, f)
        z = z / vae.config.scaling_factor + vae.config.shift_factor
        return (vae.decode(z, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)


def packed_latent_shape(policy, height, width) -> tuple[int, int]:
    """(tokens, channels) of latents packed 2x2 into tokens (FLUX, Qwen-Image). The policy keeps the one
    resolution per token count in ``policy._sizes``, since decoding unpacks by the count."""
    f = policy.pipe.vae_scale_factor
    h = 2 * (int(height or policy.default_height) // (f * 2))
    w = 2 * (int(width or policy.default_width) // (f * 2))
    seq = (h // 2) * (w // 2)
    if policy._sizes.get(seq, (h, w)) != (h, w):
        raise ValueError(f"two resolutions with {seq} latent tokens in one {type(policy).__name__}; use one each")
    policy._sizes[seq] = (h, w)
    return (seq, policy.denoiser.config.in_channels)


def packed_mu(policy, height, width) -> float:
    """The scheduler's resolution-dependent shift for the generated tokens (dynamic shifting)."""
    seq = packed_latent_shape(policy, height, width)[0]
    cfg = policy.pipe.scheduler.config
    return calculate_shift(seq, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                           cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
