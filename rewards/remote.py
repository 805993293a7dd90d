"""The ``remote`` reward: scores come from a reward server (rewards/server.py) over HTTP.

Construction checks ``GET /health`` (with the same retries), so a recipe whose server is down, or whose secret
is wrong, fails before any model is loaded, with an error naming the URL. Each call POSTs the batch (images as
PNG, prompts, metadata) and returns every score the server sends: ``main_key`` becomes the reward's own name, the
others ``remote/<key>`` (see rewards/base.py), e.g. GenEval's ``correct`` next to its dense score.

Secret. A server with a secret wants ``Authorization: Bearer <secret>``; the client reads the secret from the
environment variable ``secret_env`` names (default FLOWRL_REWARD_SECRET, unset: no header), so a recipe, and the
run folder's config.yaml written from it, hold only the variable's name.

Answers are checked before anything is returned: every score a list of exactly N finite numbers under a valid
name, the main one present. Anything else raises RemoteError, which the trainer's reward guard retries and,
if the server keeps answering junk, turns into a TrainingError naming the reward; nothing is mis-scored.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import numpy as np
import torch

from .base import Reward, register
from .server import SECRET_ENV, encode_png
from .transport import RemoteError, RetryPolicy, request_json

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [0, 1] -> (N, H, W, 3) uint8, rounded as an image file would store it."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def check_url(reward: str, url: Any) -> str:
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ValueError(f"reward {reward!r}: url must be an http(s) URL such as http://127.0.0.1:18085, got {url!r}")
    return url.rstrip("/")


def retry_policy(reward: str, timeout: float, retries: int, backoff: float) -> RetryPolicy:
    """``timeout`` bounds each attempt as a whole (its deadline) and so each socket operation in it."""
    try:
        return RetryPolicy(timeout=timeout, retries=retries, backoff=backoff, deadline=timeout)
    except ValueError as e:
        raise ValueError(f"reward {reward!r}: {e}") from None


def auth_headers(reward: str, secret_env: Any) -> dict[str, str]:
    """The bearer header from the variable ``secret_env`` names; {} when the default variable is unset."""
    if not isinstance(secret_env, str) or not _ENV_NAME.fullmatch(secret_env):
        raise ValueError(f"reward {reward!r}: secret_env must name an environment variable (the secret itself "
                         "goes in that variable, never in the recipe)")
    secret = os.environ.get(secret_env, "").strip()
    if not secret and secret_env != SECRET_ENV:
        raise ValueError(f"reward {reward!r}: secret_env {secret_env!r} names an unset environment variable")
    return {"Authorization": f"Bearer {secret}"} if secret else {}


def _jsonable(reward: str, metadata: list[dict]) -> list[dict]:
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as e:
        raise ValueError(f"reward {reward!r}: metadata must be JSON-serialisable to reach the server: {e}") from None
    return metadata


@register("remote")
class RemoteReward(Reward):
    """Scores from the reward server at ``url``; ``main_key`` is the server's score the weight applies to.

    timeout: seconds for one attempt as a whole (connect, send the batch, receive the scores); a big batch
        through a slow detector needs a generous one.
    retries / backoff: extra attempts after a dropped connection, a timeout or a 502/503/504, pausing
        ``backoff * 2**k`` s after attempt k, so a restarting or busy server is waited for. A scorer that raises
        (HTTP 500) or a refused request (4xx) fails at once with the server's message.
    secret_env: the environment variable holding the server's secret (module docstring).
    """

    def __init__(self, url: str, main_key: str = "score", timeout: float = 120.0, retries: int = 3,
                 backoff: float = 1.0, secret_env: str = SECRET_ENV):
        self.url = check_url(self.name, url)
        if not isinstance(main_key, str) or not main_key:
            raise ValueError(f"reward {self.name!r}: main_key must be a non-empty str, got {main_key!r}")
        self.main_key, self.secret_env = main_key, secret_env
        self.policy = retry_policy(self.name, timeout, retries, backoff)
        self._headers = auth_headers(self.name, secret_env)  # private: never in a repr, a log or an error
        try:
            health = request_json(f"{self.url}/health", None, self.policy, self._headers)
        except RemoteError as e:
            hint = (f"; the server wants its secret in ${secret_env}" if "HTTP 401" in str(e) else
                    "; start one with `python -m rewards.server --scorer module:callable --port PORT`")
            raise RemoteError(f"reward {self.name!r}: no reward server answers at {self.url} ({e}){hint}") from None
        health = health if isinstance(health, dict) else {}
        self.scorer = health.get("scorer", "?")
        self.limits = health.get("limits") if isinstance(health.get("limits"), dict) else {}

    def _check_limits(self, n: int, pixels: int, size: int) -> None:
        """The server's limits (from /health) checked here: an oversized body would be cut off mid-send."""
        for key, value, what in (("max_images", n, "images"), ("max_image_pixels", pixels // n, "pixels an image"),
                                 ("max_request_pixels", pixels, "pixels"), ("max_body_bytes", size, "bytes of body")):
            limit = self.limits.get(key)
            if isinstance(limit, int) and value > limit:
                raise RemoteError(f"reward {self.name!r}: the batch has {value} {what}, over the server's limit of "
                                  f"{limit} (its --{key.replace('_', '-')}); score smaller batches or raise it")

    def score(self, images, prompts, metadata):
        arrays = to_uint8(images)
        payload = {"images": [encode_png(a) for a in arrays], "prompts": prompts,
                   "metadata": _jsonable(self.name, metadata)}
        data = json.dumps(payload).encode("utf-8")
        self._check_limits(len(arrays), arrays.shape[0] * arrays.shape[1] * arrays.shape[2], len(data))
        try:
            answer = request_json(f"{self.url}/score", data, self.policy, self._headers)
        except RemoteError as e:
            raise RemoteError(f"reward {self.name!r} (server {self.url}, scorer {self.scorer}): {e}") from None
        return self._scores(answer, len(prompts))

    def _scores(self, answer: Any, n: int) -> dict[str, torch.Tensor]:
        where = f"reward {self.name!r}: {self.url}/score"
        scores = answer.get("scores") if isinstance(answer, dict) else None
        if not isinstance(scores, dict):
            raise RemoteError(f"{where} answered without a 'scores' object: {str(answer)[:200]}")
        if self.main_key not in scores:
            raise RemoteError(f"{where} sent scores {sorted(scores)[:20]} without the main one {self.main_key!r} "
                              "(the reward's main_key)")
        out = {}
        for key, values in scores.items():
            if not key or any(c in key for c in "/,:"):
                raise RemoteError(f"{where} sent a bad score name {key[:100]!r} (non-empty, without / , :)")
            if not isinstance(values, list) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise RemoteError(f"{where} sent non-numeric scores for {key!r}")
            if len(values) != n:
                raise RemoteError(f"{where} sent {len(values)} {key!r} scores for {n} images")
            bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
            if bad:  # the reference server refuses these itself (HTTP 500); another server may not
                raise RemoteError(f"{where} sent NaN/inf {key!r} scores at indices {bad[:10]}")
            out[key] = torch.tensor(values, dtype=torch.float32)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.label!r}, url={self.url!r})"


@register("geneval")
class GenEvalRemote(RemoteReward):
    """GenEval through a reward server running ``rewards.geneval:GenEvalScorer`` (default port 18085).

    Main score: the dense GenEval score; extra ``geneval/correct``: GenEval's 0/1 verdict. Metadata per image
    is the prompt's GenEval dict (``tag``, ``include``, ``exclude``), checked here before anything is sent.
    """

    def __init__(self, url: str = "http://127.0.0.1:18085", main_key: str = "score", timeout: float = 300.0,
                 retries: int = 3, backoff: float = 2.0, secret_env: str = SECRET_ENV):
        super().__init__(url, main_key, timeout, retries, backoff, secret_env)

    def score(self, images, prompts, metadata):
        for p, m in zip(prompts, metadata):
            if "tag" not in m or "include" not in m:
                raise ValueError(f"reward {self.name!r}: prompt {p!r} has no GenEval metadata ('tag', 'include'; "
                                 f"a GenEval .jsonl prompt file gives it), got {dict(m)!r}")
        return super().score(images, prompts, metadata)


__all__ = ["GenEvalRemote", "RemoteReward", "auth_headers", "check_url", "retry_policy", "to_uint8"]
