"""Rewards: one interface, a registry by name, weighted multi-reward specs.

Importing this package registers every reward family but loads no weights and touches no network;
model-based rewards load in their constructors (or lazily on first call).
"""
from .base import (
    REWARDS,
    RANGE_TOL,
    Reward,
    RewardOutputError,
    build_reward,
    parse_reward_spec,
    register,
)
from .multi import MultiReward
from .ocr import OcrReward
from .pairwise import PairwiseWinRate
from .programmatic import COLORS, Brightness, Color, JpegCompressibility, JpegIncompressibility, color_from_prompt
from .remote import GenEvalRemote, RemoteReward
from .toy import ShapesReward
from .vlm import VLMJudge

__all__ = [
    "REWARDS", "RANGE_TOL", "Reward", "RewardOutputError", "build_reward", "parse_reward_spec", "register",
    "MultiReward", "COLORS", "Brightness", "Color", "JpegCompressibility", "JpegIncompressibility",
    "color_from_prompt", "ShapesReward",
    "GenEvalRemote", "OcrReward", "PairwiseWinRate", "RemoteReward", "VLMJudge",
]
