"""The ``remote`` reward: scores come from a reward server (rewards/server.py) over HTTP.

Construction checks ``GET /health`` (with the same retries), so a recipe whose server is down fails before any
model is loaded, with an error naming the URL. Each call POSTs the batch (images as PNG, prompts, metadata)
and returns every score the server sends: ``main_key`` becomes the reward's own name, the others
``remote/<key>`` (see rewards/base.py), e.g. GenEval's ``correct`` next to its dense score.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from .base import Reward, register
from .server import encode_png
from .transport import RemoteError, RetryPolicy, request_json


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [0, 1] -> (N, H, W, 3) uint8, rounded as an image file would store it."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def check_url(reward: str, url: Any) -> str:
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ValueError(f"reward {reward!r}: url must be an http(s) URL such as http://127.0.0.1:18085, got {url!r}")
    return url.rstrip("/")


def retry_policy(reward: str, timeout: float, retries: int, backoff: float) -> RetryPolicy:
    try:
        return RetryPolicy(timeout=timeout, retries=retries, backoff=backoff)
    except ValueError as e:
        raise ValueError(f"reward {reward!r}: {e}") from None


def _jsonable(reward: str, metadata: list[dict]) -> list[dict]:
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as e:
        raise ValueError(f"reward {reward!r}: metadata must be JSON-serialisable to reach the server: {e}") from None
    return metadata


@register("remote")
class RemoteReward(Reward):
    """Scores from the reward server at ``url``; ``main_key`` is the server's score the weight applies to.

    timeout: seconds per socket operation; a big batch through a slow detector needs a generous one.
    retries / backoff: extra attempts after a dropped connection, a timeout or a 502/503/504, pausing
        ``backoff * 2**k`` s after attempt k, so a restarting server is waited for. A scorer that raises
        (HTTP 500) fails at once with its message.
    """

    def __init__(self, url: str, main_key: str = "score", timeout: float = 120.0, retries: int = 3,
                 backoff: float = 1.0):
        self.url = check_url(self.name, url)
        if not isinstance(main_key, str) or not main_key:
            raise ValueError(f"reward {self.name!r}: main_key must be a non-empty str, got {main_key!r}")
        self.main_key = main_key
        self.policy = retry_policy(self.name, timeout, retries, backoff)
        try:
            health = request_json(f"{self.url}/health", None, self.policy)
        except RemoteError as e:
            raise RemoteError(f"reward {self.name!r}: no reward server answers at {self.url} ({e}); start one "
                              f"with `python -m rewards.server --scorer module:callable --port PORT`") from None
        self.scorer = health.get("scorer", "?") if isinstance(health, dict) else "?"

    def score(self, images, prompts, metadata):
        payload = {"images": [encode_png(a) for a in to_uint8(images)], "prompts": prompts,
                   "metadata": _jsonable(self.name, metadata)}
        try:
            answer = request_json(f"{self.url}/score", payload, self.policy)
        except RemoteError as e:
            raise RemoteError(f"reward {self.name!r} (server {self.url}, scorer {self.scorer}): {e}") from None
        scores = answer.get("scores") if isinstance(answer, dict) else None
        if not isinstance(scores, dict):
            raise RemoteError(f"reward {self.name!r}: {self.url}/score answered without a 'scores' object: "
                              f"{str(answer)[:200]}")
        def numbers(v):
            return isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)

        bad = [k for k, v in scores.items() if not numbers(v)]
        if bad:
            raise RemoteError(f"reward {self.name!r}: {self.url}/score sent non-numeric scores for {bad}")
        return {k: torch.tensor(v, dtype=torch.float32) for k, v in scores.items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.label!r}, url={self.url!r})"


@register("geneval")
class GenEvalRemote(RemoteReward):
    """GenEval through a reward server running ``rewards.geneval:GenEvalScorer`` (default port 18085).

    Main score: the dense GenEval score; extra ``geneval/correct``: GenEval's 0/1 verdict. Metadata per image
    is the prompt's GenEval dict (``tag``, ``include``, ``exclude``), checked here before anything is sent.
    """

    def __init__(self, url: str = "http://127.0.0.1:18085", main_key: str = "score", timeout: float = 300.0,
                 retries: int = 3, backoff: float = 2.0):
        super().__init__(url, main_key, timeout, retries, backoff)

    def score(self, images, prompts, metadata):
        for p, m in zip(prompts, metadata):
            if "tag" not in m or "include" not in m:
                raise ValueError(f"reward {self.name!r}: prompt {p!r} has no GenEval metadata ('tag', 'include'; "
                                 f"a GenEval .jsonl prompt file gives it), got {dict(m)!r}")
        return super().score(images, prompts, metadata)


__all__ = ["GenEvalRemote", "RemoteReward", "check_url", "retry_policy", "to_uint8"]
