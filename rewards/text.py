"""Rewards on language-model completions: the same interface and registry as the image rewards, scoring
``(completions: list[str], prompts, metadata, groups)`` instead of decoded images.

The LLM trainer adds two metadata fields to every sample before scoring: ``completion_tokens`` (the number of
generated tokens, eos included) and ``truncated`` (the completion hit the length limit without an eos), so
length-aware rewards (DAPO's soft overlong penalty) need no tokenizer of their own.
"""
from __future__ import annotations

import re
from typing import Sequence

import torch
from torch import Tensor

from .base import Reward, register


class TextReward(Reward):
    """Base class of completion rewards: ``score(completions, prompts, metadata)``."""

    modality = "text"

    def score(self, completions: list[str], prompts: list[str], metadata: list[dict]) -> Tensor | dict[str, Tensor]:
        raise NotImplementedError

    def _check_samples(self, completions) -> int:
        who = f"reward {self.label!r}"
        if isinstance(completions, str) or not isinstance(completions, Sequence):
            raise ValueError(f"{who}: completions must be a list of str, got {type(completions).__name__}")
        if not completions:
            raise ValueError(f"{who}: got an empty batch of completions")
        bad = [i for i, c in enumerate(completions) if not isinstance(c, str)]
        if bad:
            raise ValueError(f"{who}: completions must be str; not at indices {bad[:10]}")
        return len(completions)


def _field(metadata: list[dict], key: str, who: str) -> list:
    missing = [i for i, m in enumerate(metadata) if key not in m]
    if missing:
        raise ValueError(f"reward {who!r} needs metadata[{key!r}] for every sample; missing at indices {missing[:10]} "
                         f"(prompt files give it as a jsonl field)")
    return [m[key] for m in metadata]


@register("exact_answer")
class ExactAnswer(TextReward):
    """1 when the completion, stripped, matches ``pattern`` and its answer (the pattern's first group, or the
    whole match) equals ``metadata["answer"]`` as a string; else 0. Extras: ``format`` (the pattern matched) and
    ``correct`` (the same as the score). The default pattern is an integer, the arithmetic task's format; the
    GSM8K recipes (configs/llm_gsm8k_*.yaml) take a chat model's last boxed answer."""

    main_key = "correct"

    def __init__(self, pattern: str = r"-?\d+", strip_chars: str = ""):
        try:
            self.pattern = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"reward 'exact_answer': pattern {pattern!r} is not a regular expression: {e}") from None
        self.strip = str.maketrans("", "", strip_chars)  # e.g. ",$" so that "$1,000" answers "1000"

    def answer(self, completion: str) -> str | None:
        m = self.pattern.fullmatch(completion.strip())
        if m is None:
            return None
        return (m.group(1) if m.groups() else m.group(0)).strip().translate(self.strip)

    def score(self, completions, prompts, metadata):
        answers = [str(a) for a in _field(metadata, "answer", self.label)]
        parsed = [self.answer(c) for c in completions]
        correct = torch.tensor([float(p is not None and p == a) for p, a in zip(parsed, answers)])
        return {"correct": correct, "format": torch.tensor([float(p is not None) for p in parsed])}


@register("answer_format")
class AnswerFormat(TextReward):
    """1 when the stripped completion matches ``pattern`` in full (and, with ``require_eos``, was not cut by the
    length limit), else 0: the format part of a correctness + format reward."""

    def __init__(self, pattern: str = r"-?\d+", require_eos: bool = True):
        try:
            self.pattern = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"reward 'answer_format': pattern {pattern!r} is not a regular expression: {e}") from None
        self.require_eos = require_eos

    def score(self, completions, prompts, metadata):
        cut = _field(metadata, "truncated", self.label) if self.require_eos else [False] * len(completions)
        return torch.tensor([float(self.pattern.fullmatch(c.strip()) is not None and not t)
                             for c, t in zip(completions, cut)])


def soft_overlong_penalty(lengths: Tensor, max_length: int, cache: int) -> Tensor:
    """DAPO's soft overlong punishment: 0 up to ``max_length - cache`` tokens, falling linearly to -1 at
    ``max_length``, and -1 beyond it."""
    if not 0 < cache <= max_length:
        raise ValueError(f"soft overlong penalty needs 0 < cache <= max_length, got cache={cache}, "
                         f"max_length={max_length}")
    n = lengths.to(torch.float64)
    start = max_length - cache
    return torch.where(n <= start, torch.zeros_like(n), ((start - n) / cache).clamp(min=-1.0)).to(torch.float32)


@register("overlong")
class Overlong(TextReward):
    """DAPO's soft overlong penalty on ``metadata["completion_tokens"]`` (soft_overlong_penalty); weight it 1.0
    next to a correctness reward as the paper does."""

    def __init__(self, max_length: int, cache: int):
        soft_overlong_penalty(torch.zeros(1), max_length, cache)  # bad bounds fail at construction
        self.max_length, self.cache = max_length, cache

    def score(self, completions, prompts, metadata):
        lengths = torch.tensor([int(n) for n in _field(metadata, "completion_tokens", self.label)])
        return soft_overlong_penalty(lengths, self.max_length, self.cache)
