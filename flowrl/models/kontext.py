"""FLUX.1 Kontext (FluxKontextPipeline) as a flow policy: FLUX conditioned on the packed latent tokens of an input
image, appended after the noisy tokens in the transformer's sequence."""
from __future__ import annotations

import torch
from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

from flowrl.models.flux import FluxPolicy


class FluxKontextPolicy(FluxPolicy):
    """The sampler state is still the noisy packed latent alone: the input image's tokens are per-prompt
    conditioning (``image_latents``, in both branches under true CFG, as the pipeline feeds both passes), their
    position ids (first coordinate 1, the noisy tokens' 0) are shared, and the transformer's output on them is
    dropped.

    Input images are sized as the pipeline does: ``auto_resize`` (its ``_auto_resize``, the default) picks the
    preferred Kontext resolution (about 1 MP) nearest the image's aspect ratio, otherwise the image keeps its own
    size; either is floored to a multiple of 2 * VAE factor, and as in the pipeline every image of one ``encode``
    call goes to the size chosen for the first (the image tokens of all rows stack). The output resolution is the
    sampler's own ``height`` / ``width``: the pipeline instead rescales its height / width to ``max_area``
    (default 1024 ** 2), so to compare pass it ``max_area=height * width``.
    """

    needs_image = True

    def __init__(self, pipe, max_sequence_length: int = 512, true_cfg_scale: float = 1.0, auto_resize: bool = True):
        super().__init__(pipe, max_sequence_length=max_sequence_length, true_cfg_scale=true_cfg_scale)
        self.auto_resize = auto_resize

    def input_size(self, image) -> tuple[int, int]:
        """(height, width) in pixels the pipeline resizes ``image`` to before VAE encoding."""
        height, width = self.pipe.image_processor.get_default_height_width(image)
        if self.auto_resize:
            _, width, height = min((abs(width / height - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
        multiple = self.pipe.vae_scale_factor * 2
        return height // multiple * multiple, width // multiple * multiple

    @torch.no_grad()
    def encode(self, prompts, negative_prompt="", images=None):
        if images is None or len(images) != len(prompts):
            raise ValueError(f"FluxKontextPolicy needs one input image per prompt, got "
                             f"{'none' if images is None else len(images)} for {len(prompts)} prompts")
        cond = super().encode(prompts, negative_prompt)
        latents, ids = self._encode_images(images)
        cond.cond["image_latents"] = latents
        if cond.uncond is not None:
            cond.uncond["image_latents"] = latents
        cond.shared["image_ids"] = ids
        return cond

    def _encode_images(self, images):
        pipe, vae = self.pipe, self.pipe.vae
        height, width = self.input_size(images[0])
        pixels = torch.cat([pipe.image_processor.preprocess(pipe.image_processor.resize(im, height, width),
                                                            height, width) for im in images])
        # the pipeline's _encode_vae_image: the posterior's mode (argmax), so encoding is deterministic
        z = pipe._encode_vae_image(pixels.to(vae.device, vae.dtype), generator=None)
        n, c, h, w = z.shape
        tokens = pipe._pack_latents(z, n, c, h, w).to(self.device)
        ids = pipe._prepare_latent_image_ids(1, h // 2, w // 2, self.device, tokens.dtype)
        ids[..., 0] = 1  # tells the input image's tokens from the noisy ones at the same (row, column)
        return tokens, ids

    def forward(self, x, timesteps, cond, shared, guidance_scale):
        seq = x.shape[1]
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full((x.shape[0],), float(guidance_scale), device=x.device, dtype=torch.float32)
        img_ids = torch.cat([self._img_ids(seq, x.device, x.dtype), shared["image_ids"].to(x.dtype)])
        out = self.denoiser(hidden_states=torch.cat([x, cond["image_latents"].to(x.dtype)], dim=1),
                            timestep=timesteps.to(x.dtype) / 1000, guidance=guidance,
                            pooled_projections=cond["pooled_projections"],
                            encoder_hidden_states=cond["encoder_hidden_states"], txt_ids=shared["txt_ids"],
                            img_ids=img_ids, return_dict=False)[0]
        return out[:, :seq]
