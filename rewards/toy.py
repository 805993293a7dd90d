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

    ``verdict_bonus`` adds that much of the verdict (the strict one with ``strict=True``) to a dense or soft score:
    partial credit ranks a group whose samples all fail, the bonus makes passing the check itself worth more than
    any partial credit (in the dense score one shape beyond two named ones costs only 1/9).
    """

    main_key = "score"

    def __init__(self, mode: str = "dense", strict: bool = False, verdict_bonus: float = 0.0):
        if mode not in MODES:
            raise ValueError(f"reward {self.name!r}: mode must be one of {MODES}, got {mode!r}")
        if not isinstance(strict, bool):
            raise ValueError(f"reward {self.name!r}: strict must be true or false, got {strict!r}")
        if isinstance(verdict_bonus, bool) or not isinstance(verdict_bonus, (int, float)) or not verdict_bonus >= 0:
            raise ValueError(f"reward {self.name!r}: verdict_bonus must be a number >= 0, got {verdict_bonus!r}")
        if verdict_bonus and mode == "binary":
            raise ValueError(f"reward {self.name!r}: verdict_bonus adds the verdict to a dense or soft score; "
                             "mode binary is the verdict already")
        self.mode, self.strict, self.verdict_bonus = mode, strict, float(verdict_bonus)

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
        verdict = strict if self.strict else correct
        if self.mode == "soft":
            soft = torch.tensor([g["soft_score"] for g in grades], dtype=torch.float32)
            return {"score": soft + self.verdict_bonus * verdict, "dense": dense, "correct": correct, "strict": strict}
        if self.mode == "binary":
            return {"score": verdict, "correct": correct, "strict": strict}
        return {"score": dense + self.verdict_bonus * verdict, "correct": correct, "strict": strict}


__all__ = ["ShapesReward", "MODES"]
