"""The ``vlm_judge`` reward and the ``pairwise`` judge "vlm" against a fake OpenAI-compatible server on loopback.

The fake model "looks" at the images it is sent (it decodes the data URLs) and answers from their brightness,
so the scores it returns are known in closed form.
"""
import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from rewards import build_reward
from rewards.transport import RemoteError

MODEL = "fake-unifiedreward"


class FakeVLM(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests, self.fail_next, self.answer = [], 0, None
        self.lock = threading.Lock()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


def brightness(data_url):
    header, b64 = data_url.split(",", 1)
    assert header == "data:image/png;base64"
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)))).mean() / 255


class _Handler(BaseHTTPRequestHandler):
    def _send(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        assert self.path == "/v1/models"
        self._send(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server = self.server
        with server.lock:
            server.requests.append(req)
            if server.fail_next:
                server.fail_next -= 1
                self._send(503, {"error": "warming up"})
                return
        assert self.path == "/v1/chat/completions"
        content = req["messages"][0]["content"]
        levels = [brightness(c["image_url"]["url"]) for c in content if c["type"] == "image_url"]
        if server.answer is not None:
            text = server.answer
        elif len(levels) == 1:
            text = f"The image is plain. Score: {1 + 9 * levels[0]:.3f}"
        else:
            text = f"Comparing both... Better: Image {1 if levels[0] >= levels[1] else 2}"
        self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})

    def log_message(self, *args):
        pass


@pytest.fixture
def vlm():
    server = FakeVLM()
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def judge(vlm, **kw):
    return build_reward("vlm_judge", url=vlm.url, model=MODEL,
                        **{"timeout": 2.0, "retries": 0, "backoff": 0.01, "concurrency": 4, **kw})


def solid(levels):
    return torch.stack([torch.full((3, 4, 4), v / 255) for v in levels])


def test_scores_are_parsed_from_the_answers(vlm):
    levels = [0, 51, 102, 255, 153]
    out = judge(vlm)(solid(levels), [f"prompt {i}" for i in range(5)])["vlm_judge"]
    assert out.tolist() == pytest.approx([1 + 9 * v / 255 for v in levels], abs=1e-3)
    req = vlm.requests[0]
    assert req["model"] == MODEL and req["temperature"] == 0.0
    parts = req["messages"][0]["content"]
    assert parts[0]["type"] == "image_url" and parts[1]["type"] == "text"
    assert sorted(r["messages"][0]["content"][1]["text"].split('"')[1] for r in vlm.requests) == \
        [f"prompt {i}" for i in range(5)]  # each request carries its own prompt in the template


def test_custom_template_and_pattern(vlm):
    vlm.answer = "I would give it 7 out of 10, final answer [8]"
    r = judge(vlm, template="Rate {prompt}", pattern=r"\[(\d+)\]", score_range=[0, 10])
    assert r(solid([0]), ["a cat"])["vlm_judge"].item() == 8.0  # the last match, the verdict, counts
    assert vlm.requests[-1]["messages"][0]["content"][1]["text"] == "Rate a cat"


@pytest.mark.parametrize("answer,needle", [
    ("I cannot judge this image.", "cannot read a score"),
    ("Score: 42", r"score 42.0 .* outside \[1.0, 10.0\]"),
])
def test_unreadable_answers_name_the_endpoint_and_quote_the_answer(vlm, answer, needle):
    vlm.answer = answer
    with pytest.raises(ValueError, match=needle) as e:
        judge(vlm)(solid([0]), ["p"])
    assert vlm.url in str(e.value) and answer in str(e.value)


def test_retries_a_busy_server(vlm):
    vlm.fail_next = 2
    out = judge(vlm, retries=3, concurrency=1)(solid([255]), ["p"])
    assert out["vlm_judge"].item() == pytest.approx(10.0) and len(vlm.requests) == 3
    vlm.fail_next = 5
    with pytest.raises(RemoteError, match="HTTP 503: warming up"):
        judge(vlm, retries=1, concurrency=1)(solid([255]), ["p"])


def test_construction_checks_the_endpoint_and_the_model(vlm):
    with pytest.raises(ValueError, match=f"serves \\['{MODEL}'\\], not model 'qwen'"):
        build_reward("vlm_judge", url=vlm.url, model="qwen", timeout=2.0, retries=0)
    dead = vlm.url.replace(str(vlm.server_address[1]), "1")
    with pytest.raises(RemoteError, match=f"no OpenAI-compatible endpoint answers at {dead}"):
        build_reward("vlm_judge", url=dead, model=MODEL, timeout=1.0, retries=0)
    with pytest.raises(ValueError, match="capture group"):
        judge(vlm, pattern=r"\d+")
    with pytest.raises(ValueError, match="containing {prompt}"):
        judge(vlm, template="Rate this image")


def test_pairwise_with_the_vlm_as_judge(vlm):
    """Pref-GRPO: the judge compares two images; win rates within each group follow brightness order."""
    reward = build_reward("pairwise", judge="vlm",
                          judge_kwargs={"url": vlm.url, "model": MODEL, "timeout": 2.0, "retries": 0})
    levels = [10, 200, 90, 40, 250, 0]
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    out = reward(solid(levels), ["a"] * 3 + ["b"] * 3, groups=groups)["pairwise"]
    assert out.tolist() == [0.0, 1.0, 0.5, 0.5, 1.0, 0.0]
    pair_requests = [r for r in vlm.requests if sum(c["type"] == "image_url" for c in r["messages"][0]["content"]) == 2]
    assert len(pair_requests) == 2 * 3  # C(3, 2) per group
