"""Stable Diffusion 3 / 3.5 (StableDiffusion3Pipeline) as a flow policy."""
from __future__ import annotations

import copy

import torch
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps

from flowrl.sampling.kernels import Grid
from flowrl.sampling.policy import Conditioning, Policy


def flow_grid(scheduler, num_steps: int, device, mu: float | None = None, sigmas=None) -> Grid:
    """The grid a FlowMatchEulerDiscreteScheduler produces, on a copy (the pipeline's scheduler is untouched)."""
    sched = copy.deepcopy(scheduler)
    kwargs = {"mu": mu} if mu is not None else {}
    timesteps, _ = retrieve_timesteps(sched, num_steps, device, sigmas=sigmas, **kwargs)
    return Grid(timesteps=timesteps, sigmas=sched.sigmas.to(device=device, dtype=torch.float32))


class SD3Policy(Policy):
    """Velocity v = eps - x0 from SD3Transformer2DModel; CFG as the pipeline does it (stacked [uncond; cond]).

    ``max_sequence_length`` is the T5 length (256 in the pipeline; short lengths make tiny models fast).
    """

    family = "flow"

    def __init__(self, pipe, max_sequence_length: int = 256):
        self.pipe = pipe
        self.denoiser = pipe.transformer
        self.max_sequence_length = max_sequence_length
        self.default_height = self.default_width = pipe.default_sample_size * pipe.vae_scale_factor

    @torch.no_grad()
    def encode(self, prompts, negative_prompt=""):
        embeds, neg_embeds, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=self.device,
            do_classifier_free_guidance=negative_prompt is not None, negative_prompt=negative_prompt,
            max_sequence_length=self.max_sequence_length)
        uncond = None
        if negative_prompt is not None:
            uncond = {"encoder_hidden_states": neg_embeds, "pooled_projections": neg_pooled}
        return Conditioning(cond={"encoder_hidden_states": embeds, "pooled_projections": pooled}, uncond=uncond)

    def _size(self, height, width):
        return height or self.default_height, width or self.default_width

    def latent_shape(self, height=None, width=None):
        h, w = self._size(height, width)
        f = self.pipe.vae_scale_factor
        return (self.denoiser.config.in_channels, h // f, w // f)

    def grid(self, num_steps, height=None, width=None):
        mu = None
        cfg = self.pipe.scheduler.config
        if cfg.get("use_dynamic_shifting", None):  # as the pipeline: shift from the image token count
            _, lh, lw = self.latent_shape(height, width)
            p = self.denoiser.config.patch_size
            mu = calculate_shift((lh // p) * (lw // p), cfg.get("base_image_seq_len", 256),
                                 cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                                 cfg.get("max_shift", 1.16))
        return flow_grid(self.pipe.scheduler, num_steps, self.device, mu=mu)

    def forward(self, x, timesteps, cond, shared, guidance_scale):
        return self.denoiser(hidden_states=x, timestep=timesteps, encoder_hidden_states=cond["encoder_hidden_states"],
                             pooled_projections=cond["pooled_projections"], return_dict=False)[0]

    @torch.no_grad()
    def decode(self, latents):
        vae = self.pipe.vae
        z = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        return (vae.decode(z, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)
