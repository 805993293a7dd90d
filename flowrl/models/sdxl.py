"""Stable Diffusion XL (StableDiffusionXLPipeline) as a DDIM-eta policy: the SD 1.x adapter plus SDXL's two text
encoders, pooled embedding and micro-conditioning time ids."""
from __future__ import annotations

import torch

from flowrl.models.sd import SDPolicy
from flowrl.sampling.policy import Conditioning


class SDXLPolicy(SDPolicy):
    """The UNet is conditioned on the concatenated hidden states of both CLIPs, and through ``added_cond_kwargs``
    on the second CLIP's pooled embedding and the time ids (original size, crop top-left, target size), which
    the pipeline builds from the requested resolution: here from the state's own latent size, no crop."""

    @torch.no_grad()
    def encode(self, prompts, negative_prompt=""):
        # SDXL's convention: an empty negative prompt is all-zero embeddings (force_zeros_for_empty_prompt), which
        # the pipeline applies when negative_prompt is None: "" means the same here, as in the pipeline's default
        cfg = negative_prompt is not None
        neg = None if negative_prompt == "" and self.pipe.config.force_zeros_for_empty_prompt else negative_prompt
        embeds, neg_embeds, pooled, neg_pooled = self.pipe.encode_prompt(
            list(prompts), device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=cfg,
            negative_prompt=neg)
        uncond = {"encoder_hidden_states": neg_embeds, "text_embeds": neg_pooled} if cfg else None
        return Conditioning(cond={"encoder_hidden_states": embeds, "text_embeds": pooled}, uncond=uncond)

    def _time_ids(self, x, pooled):
        size = (x.shape[-2] * self.pipe.vae_scale_factor, x.shape[-1] * self.pipe.vae_scale_factor)
        ids = self.pipe._get_add_time_ids(size, (0, 0), size, dtype=pooled.dtype,
                                          text_encoder_projection_dim=int(pooled.shape[-1]))
        return ids.to(x.device).expand(x.shape[0], -1)

    def forward(self, x, timesteps, cond, shared, guidance_scale):
        pooled = cond["text_embeds"]
        added = {"text_embeds": pooled, "time_ids": self._time_ids(x, pooled)}
        return self.denoiser(x, timesteps, encoder_hidden_states=cond["encoder_hidden_states"],
                             added_cond_kwargs=added, return_dict=False)[0]

    @torch.no_grad()
    def decode(self, latents):
        vae = self.pipe.vae
        z = latents.to(vae.dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:  # VAEs trained with per-channel latent statistics
            shape = (1, -1, 1, 1)
            z = z * torch.tensor(std, device=z.device, dtype=z.dtype).view(shape) / vae.config.scaling_factor + \
                torch.tensor(mean, device=z.device, dtype=z.dtype).view(shape)
        else:
            z = z / vae.config.scaling_factor
        return (vae.decode(z, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)
