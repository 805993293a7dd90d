"""Qwen-Image (QwenImagePipeline) and Qwen-Image-Edit (QwenImageEditPipeline) as flow policies, on packed latent
tokens (2x2 patches of the VAE latent, as the pipelines pack them)."""
from __future__ import annotations

import numpy as np
import torch
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit

from flowrl.models.flux import packed_latent_shape, packed_mu
from flowrl.models.sd3 import flow_grid, flow_tail_grid
from flowrl.sampling.policy import Conditioning, Policy


def _pad(t, length):
    """Zero-pad dim 1 of (N, L, ...) to ``length`` (text embeddings and their mask; padded keys are masked out)."""
    return torch.cat([t, t.new_zeros(t.shape[0], length - t.shape[1], *t.shape[2:])], dim=1)


class QwenImagePolicy(Policy):
    """The sampler state is the pipeline's packed latent, (seq, 4 * z channels).

    Guidance is Qwen-Image's true CFG with the sampler's ``guidance_scale`` as the pipeline's ``true_cfg_scale``
    (the transformer has no distilled guidance embedding, so there is nothing else for it to mean), and the
    pipeline's rescale: the guided velocity is scaled per token back to the conditional velocity's norm over the
    packed channels, ``comb * (|v_c| / |comb|)`` (``combine``, which the rollout, every re-score and DiffusionNFT's
    guided velocity use).

    Text embeddings are the Qwen2.5-VL last hidden states after the template's system prefix; rows of different
    lengths are zero-padded to one length with ``encoder_hidden_states_mask`` (the uncond rows too, so both
    branches stack). ``max_sequence_length`` truncates them, as the pipeline does (its default is 512).
    """

    family = "flow"

    def __init__(self, pipe, max_sequence_length: int = 512):
        if pipe.transformer.config.guidance_embeds:
            raise ValueError("guidance-distilled Qwen-Image transformers (guidance_embeds) are not supported")
        self.pipe = pipe
        self.denoiser = pipe.transformer
        self.max_sequence_length = max_sequence_length
        self.default_height = self.default_width = pipe.default_sample_size * pipe.vae_scale_factor
        self._sizes: dict[int, tuple[int, int]] = {}  # packed sequence length -> (latent h, latent w)

    # ------------------------------------------------------------------------------------------- text
    def _encode_text(self, texts, **kw):
        embeds, mask = self.pipe.encode_prompt(prompt=list(texts), device=self.device,
                                               max_sequence_length=self.max_sequence_length, **kw)
        if mask is None:  # the pipeline drops an all-ones mask
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask}

    @torch.no_grad()
    def encode(self, prompts, negative_prompt="", **kw):
        cond, uncond = self._encode_text(prompts, **kw), None
        if negative_prompt is not None:  # the pipeline guides only with a negative prompt (" " is Qwen's usual)
            neg = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
            uncond = self._encode_text(neg, **kw)
        branches = [cond] + ([uncond] if uncond is not None else [])
        length = max(b["encoder_hidden_states"].shape[1] for b in branches)
        for b in branches:
            for k in list(b):
                b[k] = _pad(b[k], length)
        # as in the pipeline, no mask at all when no row is padded (another attention path, not bitwise the same)
        full = all(bool(b["encoder_hidden_states_mask"].all()) for b in branches)
        return Conditioning(cond=cond, uncond=uncond, shared={"text_mask": not full})

    # ------------------------------------------------------------------------------------------- grid
    def latent_shape(self, height=None, width=None):
        return packed_latent_shape(self, height, width)

    def _mu(self, height, width) -> float:
        return packed_mu(self, height, width)  # the noisy tokens only, also for edit

    def grid(self, num_steps, height=None, width=None):
        cfg = self.pipe.scheduler.config
        sigmas = None if cfg.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / num_steps, num_steps)
        return flow_grid(self.pipe.scheduler, num_steps, self.device, mu=self._mu(height, width), sigmas=sigmas)

    def tail_grid(self, sigma_start, points, height=None, width=None):
        return flow_tail_grid(self.pipe.scheduler, sigma_start, points, self.device, self._mu(height, width))

    # ------------------------------------------------------------------------------------------- model
    def _img_shapes(self, seq, n, extra=()):
        if seq not in self._sizes:
            raise ValueError(f"no resolution registered for {seq} latent tokens: call latent_shape(height, width)")
        h, w = self._sizes[seq]
        return [[(1, h // 2, w // 2), *extra]] * n

    def _transformer(self, hidden, timesteps, cond, shared, img_shapes):
        return self.denoiser(hidden_states=hidden, timestep=timesteps.to(hidden.dtype) / 1000,
                             encoder_hidden_states=cond["encoder_hidden_states"],
                             encoder_hidden_states_mask=cond["encoder_hidden_states_mask"] if shared["text_mask"]
                             else None, img_shapes=img_shapes, return_dict=False)[0]

    def forward(self, x, timesteps, cond, shared, guidance_scale):
        return self._transformer(x, timesteps, cond, shared, self._img_shapes(x.shape[1], x.shape[0]))

    def combine(self, out_u, out_c, guidance_scale):
        """The pipeline's true CFG: ``v_u + w (v_c - v_u)`` rescaled per token to the norm of ``v_c``."""
        comb = out_u + self.cfg_weight(guidance_scale) * (out_c - out_u)
        return comb * (torch.norm(out_c, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))

    @torch.no_grad()
    def decode(self, latents):
        pipe, vae = self.pipe, self.pipe.vae
        h, w = self._sizes[latents.shape[1]]
        f = pipe.vae_scale_factor
        z = pipe._unpack_latents(latents.to(vae.dtype), h * f, w * f, f)  # (N, z, 1, h, w): one frame
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(z.device, z.dtype)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(z.device, z.dtype)
        images = vae.decode(z * std + mean, return_dict=False)[0][:, :, 0]
        return (images.float() / 2 + 0.5).clamp(0, 1)


class QwenImageEditPolicy(QwenImagePolicy):
    """Qwen-Image conditioned on an input image twice: the Qwen2.5-VL encoder sees it through the processor
    (its vision tokens sit inside the kept part of the prompt embeddings), and its VAE latent, normalised by
    latents_mean / std and packed, is appended after the noisy tokens (``image_latents``, both branches; its
    RoPE shape is the second ``img_shapes`` entry, shared); the transformer's output on it is dropped.

    Input images are sized as the pipeline does: the aspect ratio of the first image of an ``encode`` call at
    ``image_area`` pixels (None: the pipeline's hard-coded 1024 ** 2), rounded to multiples of 32, for every image of
    the call (their tokens stack); each image is resized to it for both the VAE and the VL processor, which is
    what the pipeline does for one image (handed a list, its resize leaves the images as they are for the VL
    processor). The output resolution is the sampler's ``height`` / ``width`` (the pipeline's default is the
    computed size). ``max_sequence_length`` is accepted and unused: the edit pipeline does not truncate (its
    sequences hold the image's vision tokens).
    """

    needs_image = True

    def __init__(self, pipe, max_sequence_length: int = 512, image_area: int | None = None):
        super().__init__(pipe, max_sequence_length=max_sequence_length)
        if image_area is not None and image_area < 32 * 32:
            raise ValueError(f"image_area must be at least 32 * 32 pixels, got {image_area}")
        self.image_area = 1024 * 1024 if image_area is None else image_area

    def input_size(self, image) -> tuple[int, int]:
        """(height, width) in pixels the pipeline resizes ``image`` to."""
        width, height, _ = pipeline_qwenimage_edit.calculate_dimensions(self.image_area, image.size[0] / image.size[1])
        return height, width

    @torch.no_grad()
    def encode(self, prompts, negative_prompt="", images=None):
        if images is None or len(images) != len(prompts):
            raise ValueError(f"QwenImageEditPolicy needs one input image per prompt, got "
                             f"{'none' if images is None else len(images)} for {len(prompts)} prompts")
        pipe, vae = self.pipe, self.pipe.vae
        height, width = self.input_size(images[0])
        images = [pipe.image_processor.resize(im, height, width) for im in images]
        cond = super().encode(prompts, negative_prompt, image=images)
        pixels = pipe.image_processor.preprocess(images, height, width).unsqueeze(2)  # one frame for the 3D VAE
        # the pipeline's _encode_vae_image: the posterior's mode, then (z - mean) / std
        z = pipe._encode_vae_image(pixels.to(vae.device, pipe.text_encoder.dtype), generator=None)
        n, c, _, h, w = z.shape
        tokens = pipe._pack_latents(z, n, c, h, w).to(self.device)
        cond.cond["image_latents"] = tokens
        if cond.uncond is not None:
            cond.uncond["image_latents"] = tokens
        cond.shared["image_shape"] = (1, h // 2, w // 2)
        return cond

    def forward(self, x, timesteps, cond, shared, guidance_scale):
        seq = x.shape[1]
        hidden = torch.cat([x, cond["image_latents"].to(x.dtype)], dim=1)
        img_shapes = self._img_shapes(seq, x.shape[0], extra=(shared["image_shape"],))
        return self._transformer(hidden, timesteps, cond, shared, img_shapes)[:, :seq]
