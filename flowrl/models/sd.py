"""Stable Diffusion 1.x / 2.x (StableDiffusionPipeline: UNet + DDIM) as a DDIM-eta policy (DDPO)."""
from __future__ import annotations

import copy

import torch
from diffusers import DDIMScheduler

from flowrl.sampling.kernels import Grid
from flowrl.sampling.policy import Conditioning, Policy


class SDPolicy(Policy):
    """Epsilon- or v-prediction UNet sampled on the DDIM grid of the pipeline's scheduler config."""

    family = "ddim"

    def __init__(self, pipe):
        if not isinstance(pipe.scheduler, DDIMScheduler):
            # DDPO's kernel is DDIM's; convert explicitly rather than sample on another scheduler's grid
            raise TypeError(f"SDPolicy needs a DDIMScheduler, got {type(pipe.scheduler).__name__}: "
                            "set pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)")
        if pipe.unet.config.time_cond_proj_dim is not None:
            raise ValueError("guidance-distilled UNets (time_cond_proj_dim) are not supported")
        self.pipe = pipe
        self.denoiser = pipe.unet
        self.default_height = self.default_width = pipe.unet.config.sample_size * pipe.vae_scale_factor

    @torch.no_grad()
    def encode(self, prompts, negative_prompt=""):
        embeds, neg = self.pipe.encode_prompt(list(prompts), self.device, 1, negative_prompt is not None,
                                              negative_prompt=negative_prompt or None)
        return Conditioning(cond={"encoder_hidden_states": embeds},
                            uncond=None if negative_prompt is None else {"encoder_hidden_states": neg})

    def latent_shape(self, height=None, width=None):
        f = self.pipe.vae_scale_factor
        return (self.denoiser.config.in_channels, (height or self.default_height) // f,
                (width or self.default_width) // f)

    def grid(self, num_steps, height=None, width=None):
        sched = copy.deepcopy(self.pipe.scheduler)
        sched.set_timesteps(num_steps, device=self.device)
        prev = sched.timesteps - sched.config.num_train_timesteps // num_steps
        ab = sched.alphas_cumprod.to(self.device)
        ab_prev = torch.where(prev >= 0, ab[prev.clamp(min=0)], sched.final_alpha_cumprod.to(self.device))
        clip = sched.config.clip_sample_range if sched.config.clip_sample else None
        if sched.config.thresholding:
            raise ValueError("DDIM dynamic thresholding is not supported by the DDIM-eta kernel")
        return Grid(timesteps=sched.timesteps, alphas_cumprod=ab[sched.timesteps].float(),
                    alphas_cumprod_prev=ab_prev.float(), prediction_type=sched.config.prediction_type,
                    clip_sample_range=clip)

    def forward(self, x, timesteps, cond, shared, guidance_scale):
        return self.denoiser(x, timesteps, encoder_hidden_states=cond["encoder_hidden_states"], return_dict=False)[0]

    @torch.no_grad()
    def decode(self, latents):
        vae = self.pipe.vae
        return (vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0].float() / 2
                + 0.5).clamp(0, 1)
