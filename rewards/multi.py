"""Several rewards scored together, kept apart.

Output keys follow the base convention: one key per component (its main score, the one its weight
applies to) plus ``component/sub`` extras for logging. There is no summing here: advantages combine
the components (``flowrl.core.combine_rewards(mr.main_scores(scores), mr.weights, groups)``), since
"normalise then sum" needs each component on its own.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

from .base import Reward, build_reward, parse_reward_spec


class MultiReward:
    def __init__(self, spec: str | Sequence[str] | Mapping[str, float],
                 reward_kwargs: Mapping[str, Mapping] | None = None):
        weights = parse_reward_spec(spec)
        reward_kwargs = dict(reward_kwargs or {})
        stray = sorted(set(reward_kwargs) - set(weights))
        if stray:
            raise ValueError(f"reward kwargs given for {stray}, which are not in the spec {sorted(weights)}")
        for name, kw in reward_kwargs.items():
            if not isinstance(kw, Mapping):
                raise ValueError(f"reward {name!r}: kwargs must be a dict, got {type(kw).__name__}")
        self._weights = weights
        self.rewards: dict[str, Reward] = {}
        try:
            for name in weights:
                self.rewards[name] = build_reward(name, **reward_kwargs.get(name, {}))
        except Exception:
            self.close()  # release whatever was already built
            raise
        kinds = {r.modality for r in self.rewards.values()}
        if "text" in kinds and len(kinds) > 1:  # image rewards may join video ones (frame-wise), text neither
            self.close()
            by = {n: r.modality for n, r in self.rewards.items()}
            raise ValueError(f"rewards {by} score different things; one run's rewards share one modality")

    @property
    def modality(self) -> str:
        kinds = {r.modality for r in self.rewards.values()}
        return "video" if "video" in kinds else next(iter(kinds), "image")

    @property
    def weights(self) -> dict[str, float]:
        return dict(self._weights)

    @property
    def names(self) -> list[str]:
        return list(self._weights)

    @property
    def needs_grad(self) -> bool:
        return any(r.needs_grad for r in self.rewards.values())

    @property
    def uses_groups(self) -> bool:
        return any(r.uses_groups for r in self.rewards.values())

    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Sequence[dict] | None = None,
                 groups: Tensor | None = None) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for reward in self.rewards.values():
            out.update(reward(images, prompts, metadata, groups))
        return out

    def main_scores(self, scores: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The weighted components only (drops ``name/sub`` extras): what combine_rewards takes."""
        missing = [n for n in self._weights if n not in scores]
        if missing:
            raise ValueError(f"scores lack reward component(s) {missing}; got keys {sorted(scores)}")
        return {n: scores[n] for n in self._weights}

    def weighted_sum(self, scores: Mapping[str, Tensor]) -> Tensor:
        """sum_k w_k r_k over main scores, in sorted-name order. For logging only; training uses combine_rewards."""
        mains = self.main_scores(scores)
        total = sum(self._weights[n] * mains[n].to(torch.float64) for n in sorted(mains))
        return total.to(torch.float32)

    def to(self, device=None, dtype=None) -> "MultiReward":
        for r in self.rewards.values():
            r.to(device, dtype)
        return self

    def close(self) -> None:
        for r in self.rewards.values():
            r.close()

    def __repr__(self) -> str:
        return f"MultiReward({self._weights})"
