"""Rewards computed from pixels alone: no model, no download. Useful for DDPO-style baselines and tests."""
from __future__ import annotations

import io
import re
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .base import Reward, register

JPEG_QUALITY = 95  # DDPO's setting


def _jpeg_kb(images: Tensor, quality: int) -> Tensor:
    # quantise exactly as an image file would hold it; the clamp only absorbs the base's range tolerance
    u8 = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for arr in u8:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


def _check_quality(reward: str, quality) -> int:
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 95:
        raise ValueError(f"reward {reward!r}: quality must be an int in [1, 95], got {quality!r}")
    return quality


@register("jpeg_compressibility")
class JpegCompressibility(Reward):
    """-size in kB of the image saved as JPEG (PIL, quality 95): smaller files, i.e. simpler images, score higher."""

    sign = -1.0

    def __init__(self, quality: int = JPEG_QUALITY):
        self.quality = _check_quality(self.name, quality)

    def score(self, images, prompts, metadata):
        return self.sign * _jpeg_kb(images, self.quality)


@register("jpeg_incompressibility")
class JpegIncompressibility(JpegCompressibility):
    """+size in kB of the JPEG: the exact negative of jpeg_compressibility."""

    sign = 1.0


def _unit(reward: str, arg: str, x) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not (0.0 <= float(x) <= 1.0):
        raise ValueError(f"reward {reward!r}: {arg} must be a number in [0, 1], got {x!r}")
    return float(x)


@register("brightness")
class Brightness(Reward):
    """Mean pixel value over all channels, in [0, 1]; with ``target``: -|mean - target|.

    A plain channel mean, not luma: it is what "brightness" rewards in the RL literature mean, and a
    target of 0.5 is then mid-grey whatever the hue. Differentiable.
    """

    def __init__(self, target: float | None = None):
        self.target = None if target is None else _unit(self.name, "target", target)

    def score(self, images, prompts, metadata):
        mean = images.float().mean(dim=(1, 2, 3))
        return mean if self.target is None else -(mean - self.target).abs()


# Targets for colour words, as RGB in [0, 1]. Matched as whole words, case-insensitive.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
    "gray": (0.5, 0.5, 0.5),
    "grey": (0.5, 0.5, 0.5),
    "orange": (1.0, 0.5, 0.0),
    "purple": (0.5, 0.0, 0.5),
    "pink": (1.0, 0.75, 0.8),
    "brown": (0.6, 0.3, 0.0),
}
_COLOR_RE = re.compile(r"\b(" + "|".join(sorted(COLORS, key=len, reverse=True)) + r")\b", re.IGNORECASE)


def color_from_prompt(prompt: str) -> tuple[float, float, float] | None:
    """RGB of the first colour word in the prompt, or None. "a red cube on a blue mat" -> red."""
    m = _COLOR_RE.search(prompt)
    return COLORS[m.group(1).lower()] if m else None


@register("color")
class Color(Reward):
    """-L2 distance between the image's mean colour and a target RGB, in [-sqrt(3), 0].

    Mean colour rather than "fraction of pixels near the target": it is smooth and differentiable, and
    needs no distance threshold. Target: ``rgb`` (default red), or with ``from_prompt`` the first colour
    word of each prompt (see COLORS), falling back to ``rgb``; with ``rgb=None`` a prompt without a
    colour word is an error.
    """

    def __init__(self, rgb: Sequence[float] | None = (1.0, 0.0, 0.0), from_prompt: bool = False):
        if not isinstance(from_prompt, bool):
            raise ValueError(f"reward {self.name!r}: from_prompt must be a bool, got {from_prompt!r}")
        if rgb is not None:
            if isinstance(rgb, str) or not isinstance(rgb, Sequence) or len(rgb) != 3:
                raise ValueError(f"reward {self.name!r}: rgb must be 3 numbers in [0, 1], got {rgb!r}")
            rgb = tuple(_unit(self.name, "rgb", c) for c in rgb)
        elif not from_prompt:
            raise ValueError(f"reward {self.name!r}: rgb=None needs from_prompt=True (no target colour otherwise)")
        self.rgb, self.from_prompt = rgb, from_prompt

    def targets(self, prompts: list[str]) -> list[tuple[float, float, float]]:
        if not self.from_prompt:
            return [self.rgb] * len(prompts)
        out = []
        for p in prompts:
            rgb = color_from_prompt(p) or self.rgb
            if rgb is None:
                raise ValueError(f"reward {self.name!r}: prompt {p!r} names no colour (known: {sorted(COLORS)}) "
                                 "and no default rgb is set")
            out.append(rgb)
        return out

    def score(self, images, prompts, metadata):
        target = torch.tensor(self.targets(prompts), dtype=torch.float32, device=images.device)
        mean = images.float().mean(dim=(2, 3))
        # vector_norm's gradient is 0 (not NaN) when the mean hits the target exactly
        return -torch.linalg.vector_norm(mean - target, dim=1)


__all__ = ["JpegCompressibility", "JpegIncompressibility", "Brightness", "Color", "COLORS", "color_from_prompt",
           "JPEG_QUALITY"]
