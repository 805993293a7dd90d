"""Rewards that judge a whole clip (``modality = "video"``): they get (N, frames, 3, H, W) in [0, 1].

Image rewards need nothing from here: on clips they score frame-wise (rewards.base).
"""
from __future__ import annotations

from torch import Tensor

from .base import Reward, register


@register("temporal_consistency")
class TemporalConsistency(Reward):
    """1 − the mean absolute pixel change between consecutive frames: 1 for a still clip, lower the more it
    flickers. A regulariser to pair with a frame-wise content reward (alone it rewards freezing)."""

    modality = "video"

    def score(self, clips: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
        if clips.shape[1] < 2:
            raise ValueError(f"reward {self.label!r}: needs clips of at least 2 frames, got {clips.shape[1]}")
        return 1.0 - (clips[:, 1:] - clips[:, :-1]).abs().float().mean(dim=(1, 2, 3, 4))
