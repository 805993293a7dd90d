"""Stable Diffusion 3 / 3.5 (StableDiffusion3Pipeline) as a flow policy."""
from __future__ import annotations

import copy
import math

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


def unshift(scheduler, sigma: float, mu: float | None = None) -> float:
    """The unshifted time u whose shifted value is ``sigma`` under the scheduler's own time shift (the inverse
    of set_timesteps' shifting: static, or resolution-dependent exponential / linear with ``mu``)."""
    cfg = scheduler.config
    for opt in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas"):
        if cfg.get(opt):
            raise ValueError(f"re-discretising the grid needs a plain time shift; the scheduler sets {opt}")
    if cfg.get("use_dynamic_shifting"):
        if mu is None:
            raise ValueError("the scheduler shifts by resolution: mu is needed")
        a = math.exp(mu) if cfg.get("time_shift_type", "exponential") == "exponential" else mu
        return 1.0 / (1.0 + a * (1.0 / sigma - 1.0))
    s = float(scheduler.shift)
    return sigma / (s - (s - 1.0) * sigma)


def _tail(scheduler, u_start: float, points: int, device, mu: float | None) -> Grid:
    u = torch.linspace(u_start, 0.0, points, dtype=torch.float64)[:-1]
    return flow_grid(scheduler, points - 1, device, mu=mu, sigmas=u.tolist())


def flow_tail_grid(scheduler, sigma_start: float, points: int, device, mu: float | None = None) -> Grid:
    """``points`` grid points from ``sigma_start`` to 0, evenly spaced in unshifted time and shifted by the
    scheduler itself (MixGRPO-Flash's re-discretised tail; its first point is sigma_start up to rounding).

    A scheduler with ``shift_terminal`` (Qwen-Image) stretches every grid it makes so that its last non-zero
    point is shift_terminal; the stretch depends on the whole grid, so the unshifted start is found by bisection
    (the first point rises with it) instead of inverting the shift. A one-step tail is then just
    [sigma_start, 0]."""
    if points < 2:
        raise ValueError(f"a tail grid needs at least 2 points, got {points}")
    sigma_start = float(sigma_start)
    terminal = scheduler.config.get("shift_terminal")
    if not terminal:
        return _tail(scheduler, unshift(scheduler, sigma_start, mu), points, device, mu)
    if points == 2:
        sigmas = torch.tensor([sigma_start, 0.0], device=device)
        return Grid(timesteps=sigmas[:1] * scheduler.config.num_train_timesteps, sigmas=sigmas)
    if not terminal < sigma_start <= 1:
        raise ValueError(f"a tail under shift_terminal {terminal} must start above it, got sigma {sigma_start}")
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float(_tail(scheduler, mid, points, "cpu", mu).sigmas[0]) < sigma_start else (lo, mid)
    return _tail(scheduler, hi, points, device, mu)


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

    def _mu(self, height, width) -> float | None:
        cfg = self.pipe.scheduler.config
        if not cfg.get("use_dynamic_shifting", None):
            return None
        _, lh, lw = self.latent_shape(height, width)  # as the pipeline: shift from the image token count
        p = self.denoiser.config.patch_size
        return calculate_shift((lh // p) * (lw // p), cfg.get("base_image_seq_len", 256),
                               cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                               cfg.get("max_shift", 1.16))

    def grid(self, num_steps, height=None, width=None):
        return flow_grid(self.pipe.scheduler, num_steps, self.device, mu=self._mu(height, width))

    def tail_grid(self, sigma_start, points, height=None, width=None):
        return flow_tail_grid(self.pipe.scheduler, sigma_start, points, self.device, self._mu(height, width))

    def forward(self, x, timesteps, cond, shared, guidance_scale):
        return self.denoiser(hidden_states=x, timestep=timesteps, encoder_hidden_states=cond["encoder_hidden_states"],
                             pooled_projections=cond["pooled_projections"], return_dict=False)[0]

    @torch.no_grad()
    def decode(self, latents):
        vae = self.pipe.vae
        z = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        return (vae.decode(z, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)
