"""``vlm_judge``: a vision-language model served behind an OpenAI-compatible chat-completions endpoint (vLLM,
SGLang, ... serving UnifiedReward or Qwen-VL) asked to score each image against its prompt.

    vllm serve CodeGoat24/UnifiedReward-qwen-7b --port 8000     # then: url http://127.0.0.1:8000/v1

Each image goes as a base64 PNG data URL in one user message with ``template`` (``{prompt}`` filled in);
requests run ``concurrency`` at a time, since the server batches concurrent requests itself. The score is
read from the answer with ``pattern`` (its first group; the *last* match counts, so a model that reasons before
its verdict is read at the verdict) and must lie in ``score_range``; an answer without one fails, naming the
endpoint and quoting the answer, rather than scoring 0. Construction lists ``{url}/models`` and checks that
``model`` is served. Timeouts and retries are the remote reward's (rewards/transport.py).

``compare`` asks the same model which of two images fits the prompt better (``pair_template``,
``pair_pattern`` reading "1" or "2"): the pairwise judge of Pref-GRPO (``pairwise`` reward, judge "vlm").
"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from .base import Reward, register
from .remote import check_url, retry_policy, to_uint8
from .server import encode_png
from .transport import RemoteError, request_json

TEMPLATE = ('You are judging a generated image against its text prompt: "{prompt}". Rate how faithfully the '
            "image follows the prompt and how good it looks, from 1 (worst) to 10 (best). End your answer with "
            '"Score: <number>".')
PATTERN = r"[Ss]core\s*[:=]?\s*\**\s*(-?\d+(?:\.\d+)?)"
PAIR_TEMPLATE = ('Two images were generated for the text prompt: "{prompt}". Which one follows the prompt better '
                 'and looks better, Image 1 or Image 2? End your answer with "Better: Image 1" or '
                 '"Better: Image 2".')
PAIR_PATTERN = r"[Bb]etter\s*[:=]?\s*\**\s*[Ii]mage\s*([12])"


def _data_url(image) -> dict:
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{encode_png(image)}"}}


@register("vlm_judge")
class VLMJudge(Reward):
    """Score in ``score_range`` from a VLM's answer (module docstring). ``api_key_env`` names an environment
    variable holding a bearer token, so no secret sits in a recipe."""

    def __init__(self, url: str, model: str, template: str = TEMPLATE, pattern: str = PATTERN,
                 score_range: Sequence[float] = (1.0, 10.0), pair_template: str = PAIR_TEMPLATE,
                 pair_pattern: str = PAIR_PATTERN, max_tokens: int = 256, temperature: float = 0.0,
                 concurrency: int = 8, timeout: float = 120.0, retries: int = 3, backoff: float = 1.0,
                 api_key_env: str | None = None):
        who = f"reward {self.name!r}"
        self.url = check_url(self.name, url)
        if not isinstance(model, str) or not model:
            raise ValueError(f"{who}: model must be the served model's name, got {model!r}")
        for arg, t in (("template", template), ("pair_template", pair_template)):
            if not isinstance(t, str) or "{prompt}" not in t:
                raise ValueError(f"{who}: {arg} must be a str containing {{prompt}}, got {t!r}")
            try:  # other fields or a stray brace would only fail at score time, then be retried
                t.format(prompt="x")
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(f"{who}: {arg} may use only the field {{prompt}} (write literal braces as "
                                 f"{{{{ and }}}}); formatting it failed with {type(e).__name__}: {e}") from None
        self.pattern, self.pair_pattern = self._regex(pattern, "pattern"), self._regex(pair_pattern, "pair_pattern")
        try:
            low, high = (float(v) for v in score_range)
            assert not isinstance(score_range, str) and low < high
        except (TypeError, ValueError, AssertionError):
            raise ValueError(f"{who}: score_range must be [low, high] with low < high, got {score_range!r}") from None
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"{who}: concurrency must be an int >= 1, got {concurrency!r}")
        self.model, self.template, self.pair_template = model, template, pair_template
        self.low, self.high = low, high
        self.max_tokens, self.temperature, self.concurrency = int(max_tokens), float(temperature), concurrency
        self.policy = retry_policy(self.name, timeout, retries, backoff)
        self.headers = {}
        if api_key_env is not None:
            if not os.environ.get(api_key_env):
                raise ValueError(f"{who}: api_key_env names {api_key_env!r}, which is not set")
            self.headers["Authorization"] = f"Bearer {os.environ[api_key_env]}"
        self._check_served()

    def _regex(self, pattern: str, arg: str) -> re.Pattern:
        try:
            rx = re.compile(pattern)
        except (re.error, TypeError) as e:
            raise ValueError(f"reward {self.name!r}: {arg} {pattern!r} is not a regex: {e}") from None
        if rx.groups < 1:
            raise ValueError(f"reward {self.name!r}: {arg} {pattern!r} needs a capture group around the value")
        return rx

    def _check_served(self) -> None:
        try:
            listing = request_json(f"{self.url}/models", None, self.policy, self.headers)
        except RemoteError as e:
            raise RemoteError(f"reward {self.name!r}: no OpenAI-compatible endpoint answers at {self.url} "
                              f"({e})") from None
        served = [m.get("id") for m in listing.get("data", [])] if isinstance(listing, dict) else []
        if self.model not in served:
            raise ValueError(f"reward {self.name!r}: {self.url} serves {served}, not model {self.model!r}")

    # -- requests ------------------------------------------------------------------------------------------
    def _ask(self, images: list, text: str) -> str:
        content = [_data_url(im) for im in images] + [{"type": "text", "text": text}]
        payload = {"model": self.model, "messages": [{"role": "user", "content": content}],
                   "max_tokens": self.max_tokens, "temperature": self.temperature}
        answer = request_json(f"{self.url}/chat/completions", payload, self.policy, self.headers)
        try:
            return answer["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise RemoteError(f"reward {self.name!r}: {self.url}/chat/completions answered without "
                              f"choices[0].message.content: {str(answer)[:300]}") from None

    def _map(self, fn, items: list) -> list:
        if self.concurrency == 1 or len(items) == 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(fn, items))

    def _read(self, rx: re.Pattern, answer: str, what: str) -> str:
        found = rx.findall(answer)
        if not found:
            raise ValueError(f"reward {self.name!r}: cannot read {what} from the answer of {self.url} "
                             f"(pattern {rx.pattern!r}): {answer!r}")
        last = found[-1]
        return last[0] if isinstance(last, tuple) else last

    def _value(self, answer: str) -> float:
        value = float(self._read(self.pattern, answer, "a score"))
        if not self.low <= value <= self.high:
            raise ValueError(f"reward {self.name!r}: score {value} from {self.url} is outside [{self.low}, "
                             f"{self.high}]; the answer was {answer!r}")
        return value

    def score(self, images, prompts, metadata):
        u8 = to_uint8(images)
        answers = self._map(lambda i: self._ask([u8[i]], self.template.format(prompt=prompts[i])),
                            list(range(len(prompts))))
        return torch.tensor([self._value(a) for a in answers], dtype=torch.float32)

    def compare(self, images_a, images_b, prompts: Sequence[str]) -> torch.Tensor:
        """P(a better than b) per pair, 1.0 or 0.0 from the model's verdict (Image 1 is a)."""
        a, b = to_uint8(images_a), to_uint8(images_b)
        answers = self._map(lambda i: self._ask([a[i], b[i]], self.pair_template.format(prompt=prompts[i])),
                            list(range(len(prompts))))
        verdicts = [self._read(self.pair_pattern, ans, "a verdict (1 or 2)") for ans in answers]
        bad = [v for v in verdicts if v not in ("1", "2")]
        if bad:
            raise ValueError(f"reward {self.name!r}: pair_pattern must capture 1 or 2, got {bad[:3]}")
        return torch.tensor([1.0 if v == "1" else 0.0 for v in verdicts], dtype=torch.float32)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.label!r}, url={self.url!r}, model={self.model!r})"


__all__ = ["PAIR_PATTERN", "PAIR_TEMPLATE", "PATTERN", "TEMPLATE", "VLMJudge"]
