"""The policy interface: what the sampler MDP needs from a model (flowrl.models adapts diffusers pipelines).

An adapter encodes prompts once, predicts the model output (velocity for flows, epsilon / v for UNets) with
classifier-free guidance for a batch of states that may come from different prompts and steps, decodes latents
to images, gives the scheduler's own grid and names the trainable modules. It owns no sampling logic: that is
``flowrl.sampling``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from flowrl.sampling.kernels import Grid


@dataclass
class Conditioning:
    """Encoded prompts: per-prompt tensors (row i = prompt i) for the conditional and unconditional branch,
    plus tensors shared by every row (e.g. FLUX's text position ids)."""

    cond: dict[str, Tensor]
    uncond: dict[str, Tensor] | None = None
    shared: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(next(iter(self.cond.values())).shape[0])

    def take(self, idx: Tensor, branch: str = "cond") -> dict[str, Tensor]:
        rows = self.cond if branch == "cond" else self.uncond
        return {k: v[idx] for k, v in rows.items()}


class Policy(ABC):
    """A text-to-image model seen as the policy of the sampler MDP."""

    family: str = "flow"          # "flow" (velocity, rectified flow) or "ddim" (epsilon / v-prediction UNet)
    needs_image: bool = False     # editing models: every prompt comes with an input image (``encode(images=...)``)
    video: bool = False           # states are clips: ``decode`` gives (N, frames, 3, H, W)
    denoiser: nn.Module           # the trained network; the trainer may swap in a DDP-wrapped twin
    default_height: int
    default_width: int

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    @abstractmethod
    def encode(self, prompts: list[str], negative_prompt: str | list[str] | None = "") -> Conditioning:
        """Encode prompts once per iteration (no grad). ``negative_prompt`` None: no unconditional branch.
        Editing adapters (``needs_image``) also take ``images``: one RGB PIL image per prompt."""

    def conditioning(self, prompts: list[str], negative_prompt: str | list[str] | None = "",
                     images: list | None = None) -> Conditioning:
        """``encode`` with the input images checked against what the model takes: an editing model without
        them, or a text-to-image model given some, is an error rather than a silently different task."""
        if self.needs_image:
            if images is None or len(images) != len(prompts):
                got = "none" if images is None else len(images)
                raise ValueError(f"{type(self).__name__} edits an input image: {len(prompts)} prompts need as many "
                                 f"images, got {got} (prompt files: an 'image' field per row)")
            return self.encode(prompts, negative_prompt, images=images)
        if images is not None:
            raise ValueError(f"{type(self).__name__} is a text-to-image model: it takes no input images")
        return self.encode(prompts, negative_prompt)

    @abstractmethod
    def grid(self, num_steps: int, height: int | None = None, width: int | None = None) -> Grid:
        """The scheduler's own sampling grid for this resolution."""

    def tail_grid(self, sigma_start: float, points: int, height: int | None = None, width: int | None = None) -> Grid:
        """``points`` flow-grid points from ``sigma_start`` to 0, evenly spaced in the unshifted time and placed by
        the model's own time shift (MixGRPO-Flash's re-discretised tail). Flow adapters implement it."""
        raise NotImplementedError(f"{type(self).__name__} cannot re-discretise its sampling grid")

    def sampling_grid(self, num_steps: int, height: int | None = None, width: int | None = None) -> Grid:
        """``grid`` on the policy's device, cached per (steps, resolution, device, scheduler object): building
        it goes through the scheduler's set_timesteps, which costs more than a sampler step's own math."""
        scheduler = getattr(getattr(self, "pipe", None), "scheduler", None)
        key = (num_steps, height, width, str(self.device), id(scheduler))
        cache = self.__dict__.setdefault("_grid_cache", {})
        if key not in cache:
            cache[key] = self.grid(num_steps, height, width).to(self.device)
        return cache[key]

    @abstractmethod
    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
        """Shape of one sample's state as the sampler sees it (FLUX: packed tokens)."""

    @abstractmethod
    def forward(self, x: Tensor, timesteps: Tensor, cond: dict[str, Tensor], shared: dict[str, Any],
                guidance_scale: float) -> Tensor:
        """One batched network call on states ``x`` with per-row conditioning; returns the raw output."""

    @abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """Clean latents -> images in [0, 1], (N, 3, H, W) float32."""

    def cfg_weight(self, guidance_scale: float) -> float:
        """The classifier-free guidance weight w in v = v_u + w (v_c - v_u). FLUX overrides it: there
        ``guidance_scale`` feeds the distilled guidance embedding and true CFG has its own scale."""
        return guidance_scale

    def combine(self, out_u: Tensor, out_c: Tensor, guidance_scale: float) -> Tensor:
        """The guided output from the unconditional and conditional ones: ``v_u + w (v_c - v_u)``. Qwen-Image
        overrides it with its pipeline's norm rescale; every guided prediction (rollout, re-score, DiffusionNFT's
        guided velocity) goes through it."""
        return out_u + self.cfg_weight(guidance_scale) * (out_c - out_u)

    def uses_cfg(self, cond: Conditioning, guidance_scale: float) -> bool:
        return cond.uncond is not None and self.cfg_weight(guidance_scale) > 1

    def rows(self, cond: Conditioning, prompt_idx: Tensor, guidance_scale: float) -> dict[str, Tensor]:
        """Per-row conditioning for a batch of states of prompts ``prompt_idx``: [uncond; cond] under CFG.
        A rollout builds it once per frontier and reuses it at every step."""
        if self.uses_cfg(cond, guidance_scale):
            unc = cond.take(prompt_idx, "uncond")
            return {k: torch.cat([unc[k], v]) for k, v in cond.take(prompt_idx).items()}
        return cond.take(prompt_idx)

    def predict(self, x: Tensor, timesteps: Tensor, cond: Conditioning, prompt_idx: Tensor,
                guidance_scale: float, rows: dict[str, Tensor] | None = None, detach_uncond: bool = False) -> Tensor:
        """Model output for states ``x`` (N, ...) of prompts ``prompt_idx`` (N,) at ``timesteps`` (N,), with
        classifier-free guidance as one stacked [uncond; cond] call, as the diffusers pipelines do. float32.
        ``rows``: ``self.rows(cond, prompt_idx, guidance_scale)`` if already built. ``detach_uncond``: no
        gradient through the unconditional branch (the same forward values, so a re-scored log-prob still
        equals the rollout's)."""
        x_in = x.to(self.dtype)
        rows = self.rows(cond, prompt_idx, guidance_scale) if rows is None else rows
        if self.uses_cfg(cond, guidance_scale):
            out = self.forward(torch.cat([x_in, x_in]), torch.cat([timesteps, timesteps]), rows, cond.shared,
                               guidance_scale)
            out_u, out_c = out.float().chunk(2)  # guidance arithmetic in float32, like the kernels
            if detach_uncond:
                out_u = out_u.detach()
            return self.combine(out_u, out_c, guidance_scale)
        return self.forward(x_in, timesteps, rows, cond.shared, guidance_scale).float()

    def cfg_factor(self, cond: Conditioning, guidance_scale: float) -> int:
        return 2 if self.uses_cfg(cond, guidance_scale) else 1

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"denoiser": self.denoiser}
