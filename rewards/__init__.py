"""Rewards: one interface, a registry by name, weighted multi-reward specs.

Importing this package registers every reward family but loads no weights, touches no network and imports
no model library; model-based rewards import transformers / open_clip and load weights in their constructors.
"""
from .aesthetic import Aesthetic
from .base import (
    RANGE_TOL,
    REWARDS,
    Reward,
    RewardOutputError,
    build_reward,
    parse_reward_spec,
    register,
)
from .clip_similarity import CLIPScore, ImageSimilarity, PickScore
from .hps import HPSv2, HPSv21
from .imagereward import ImageReward
from .model_reward import ModelReward
from .multi import MultiReward
from .ocr import OcrReward
from .pairwise import PairwiseWinRate
from .programmatic import COLORS, Brightness, Color, JpegCompressibility, JpegIncompressibility, color_from_prompt
from .remote import GenEvalRemote, RemoteReward
from .text import AnswerFormat, ExactAnswer, Overlong, TextReward, soft_overlong_penalty
from .toy import ShapesReward
from .video import TemporalConsistency
from .vlm import VLMJudge

__all__ = [
    "REWARDS", "RANGE_TOL", "Reward", "RewardOutputError", "build_reward", "parse_reward_spec", "register",
    "MultiReward", "COLORS", "Brightness", "Color", "JpegCompressibility", "JpegIncompressibility",
    "color_from_prompt", "ShapesReward", "TemporalConsistency",
    "ModelReward", "PickScore", "CLIPScore", "ImageSimilarity", "Aesthetic", "HPSv2", "HPSv21", "ImageReward",
    "GenEvalRemote", "OcrReward", "PairwiseWinRate", "RemoteReward", "VLMJudge",
    "TextReward", "ExactAnswer", "AnswerFormat", "Overlong", "soft_overlong_penalty",
]
