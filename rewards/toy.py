"""The shapes world's GenEval-style reward: an exact, model-free detector grades each image against its prompt.

Metadata per image is the prompt's GenEval dict from ``flowrl.toy.world.all_prompts`` (with or without its
"prompt" key): "tag", "include" and, for counting, "exclude". It is the only way the reward learns what was
asked: prompt strings are not parsed.
"""
from __future__ import annotations

import torch

from flowrl.toy import geneval

from .base import Reward, register

MODES = ("dense", "soft", "binary")


@register("shapes")
class ShapesReward(Reward):
    """Main score: the dense GenEval score (fraction of the prompt's requirements met, in [0, 1]) with
    ``mode="dense"``; the same with near-miss shapes counted in part (``geneval.soft_weight``) with
    ``mode="soft"``; or GenEval's verdict as 0/1 with ``mode="binary"``. Extras: ``correct`` (the 0/1 verdict),
    ``strict`` (the verdict and no object beyond the named ones: GenEval's at-least rules pass extra copies) and,
    in soft mode, ``dense``.

    ``strict=True`` makes the score say what the prompt means: the dense scores gain the requirement "nothing
    beyond the named objects" (``named / max(named, objects)``, every colour component the detector sees counting as
    an object) and binary becomes the strict verdict. Trained on GenEval's rules alone, models learn to draw
    several copies of the named shapes, which those rules accept.

    Dense is the default because a group of samples that all fail GenEval's binary check would give
    group-relative advantages of zero; partial credit (one of two objects, three of four circles) still ranks them.
    """

    main_key = "score"

    def __init__(self, mode: str = "dense", strict: bool = False):
        if mode not in MODES:
            raise ValueError(f"reward {self.name!r}: mode must be one of {MODES}, got {mode!r}")
        if not isinstance(strict, bool):
            raise ValueError(f"reward {self.name!r}: strict must be true or false, got {strict!r}")
        self.mode, self.strict = mode, strict

    def score(self, images, prompts, metadata):
        for p, m in zip(prompts, metadata):
            if not m or "tag" not in m or "include" not in m:
                raise ValueError(f"reward {self.name!r}: prompt {p!r} has no shapes-world GenEval metadata (need "
                                 f"'tag' and 'include' as in flowrl.toy.world.all_prompts), got {dict(m)!r}")
        grades = geneval.grade_batch(images, [dict(m) for m in metadata], soft=self.mode == "soft",
                                     strict=self.strict)
        correct = torch.tensor([float(g["correct"]) for g in grades], dtype=torch.float32)
        strict = torch.tensor([float(g["strict"]) for g in grades], dtype=torch.float32)
        dense = torch.tensor([g["score"] for g in grades], dtype=torch.float32)
        if self.mode == "soft":
            soft = torch.tensor([g["soft_score"] for g in grades], dtype=torch.float32)
            return {"score": soft, "dense": dense, "correct": correct, "strict": strict}
        binary = strict if self.strict else correct
        return {"score": dense if self.mode == "dense" else binary, "correct": correct, "strict": strict}


__all__ = ["ShapesReward", "MODES"]
