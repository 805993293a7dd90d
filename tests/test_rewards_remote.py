"""The reward server and the ``remote`` / ``geneval`` client rewards, on loopback with small timeouts."""
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from rewards import build_reward
from rewards.geneval import toy_scorer
from rewards.remote import to_uint8
from rewards.server import RewardServer, decode_png, encode_png
from rewards.transport import RemoteError, RetryPolicy, request_json

ROOT = Path(__file__).resolve().parents[1]
FAST = {"timeout": 2.0, "retries": 0, "backoff": 0.01}


def colour_scorer(images, prompts, metadata):
    """A detector-free test double: mean red level and the number of clearly red pixels, from uint8 pixels."""
    r, g, b = (images[..., c].astype(np.int64) for c in range(3))
    red = (r > 128) & (g < 128) & (b < 128)
    return {"score": (r.mean(axis=(1, 2)) / 255).tolist(), "red_pixels": red.sum(axis=(1, 2)).tolist()}


def start(scorer, port=0):
    server = RewardServer(scorer, port=port)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    return server


def stop(server):
    server.shutdown()
    server.server_close()


@pytest.fixture
def server():
    s = start(colour_scorer)
    yield s
    stop(s)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def images(n=4, seed=0):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_png_codec_is_lossless():
    a = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert np.array_equal(decode_png(encode_png(a)), a)


def test_scores_through_the_server_equal_the_scorer_in_process(server):
    x = images()
    reward = build_reward("remote", url=server.url, **FAST)
    out = reward(x, ["p"] * 4)
    assert set(out) == {"remote", "remote/red_pixels"}
    local = colour_scorer(to_uint8(x), ["p"] * 4, [{}] * 4)
    assert torch.equal(out["remote"], torch.tensor(local["score"], dtype=torch.float32))
    assert torch.equal(out["remote/red_pixels"], torch.tensor(local["red_pixels"], dtype=torch.float32))
    # the weighted score is configurable
    other = build_reward("remote", url=server.url, main_key="red_pixels", **FAST)(x, ["p"] * 4)
    assert set(other) == {"remote", "remote/score"}


def test_client_waits_for_a_restarting_server():
    calls = []
    first = start(colour_scorer)
    port, url = first.server_address[1], first.url
    reward = build_reward("remote", url=url, timeout=2.0, retries=6, backoff=0.05)
    x = images()
    before = reward(x, ["p"] * 4)["remote"]
    stop(first)

    def counting(im, p, m):
        calls.append(len(p))
        return colour_scorer(im, p, m)

    restarted = {}
    timer = threading.Timer(0.4, lambda: restarted.setdefault("server", start(counting, port)))
    timer.start()
    t0 = time.perf_counter()
    try:
        after = reward(x, ["p"] * 4)["remote"]  # refused at first, then retried with backoff until it is back
    finally:
        timer.join()
        stop(restarted["server"])
    assert time.perf_counter() - t0 >= 0.35 and calls == [4]
    assert torch.equal(before, after)


def test_a_server_that_is_down_fails_naming_the_url():
    url = f"http://127.0.0.1:{free_port()}"
    t0 = time.perf_counter()
    with pytest.raises(RemoteError, match=f"no reward server answers at {url}.*2 attempt"):
        build_reward("remote", url=url, timeout=1.0, retries=1, backoff=0.01)
    assert time.perf_counter() - t0 < 3


def test_a_server_that_goes_away_fails_naming_the_url():
    s = start(colour_scorer)
    reward = build_reward("remote", url=s.url, **FAST)
    stop(s)
    with pytest.raises(RemoteError, match=f"server {s.url}.*POST {s.url}/score failed after 1 attempt"):
        reward(images(), ["p"] * 4)


def test_scorer_errors_come_back_at_once_without_retries():
    calls = []

    def broken(im, p, m):
        calls.append(1)
        raise KeyError("include")

    s = start(broken)
    try:
        reward = build_reward("remote", url=s.url, timeout=2.0, retries=3, backoff=0.5)
        t0 = time.perf_counter()
        with pytest.raises(RemoteError, match=r"HTTP 500: KeyError: 'include'"):
            reward(images(), ["p"] * 4)
        assert calls == [1] and time.perf_counter() - t0 < 0.5
    finally:
        stop(s)


@pytest.mark.parametrize("bad,needle", [
    (lambda im, p, m: {"score": [0.0]}, "has 1 values for 4 images"),
    (lambda im, p, m: {"score": [float("nan")] * 4}, "NaN/inf at"),
    (lambda im, p, m: [1, 2, 3, 4], "non-empty dict"),
])
def test_malformed_scores_are_refused_by_the_server(bad, needle):
    s = start(bad)
    try:
        with pytest.raises(RemoteError, match=needle):
            build_reward("remote", url=s.url, **FAST)(images(), ["p"] * 4)
    finally:
        stop(s)


def test_timeouts_fail_fast():
    s = start(lambda im, p, m: time.sleep(1.0) or colour_scorer(im, p, m))
    try:
        reward = build_reward("remote", url=s.url, timeout=0.2, retries=0, backoff=0.01)
        t0 = time.perf_counter()
        with pytest.raises(RemoteError, match="timed out"):
            reward(images(), ["p"] * 4)
        assert time.perf_counter() - t0 < 0.9
    finally:
        stop(s)


def test_bad_requests_get_a_400_naming_the_problem(server):
    policy = RetryPolicy(timeout=2.0, retries=0)
    with pytest.raises(RemoteError, match=r"HTTP 400: got 1 images, 2 prompts"):
        request_json(f"{server.url}/score", {"images": [encode_png(np.zeros((2, 2, 3), np.uint8))],
                                             "prompts": ["a", "b"]}, policy)
    with pytest.raises(RemoteError, match=r"HTTP 400: an image is not a base64 PNG"):
        request_json(f"{server.url}/score", {"images": ["bm90IGEgcG5n"], "prompts": ["a"]}, policy)
    with pytest.raises(RemoteError, match="HTTP 404"):
        request_json(f"{server.url}/nope", None, policy)
    assert request_json(f"{server.url}/health", None, policy)["status"] == "ok"


def test_bad_client_arguments():
    with pytest.raises(ValueError, match="url must be an http"):
        build_reward("remote", url="localhost:1234")
    with pytest.raises(ValueError, match="retries must be an int"):
        build_reward("remote", url="http://127.0.0.1:1", retries=-1)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        s = start(colour_scorer)
        try:
            build_reward("remote", url=s.url, **FAST)(images(1), ["p"], [{"x": object()}])
        finally:
            stop(s)


# -- GenEval through the server ---------------------------------------------------------------------------
def toy_batch():
    from flowrl.toy import world

    metas = [m for m in world.all_prompts() if m["tag"] in ("counting", "position")][::7][:6]
    scenes = [world.sample_scene(m, rng=i) for i, m in enumerate(metas)]
    x = world.render_batch(scenes)
    x[1] = 0  # an empty image fails its prompt
    return x, metas


def test_geneval_cli_server_with_the_toy_detector_matches_the_shapes_reward():
    """`python -m rewards.server` in its own process, the `geneval` client, the toy stand-in scorer."""
    proc = subprocess.Popen([sys.executable, "-m", "rewards.server", "--scorer", "rewards.geneval:toy_scorer",
                             "--port", "0"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "serving rewards.geneval:toy_scorer on http://127.0.0.1:" in line, proc.stderr.read()
        url = line.strip().rsplit(" ", 1)[1]
        x, metas = toy_batch()
        prompts = [m["prompt"] for m in metas]
        out = build_reward("geneval", url=url, timeout=10.0, retries=0)(x, prompts, metas)
        local = build_reward("shapes")(x, prompts, metas)
        assert torch.equal(out["geneval"], local["shapes"])
        assert torch.equal(out["geneval/correct"], local["shapes/correct"])
        assert out["geneval/correct"][1] == 0 and out["geneval/correct"].sum() >= 3
        with pytest.raises(ValueError, match="has no GenEval metadata"):
            build_reward("geneval", url=url, timeout=10.0, retries=0)(x[:1], prompts[:1], [{}])
        health = json.loads(urllib.request.urlopen(f"{url}/health", timeout=5).read())
        assert health["status"] == "ok" and health["scorer"] == "rewards.geneval:toy_scorer"
        assert health["limits"]["max_images"] == 256
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_toy_scorer_in_process_equals_the_shapes_reward():
    x, metas = toy_batch()
    out = toy_scorer(to_uint8(x), [m["prompt"] for m in metas], metas)
    ref = build_reward("shapes")(x, [m["prompt"] for m in metas], metas)
    assert out["score"] == ref["shapes"].tolist() and out["correct"] == ref["shapes/correct"].tolist()


def test_loopback_bypasses_a_configured_proxy(server, monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{free_port()}")  # a proxy that is not there
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert build_reward("remote", url=server.url, **FAST)(images(1), ["p"])["remote"].shape == (1,)


# -- a server answering junk, a trickling server, the secret ---------------------------------------------------
class FakeServer:
    """Answers /health normally and /score with ``answer`` (bytes), optionally one byte every ``trickle`` s."""

    def __init__(self, answer: bytes, trickle: float = 0.0):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self._reply(json.dumps({"status": "ok", "scorer": "fake"}).encode())

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                fake.posts += 1
                self._reply(answer, trickle)

            def _reply(self, body, delay=0.0):
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                for i in range(len(body)) if delay else [None]:
                    self.wfile.write(body if i is None else body[i:i + 1])
                    self.wfile.flush()
                    time.sleep(delay)

            def log_message(self, *a):
                pass

        self.posts = 0
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("answer,needle", [
    (b'{"scores": {"score": [0.1, 0.2]}}', "sent 2 'score' scores for 4 images"),
    (b'{"scores": {"other": [1, 2, 3, 4]}}', r"without the main one 'score'"),
    (b'{"scores": {"score": [1, 2, 3, NaN]}}', r"NaN/inf 'score' scores at indices \[3\]"),
    (b'{"scores": {"score": [1, 2, 3, 1e999]}}', r"NaN/inf 'score' scores at indices \[3\]"),
    (b'{"scores": {"score": [1, 2, 3, 4], "a/b": [1, 2, 3, 4]}}', "bad score name 'a/b'"),
    (b'{"scores": {"score": [1, 2, true, 4]}}', "non-numeric scores for 'score'"),
    (b'{"scores": {"score": "1234"}}', "non-numeric scores for 'score'"),
    (b'{"scores": [1, 2, 3, 4]}', "without a 'scores' object"),
    (b"<html>oops</html>", "the answer is not JSON"),
])
def test_junk_answers_raise_and_the_trainer_guard_retries_then_fails(answer, needle):
    from flowrl.train import guards

    fake = FakeServer(answer)
    try:
        reward = build_reward("remote", url=fake.url, **FAST)
        with pytest.raises(RemoteError, match=needle):
            reward(images(), ["p"] * 4)
        warned = []
        with pytest.raises(guards.TrainingError, match=f"reward 'remote' failed 3 time.*{needle}"):
            guards.score_with_retries(reward, images(), ["p"] * 4, None, None, retries=2, backoff=0.0,
                                      timeout=5.0, warn=warned.append)
        assert len(warned) == 2 and fake.posts == 4  # every failure retried, none accepted
    finally:
        fake.close()


def test_the_deadline_covers_a_trickling_answer():
    """Each byte arrives well within the socket timeout; the whole answer does not arrive within the deadline."""
    fake = FakeServer(b'{"scores": {"score": [0.5, 0.5, 0.5, 0.5]}}', trickle=0.05)
    try:
        reward = build_reward("remote", url=fake.url, timeout=0.5, retries=1, backoff=0.01)
        t0 = time.perf_counter()
        with pytest.raises(RemoteError, match="2 attempt.*timed out: no complete answer within the 0.5 s deadline"):
            reward(images(), ["p"] * 4)
        assert time.perf_counter() - t0 < 2.0
        assert RetryPolicy(timeout=5.0).attempt_deadline == 5.0
        assert RetryPolicy(timeout=5.0, deadline=1.0).attempt_deadline == 1.0
        with pytest.raises(ValueError, match="deadline must be a finite number"):
            RetryPolicy(deadline=-1.0)
    finally:
        fake.close()


def test_the_client_sends_the_secret_from_its_variable_and_never_shows_it(monkeypatch):
    secret = "client-secret-0123456789abcdef"
    calls = []

    def counting(im, p, m):
        calls.append(len(p))
        return colour_scorer(im, p, m)

    s = RewardServer(counting, secret=secret)
    threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    try:
        monkeypatch.delenv("FLOWRL_REWARD_SECRET", raising=False)
        with pytest.raises(RemoteError, match=r"HTTP 401.*wants its secret in \$FLOWRL_REWARD_SECRET"):
            build_reward("remote", url=s.url, **FAST)
        monkeypatch.setenv("FLOWRL_REWARD_SECRET", "wrong-secret-0123456789abcdef")
        with pytest.raises(RemoteError, match="HTTP 401"):
            build_reward("remote", url=s.url, **FAST)
        monkeypatch.setenv("FLOWRL_REWARD_SECRET", secret)
        reward = build_reward("remote", url=s.url, **FAST)
        assert reward(images(), ["p"] * 4)["remote"].shape == (4,) and calls == [4]
        assert secret not in repr(reward)
        monkeypatch.delenv("FLOWRL_REWARD_SECRET")
        monkeypatch.setenv("OTHER_SECRET", secret)
        assert build_reward("remote", url=s.url, secret_env="OTHER_SECRET", **FAST)(images(1), ["p"])
        with pytest.raises(ValueError, match="secret_env 'UNSET_SECRET_VAR' names an unset environment variable"):
            build_reward("remote", url=s.url, secret_env="UNSET_SECRET_VAR", **FAST)
        with pytest.raises(ValueError, match="secret_env must name an environment variable"):
            build_reward("remote", url=s.url, secret_env="not a name!", **FAST)
    finally:
        stop(s)


def test_a_batch_over_the_servers_limits_is_refused_before_sending():
    from rewards.server_limits import Limits

    calls = []
    s = RewardServer(lambda im, p, m: calls.append(1) or colour_scorer(im, p, m), limits=Limits(max_images=3))
    threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    try:
        reward = build_reward("remote", url=s.url, **FAST)
        with pytest.raises(RemoteError, match=r"4 images, over the server's limit of 3 \(its --max-images\)"):
            reward(images(4), ["p"] * 4)
        assert calls == [] and reward(images(3), ["p"] * 3)["remote"].shape == (3,)
    finally:
        stop(s)
