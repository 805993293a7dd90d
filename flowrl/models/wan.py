"""Wan 2.1 text-to-video (WanPipeline) as a flow policy: the state is one clip's latent video."""
from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from flowrl.models.sd3 import flow_grid, flow_tail_grid
from flowrl.sampling.policy import Conditioning, Policy


class WanPolicy(Policy):
    """Velocity from WanTransformer3DModel on latents (C, F_lat, H / 8, W / 8); CFG as the pipeline does it, here
    in one stacked [uncond; cond] call. No pooled embedding: the UMT5 sequence, zero-padded past each prompt's
    tokens to ``max_sequence_length`` (512 in the pipeline), is the whole text conditioning.

    ``num_frames`` (4k + 1; 81 in the pipeline) fixes the clip length, as height and width fix the image size of
    the image adapters. The default resolution is the pipeline's, 480 x 832.
    """

    family = "flow"
    video = True

    def __init__(self, pipe, max_sequence_length: int = 512, num_frames: int = 81):
        if getattr(pipe, "transformer_2", None) is not None:
            raise ValueError("WanPolicy trains one transformer: two-expert Wan 2.2 (transformer_2) is not supported")
        temporal = pipe.vae_scale_factor_temporal
        if num_frames < 1 or (num_frames - 1) % temporal:
            raise ValueError(f"num_frames must be {temporal}k + 1 (the VAE's temporal compression), got {num_frames}")
        self.pipe = pipe
        self.denoiser = pipe.transformer
        self.max_sequence_length = max_sequence_length
        self.num_frames = num_frames
        self.default_height, self.default_width = 480, 832

    @torch.no_grad()
    def encode(self, prompts, negative_prompt=""):
        embeds, neg_embeds = self.pipe.encode_prompt(
            prompt=list(prompts), negative_prompt=negative_prompt,
            do_classifier_free_guidance=negative_prompt is not None, max_sequence_length=self.max_sequence_length,
            device=self.device)
        # the pipeline casts the embeddings to the transformer's dtype before denoising
        uncond = None if neg_embeds is None else {"encoder_hidden_states": neg_embeds.to(self.dtype)}
        return Conditioning(cond={"encoder_hidden_states": embeds.to(self.dtype)}, uncond=uncond)

    def latent_shape(self, height=None, width=None):
        h, w = height or self.default_height, width or self.default_width
        _, ph, pw = self.denoiser.config.patch_size
        f = self.pipe.vae_scale_factor_spatial
        if h % (f * ph) or w % (f * pw):
            raise ValueError(f"height and width must be multiples of {f * ph} x {f * pw} (VAE x patch), got {h} x {w}")
        frames = (self.num_frames - 1) // self.pipe.vae_scale_factor_temporal + 1
        return (self.denoiser.config.in_channels, frames, h // f, w // f)

    def _scheduler(self):
        """The pipeline's FlowMatchEulerDiscreteScheduler; the stock Wan folders ship UniPC with flow sigmas, whose
        multistep solver the flow kernels do not follow: they step on Euler's grid with the same ``flow_shift``."""
        sched = self.pipe.scheduler
        if isinstance(sched, FlowMatchEulerDiscreteScheduler):
            return sched
        if not sched.config.get("use_flow_sigmas"):
            raise ValueError(f"WanPolicy needs a flow-matching scheduler, got {type(sched).__name__}")
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=sched.config.num_train_timesteps,
                                               shift=sched.config.flow_shift)

    def grid(self, num_steps, height=None, width=None):
        # as the pipeline: set_timesteps(num_steps), no resolution-dependent shift
        return flow_grid(self._scheduler(), num_steps, self.device)

    def tail_grid(self, sigma_start, points, height=None, width=None):
        return flow_tail_grid(self._scheduler(), sigma_start, points, self.device)

    def forward(self, x, timesteps, cond, shared, guidance_scale):
        if self.pipe.config.expand_timesteps:  # Wan 2.2 TI2V: one timestep per latent token (all equal in T2V)
            _, _, frames, h, w = x.shape
            timesteps = timesteps[:, None].expand(-1, frames * ((h + 1) // 2) * ((w + 1) // 2))
        return self.denoiser(hidden_states=x, timestep=timesteps, encoder_hidden_states=cond["encoder_hidden_states"],
                             return_dict=False)[0]

    @torch.no_grad()
    def decode(self, latents):
        """Clean latents (N, C, F_lat, h, w) -> clips (N, frames, 3, H, W) float32 in [0, 1]."""
        vae = self.pipe.vae
        z = latents.to(vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(z.device, z.dtype)
        video = vae.decode(z / inv_std + mean, return_dict=False)[0]  # (N, 3, frames, H, W) in [-1, 1], as the pipeline
        return (video.float().permute(0, 2, 1, 3, 4) / 2 + 0.5).clamp(0, 1)
