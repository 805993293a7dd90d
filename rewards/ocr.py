"""Text rendering accuracy (Flow-GRPO's OCR reward): read the image with an OCR engine, compare with the text the
prompt quotes.

Target: the first quoted span of the prompt, in double quotes ("..."), typographic quotes (“...”) or single
quotes ('...', not an apostrophe inside a word: "a cat's sign saying 'OPEN'" targets OPEN). A prompt without
one is an error (the reward has nothing to check).

Score, as Flow-GRPO defines it: both strings lower-cased with all whitespace removed; 1 if the target occurs in
the recognised text, else ``1 - min(d, len(target)) / len(target)`` with d the Levenshtein distance. So it is in
[0, 1], normalised by the *target's* length: text missing entirely scores 0, extra text around a correct
rendering costs nothing, and a recognised string much longer than the target cannot push it below 0. The extra
``exact`` is 1 where the target was found verbatim.

Engines are callables ``engine(image uint8 (H, W, 3) RGB) -> str``: "paddleocr" (Flow-GRPO's, English, no angle
classifier), "easyocr", "module:callable" (imported; a class or factory is called with ``engine_kwargs``), or
a callable passed from Python. An engine in another environment: run ``OcrScorer`` behind the reward server
(``python -m rewards.server --scorer rewards.ocr:OcrScorer --scorer-kwargs '{"engine": "paddleocr"}'``) and
use the ``remote`` reward with ``main_key: score``.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from .base import Reward, register
from .remote import to_uint8
from .server import load_callable

Engine = Callable[[np.ndarray], str]
_QUOTES = (re.compile(r'"([^"]*)"'), re.compile(r"“([^”]*)”"), re.compile(r"(?<!\w)'([^']*)'(?!\w)"))


def quoted_text(prompt: str) -> str:
    """The first quoted span (double, typographic, then single quotes); ValueError when there is none."""
    spans = [(m.start(), m.group(1)) for q in _QUOTES for m in q.finditer(prompt)]
    spans = [s for s in spans if s[1].strip()]
    if not spans:
        raise ValueError(f"prompt {prompt!r} quotes no text to render (expected \"...\", “...” or '...')")
    return min(spans)[1]


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each), one DP row at a time."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _norm(text: str) -> str:
    return "".join(text.split()).lower()


def ocr_accuracy(recognized: str, target: str) -> float:
    """Flow-GRPO's OCR score in [0, 1] (see the module docstring)."""
    t, r = _norm(target), _norm(recognized)
    if not t:
        raise ValueError(f"target text {target!r} is empty once whitespace is removed")
    if t in r:
        return 1.0
    return 1.0 - min(levenshtein(r, t), len(t)) / len(t)


# -- engines ----------------------------------------------------------------------------------------------
class PaddleOCREngine:
    """PaddleOCR, as Flow-GRPO configures it (English, no text-angle classifier); recognised pieces joined."""

    def __init__(self, lang: str = "en", **kwargs: Any):
        try:
            from paddleocr import PaddleOCR
        except ImportError as e:
            raise ImportError(f"OCR engine 'paddleocr' needs `pip install paddleocr paddlepaddle` ({e})") from None
        self.ocr = PaddleOCR(use_angle_cls=False, lang=lang, **kwargs)

    def __call__(self, image: np.ndarray) -> str:
        result = self.ocr.ocr(np.ascontiguousarray(image[..., ::-1]), cls=False)  # PaddleOCR reads arrays as BGR
        lines = (result or [None])[0] or []
        return "".join(line[1][0] for line in lines if line[1][1] > 0)


class EasyOCREngine:
    def __init__(self, lang: str = "en", gpu: bool = False, **kwargs: Any):
        try:
            import easyocr
        except ImportError as e:
            raise ImportError(f"OCR engine 'easyocr' needs `pip install easyocr` ({e})") from None
        self.reader = easyocr.Reader([lang], gpu=gpu, **kwargs)

    def __call__(self, image: np.ndarray) -> str:
        return "".join(self.reader.readtext(image, detail=0))


ENGINES = {"paddleocr": PaddleOCREngine, "easyocr": EasyOCREngine}


def build_engine(engine: str | Engine, engine_kwargs: Mapping[str, Any] | None = None) -> Engine:
    """A named engine built with ``engine_kwargs``; ``module:attr`` is the engine itself, or with
    ``engine_kwargs`` (even {}) a factory called with them; a callable is used as is."""
    if engine_kwargs is not None and not isinstance(engine_kwargs, Mapping):
        raise ValueError(f"engine_kwargs must be a dict, got {type(engine_kwargs).__name__}")
    if callable(engine):
        if engine_kwargs:
            raise ValueError("engine_kwargs only apply to an engine given by name")
        return engine
    if not isinstance(engine, str):
        raise ValueError(f"engine must be a callable or a name, got {type(engine).__name__}")
    if engine in ENGINES:
        return ENGINES[engine](**dict(engine_kwargs or {}))
    if ":" not in engine:
        raise ValueError(f"unknown OCR engine {engine!r}; use one of {sorted(ENGINES)} or 'module:callable'")
    return load_callable(engine, engine_kwargs, "OCR engine")


class OcrScorer:
    """OCR accuracy as a scorer (uint8 images, prompts, metadata) -> {"score", "exact"}: what the ``ocr`` reward
    runs in process, and what a reward server runs for an engine living in another environment."""

    def __init__(self, engine: str | Engine = "paddleocr", engine_kwargs: Mapping[str, Any] | None = None):
        self.engine = build_engine(engine, engine_kwargs)

    def __call__(self, images: np.ndarray, prompts: list[str], metadata: list[dict] | None = None
                 ) -> dict[str, list[float]]:
        targets = [quoted_text(p) for p in prompts]  # every prompt checked before the engine runs
        texts = [self.engine(img) for img in images]
        for t in texts:
            if not isinstance(t, str):
                raise ValueError(f"OCR engine returned {type(t).__name__}, expected str")
        scores = [ocr_accuracy(r, t) for r, t in zip(texts, targets)]
        return {"score": scores, "exact": [float(s == 1.0) for s in scores]}


@register("ocr")
class OcrReward(Reward):
    """Flow-GRPO's OCR accuracy in [0, 1] (module docstring); extra ``exact``. Engine: "paddleocr" (default),
    "easyocr", "module:callable" or a callable ``uint8 (H, W, 3) -> str``."""

    def __init__(self, engine: str | Engine = "paddleocr", engine_kwargs: Mapping[str, Any] | None = None):
        try:
            self.scorer = OcrScorer(engine, engine_kwargs)
        except (ValueError, ImportError, AttributeError) as e:  # e.g. the engine's package is missing
            raise type(e)(f"reward {self.name!r}: {e}") from None

    def score(self, images, prompts, metadata):
        try:
            out = self.scorer(to_uint8(images), prompts, metadata)
        except ValueError as e:
            raise ValueError(f"reward {self.name!r}: {e}") from None
        return {k: torch.tensor(v, dtype=torch.float32) for k, v in out.items()}


__all__ = ["ENGINES", "EasyOCREngine", "OcrReward", "OcrScorer", "PaddleOCREngine", "build_engine", "levenshtein",
           "ocr_accuracy", "quoted_text"]
