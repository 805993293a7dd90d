"""Objectives by the name a recipe uses (``training.objective``); base.py has the interface."""
from flowrl.train.objectives.base import Objective
from flowrl.train.objectives.grpo import GRPO
from flowrl.train.objectives.nft import NFT

OBJECTIVES: dict[str, type[Objective]] = {"grpo": GRPO, "nft": NFT}

__all__ = ["GRPO", "NFT", "OBJECTIVES", "Objective"]
