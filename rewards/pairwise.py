"""``pairwise``: Pref-GRPO's reward. A judge compares the images of each group two by two; an image's reward is
its win rate over the other G - 1 members of its group (ties count 1/2), docs/algorithms.md §5.

A judge is a callable ``judge(images_a, images_b, prompts) -> (M,) P(a better than b)`` over M pairs, in [0, 1]:
  - ``"vlm"``: a ``vlm_judge`` (rewards/vlm.py) asked which of the two is better; ``judge_kwargs`` build it;
  - ``"reward:<name>"``: a pointwise reward's scores compared, 1 / 0 / 1/2 for a tie (the win rate is then
    the rank within the group, which makes a pairwise run comparable with its pointwise twin);
  - ``"module:callable"``: imported (with ``judge_kwargs``, even {}, a factory called with them);
  - a callable from Python.
Every group costs C(G, 2) judgements in one judge call, twice with ``both_orders`` (each pair shown in both
orders and averaged: cancels a judge's bias for the first or second image).

Groups come from the caller (``groups=``; the trainer passes each sample's prompt slot, ``flowrl eval`` the
prompt index). The images of one group must share their prompt. A group of one has no opponent: it scores
1/2, the tie value, which the group-relative advantage turns into 0 anyway; evaluating one image per prompt
therefore logs a constant 1/2 (use ``flowrl eval --num G`` for a meaningful pairwise eval).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from flowrl.core.advantages import pairwise_win_rates, preference_matrix

from .base import Reward, build_reward, register
from .server import load_callable

Judge = Callable[[Tensor, Tensor, list], Any]


class ScoreJudge:
    """A pointwise reward as a judge: a beats b when its score is higher; equal scores tie. ``PairwiseWinRate``
    scores each image once through ``scores`` and compares the numbers, instead of G - 1 times per image."""

    def __init__(self, reward: Reward):
        self.reward = reward

    def scores(self, images: Tensor, prompts: list[str], metadata: list[dict] | None = None) -> Tensor:
        return self.reward(images, prompts, metadata)[self.reward.label].detach().double().cpu()

    @staticmethod
    def compare(sa: Tensor, sb: Tensor) -> Tensor:
        return (sa > sb).double() + 0.5 * (sa == sb).double()

    def __call__(self, images_a: Tensor, images_b: Tensor, prompts: list[str]) -> Tensor:
        both = self.scores(torch.cat([images_a, images_b]), list(prompts) * 2)
        return self.compare(both[:len(prompts)], both[len(prompts):])


def build_judge(judge: str | Judge, judge_kwargs: Mapping[str, Any] | None = None) -> Judge:
    if judge_kwargs is not None and not isinstance(judge_kwargs, Mapping):
        raise ValueError(f"judge_kwargs must be a dict, got {type(judge_kwargs).__name__}")
    kwargs = dict(judge_kwargs or {})
    if callable(judge):
        if kwargs:
            raise ValueError("judge_kwargs only apply to a judge given by name")
        return judge
    if not isinstance(judge, str):
        raise ValueError(f"judge must be a callable or a name, got {type(judge).__name__}")
    if judge == "vlm":
        return build_reward("vlm_judge", **kwargs).compare
    if judge.startswith("reward:"):
        return ScoreJudge(build_reward(judge.split(":", 1)[1], **kwargs))
    if ":" not in judge:
        raise ValueError(f"unknown judge {judge!r}: use 'vlm', 'reward:<name>' or 'module:callable'")
    return load_callable(judge, kwargs if judge_kwargs is not None else None, "judge")


@register("pairwise")
class PairwiseWinRate(Reward):
    """Win rate in [0, 1] within each group (module docstring); the rates of a group average to exactly 1/2."""

    uses_groups = True

    def __init__(self, judge: str | Judge = "vlm", judge_kwargs: Mapping[str, Any] | None = None,
                 both_orders: bool = False):
        if not isinstance(both_orders, bool):
            raise ValueError(f"reward {self.name!r}: both_orders must be a bool, got {both_orders!r}")
        try:
            self.judge = build_judge(judge, judge_kwargs)
        except ValueError as e:
            raise ValueError(f"reward {self.name!r}: {e}") from None
        self.both_orders = both_orders

    def _judge(self, images: Tensor, i: list[int], j: list[int], prompts: list[str]) -> Tensor:
        p = torch.as_tensor(self.judge(images[i], images[j], prompts), dtype=torch.float64).cpu().flatten()
        if p.shape != (len(i),) or not bool(torch.isfinite(p).all()) or bool(((p < 0) | (p > 1)).any()):
            raise ValueError(f"reward {self.name!r}: the judge must return {len(i)} probabilities in [0, 1], "
                             f"got {p.tolist()[:10]}")
        return p

    def score(self, images, prompts, metadata, groups):
        members: dict[int, list[int]] = {}
        for k, g in enumerate(groups.tolist()):
            members.setdefault(g, []).append(k)
        pairs = []  # (group, position of a, position of b) with the images' indices
        for g, idx in members.items():
            mixed = sorted({prompts[k] for k in idx})
            if len(mixed) > 1:
                raise ValueError(f"reward {self.name!r}: group {g} mixes prompts {mixed[:3]}; the judge compares "
                                 "images of one prompt")
            pairs += [(g, a, b, idx[a], idx[b]) for a in range(len(idx)) for b in range(a + 1, len(idx))]
        rates = torch.full((len(prompts),), 0.5, dtype=torch.float64)
        if not pairs:
            return rates.float()
        ia, ib = [p[3] for p in pairs], [p[4] for p in pairs]
        texts = [prompts[k] for k in ia]
        if isinstance(self.judge, ScoreJudge):  # symmetric by construction: both orders give the same
            s = self.judge.scores(images, prompts, metadata)
            p_ab = ScoreJudge.compare(s[ia], s[ib])
        else:
            p_ab = self._judge(images, ia, ib, texts)
            if self.both_orders:
                p_ab = (p_ab + 1 - self._judge(images, ib, ia, texts)) / 2
        for g, idx in members.items():
            if len(idx) < 2:
                continue
            sel = [n for n, p in enumerate(pairs) if p[0] == g]
            pos_a, pos_b = torch.tensor([pairs[n][1] for n in sel]), torch.tensor([pairs[n][2] for n in sel])
            prefs = preference_matrix(pos_a, pos_b, p_ab[sel], len(idx))
            rates[idx] = pairwise_win_rates(prefs)
        return rates.float()


__all__ = ["PairwiseWinRate", "ScoreJudge", "build_judge"]
