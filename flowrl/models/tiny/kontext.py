"""Tiny random-weight FLUX.1 Kontext pipeline: the tiny FLUX modules behind the real FluxKontextPipeline code path."""
from __future__ import annotations

import torch
from diffusers import FluxKontextPipeline

from flowrl.models.tiny import _build, tiny_flux_builders


def tiny_flux_kontext_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32) -> FluxKontextPipeline:
    """FLUX.1-Kontext-dev-like: the tiny FLUX.1-dev (same weights for the same seed), no IP-adapter image encoder.

    64x64 images: call the pipeline with ``height=width=64, max_area=64 * 64, _auto_resize=False`` and a 64x64
    input image, or it scales the output to about 1024x1024 and the input to a preferred Kontext resolution.
    """
    return _build(seed, dtype, FluxKontextPipeline, tiny_flux_builders())
