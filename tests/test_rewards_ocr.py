"""The OCR accuracy reward: target extraction, Flow-GRPO's score, engines (a lookup engine stands in for OCR)."""
import importlib.util
import threading

import pytest
import torch

from rewards import build_reward
from rewards.ocr import OcrScorer, levenshtein, ocr_accuracy, quoted_text
from rewards.server import RewardServer

# Solid-colour images; the test engine "reads" the text a colour stands for.
READS = {0: "STOP", 64: "St0p", 128: "", 192: "please stop here", 255: "xqzvwkjyfgh"}


def lookup_engine(image):
    return READS[int(image[0, 0, 0])]


def solid(levels):
    return torch.stack([torch.full((3, 8, 8), v / 255) for v in levels])


@pytest.mark.parametrize("prompt,target", [
    ('A neon sign that says "Open 24/7" above a door', "Open 24/7"),
    ("A chalkboard reading “Soup of the day”", "Soup of the day"),
    ("A cat's sign saying 'NO DOGS' on a fence", "NO DOGS"),   # the apostrophe in cat's is not a quote
    ('First "one" then "two"', "one"),
    ("""A 'single' and a "double" quote""", "single"),          # the first span, whichever quote it uses
])
def test_quoted_text(prompt, target):
    assert quoted_text(prompt) == target


@pytest.mark.parametrize("prompt", ["a sign with no text", "a cat's toy", 'an empty "" sign'])
def test_prompt_without_quoted_text_is_an_error(prompt):
    with pytest.raises(ValueError, match="quotes no text"):
        quoted_text(prompt)


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == levenshtein("abc", "") == 3
    assert levenshtein("flaw", "lawn") == levenshtein("lawn", "flaw") == 2
    assert levenshtein("same", "same") == 0


@pytest.mark.parametrize("recognized,target,score", [
    ("STOP", "stop", 1.0),                         # case-insensitive
    ("Hello  World", "hello world", 1.0),          # whitespace removed on both sides
    ("please stop here", "stop", 1.0),             # the target inside longer text counts as found
    ("helo", "hello", 1 - 1 / 5),                  # one deletion, normalised by the target's length
    ("St0p", "STOP", 1 - 1 / 4),
    ("", "stop", 0.0),
    ("xqzvwkjyfgh", "stop", 0.0),                  # distance 11 > len 4 is clipped: never below 0
])
def test_ocr_accuracy(recognized, target, score):
    assert ocr_accuracy(recognized, target) == pytest.approx(score)


def test_reward_with_a_test_engine():
    reward = build_reward("ocr", engine=lookup_engine)
    prompts = ['a road sign that says "STOP"'] * 5
    out = reward(solid([0, 64, 128, 192, 255]), prompts)
    assert out["ocr"].tolist() == pytest.approx([1.0, 0.75, 0.0, 1.0, 0.0])
    assert out["ocr/exact"].tolist() == [1.0, 0.0, 0.0, 1.0, 0.0]


def test_every_prompt_is_checked_before_the_engine_runs():
    calls = []
    reward = build_reward("ocr", engine=lambda im: calls.append(1) or "x")
    with pytest.raises(ValueError, match=r"reward 'ocr': prompt 'a blank sign' quotes no text"):
        reward(solid([0, 0]), ['a sign "A"', "a blank sign"])
    assert calls == []


def test_engine_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_ocr.py").write_text(
        "def read(image):\n    return 'STOP'\n\n"
        "class Reader:\n    def __init__(self, text):\n        self.text = text\n"
        "    def __call__(self, image):\n        return self.text\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    x, prompts = solid([0]), ['"STOP"']
    assert build_reward("ocr", engine="my_ocr:read")(x, prompts)["ocr"].item() == 1.0
    built = build_reward("ocr", engine="my_ocr:Reader", engine_kwargs={"text": "SOP"})
    assert built(x, prompts)["ocr"].item() == pytest.approx(0.75)
    with pytest.raises(ValueError, match="unknown OCR engine 'tesseract'"):
        build_reward("ocr", engine="tesseract")


@pytest.mark.skipif(importlib.util.find_spec("paddleocr") is not None, reason="paddleocr is installed here")
def test_missing_paddleocr_says_what_to_install():
    with pytest.raises(ImportError, match=r"reward 'ocr'.*pip install paddleocr"):
        build_reward("ocr")


def test_remote_engine_through_the_reward_server():
    """An engine living in another environment: OcrScorer behind the server, the `remote` reward in front."""
    server = RewardServer(OcrScorer(lookup_engine))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    try:
        x, prompts = solid([0, 64, 128]), ['"STOP"'] * 3
        remote = build_reward("remote", url=server.url, timeout=2.0, retries=0)(x, prompts)
        local = build_reward("ocr", engine=lookup_engine)(x, prompts)
        assert torch.equal(remote["remote"], local["ocr"]) and torch.equal(remote["remote/exact"], local["ocr/exact"])
    finally:
        server.shutdown()
        server.server_close()
