"""The reward server under load and under attack: concurrent clients, malformed and oversized requests,
decompression bombs, stalled clients, the shared secret and the refusal to serve off loopback without one."""
import base64
import binascii
import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rewards.server as server_mod
from rewards import build_reward
from rewards.server import RewardServer, encode_png, main
from rewards.server_limits import Limits, check_json_depth, png_size
from rewards.transport import RemoteError, RetryPolicy, request_json

ROOT = Path(__file__).resolve().parents[1]
SECRET = "test-secret-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {SECRET}"}
BOUND = 5.0  # seconds any one hostile request may take to be answered or dropped (generous)


def brightness(images, prompts, metadata):
    """Mean brightness, plus the request id and image index the load test writes into pixel (0, 0)."""
    px = images[:, 0, 0].astype(np.int64)
    return {"score": (images.astype(np.float64).mean(axis=(1, 2, 3)) / 255).tolist(),
            "rid": (px[:, 0] + 256 * px[:, 1]).tolist(), "idx": px[:, 2].tolist()}


class Counting:
    def __init__(self, fn=brightness):
        self.fn, self.calls, self.images = fn, 0, []

    def __call__(self, images, prompts, metadata):
        self.calls += 1  # under the server's lock
        self.images.append(images.copy())
        return self.fn(images, prompts, metadata)


def start(scorer, **kw) -> RewardServer:
    s = RewardServer(scorer, **kw)
    threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    return s


def stop(s):
    s.shutdown()
    s.server_close()


def png_b64(a: np.ndarray) -> str:
    return encode_png(a)


def fake_ihdr(width: int, height: int, tail: bytes = b"") -> str:
    """A PNG signature and a valid IHDR chunk claiming width x height, and nothing (or ``tail``) after it."""
    data = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + data + struct.pack(">I", binascii.crc32(b"IHDR" + data))
    return base64.b64encode(b"\x89PNG\r\n\x1a\n" + chunk + tail).decode()


def bomb() -> str:
    """A real 9000 x 9000 black PNG: 10 KB of file, 243 MB of RGB pixels once decoded."""
    buf = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def raw_exchange(port: int, data: bytes, half_close: bool = True, wait: float = BOUND + 1) -> tuple[int | None, bytes]:
    """Send raw bytes; the status of the first answer (None if the connection closed without one) and its body."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:  # the server refused and closed mid-send
            pass
        got = b""
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    if not got.startswith(b"HTTP/1."):
        return None, got
    head, _, rest = got.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(int(v) for k, _, v in (h.partition(": ") for h in lines[1:]) if k.lower() == "content-length")
    return int(lines[0].split(" ", 2)[1]), rest[:length]


def http_post(body: bytes, headers: dict | None = None, path: str = "/score", length: int | None = None) -> bytes:
    hdrs = {"Host": "x", "Content-Type": "application/json", **(headers or {})}
    if length is not False:
        hdrs.setdefault("Content-Length", str(len(body) if length is None else length))
    lines = [f"POST {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in hdrs.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def good_payload(n=2, size=8, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    ims = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return {"images": [png_b64(a) for a in ims], "prompts": ["p"] * n, "metadata": [{"i": i} for i in range(n)]}


# -- load -----------------------------------------------------------------------------------------------------
def test_concurrent_clients_get_exactly_their_own_scores():
    """8 threads x 50 requests x 16 images: each request's pixels carry its id, so a mix-up would show."""
    scorer = Counting()
    s = start(scorer)
    n_threads, n_requests, n_images = 8, 50, 16
    results, errors = {}, []

    def client(t):
        try:
            reward = build_reward("remote", url=s.url, timeout=30.0, retries=2, backoff=0.05)
            for r in range(n_requests):
                rid = t * n_requests + r
                rng = np.random.default_rng(rid)
                ims = rng.integers(0, 256, (n_images, 32, 32, 3), dtype=np.uint8)
                ims[:, 0, 0] = np.stack([np.full(n_images, rid % 256), np.full(n_images, rid // 256),
                                         np.arange(n_images)], axis=1)
                x = torch.from_numpy(ims).permute(0, 3, 1, 2).float() / 255
                results[rid] = (ims, reward(x, [f"p{rid}"] * n_images))
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=client, args=(t,)) for t in range(n_threads)]
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
    finally:
        stop(s)
    assert not errors, errors[:3]
    assert sorted(results) == list(range(n_threads * n_requests))
    for rid, (ims, out) in results.items():
        direct = brightness(ims, [], [])
        assert torch.equal(out["remote"], torch.tensor(direct["score"], dtype=torch.float32)), rid
        assert out["remote/rid"].tolist() == [rid] * n_images
        assert out["remote/idx"].tolist() == list(range(n_images))
    # the server scored each request once: none lost, none twice
    assert scorer.calls == n_threads * n_requests
    seen = sorted(int(b[0, 0, 0, 0]) + 256 * int(b[0, 0, 0, 1]) for b in scorer.images)
    assert seen == list(range(n_threads * n_requests))


# -- hostile requests -------------------------------------------------------------------------------------------
HOSTILE_LIMITS = Limits(max_body_bytes=4 * 2**20, max_images=32, max_image_pixels=1024 * 1024,
                        max_request_pixels=4 * 1024 * 1024, max_prompt_chars=1000, max_metadata_bytes=4096,
                        max_json_depth=16, socket_timeout=1.0, body_deadline=3.0)


def hostile_cases() -> list[tuple[str, bytes, set, bool]]:
    """(name, raw bytes, the statuses accepted (None: closed without an answer), half-close after sending)."""
    rng = np.random.default_rng(0)
    cases = []

    def post(name, payload, expect, headers=AUTH, **kw):
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        cases.append((name, http_post(body, headers, **kw), expect, True))

    for i in range(30):  # random bytes instead of an HTTP request
        cases.append((f"random request {i}", rng.bytes(int(rng.integers(1, 3000))), {400, None}, True))
    for i in range(30):  # random bytes as the body, some of them not UTF-8
        post(f"random body {i}", rng.bytes(int(rng.integers(1, 5000))), {400})
    for i in range(6):
        post(f"non-UTF-8 JSON {i}", b'{"images": ["\xff\xfe' + rng.bytes(50) + b'"], "prompts": ["a"]}', {400})
    good = good_payload(1, 16)["images"][0]
    for i in range(30):  # base64 cut at a random point, or a PNG cut short (inside its pixel data, not just IEND)
        cut = int(rng.integers(1, len(good) - 40))
        post(f"truncated base64 {i}", {"images": [good[:cut]], "prompts": ["a"]}, {400})
        raw = base64.b64decode(good)
        post(f"truncated PNG {i}", {"images": [base64.b64encode(raw[:max(33, cut // 2)]).decode()],
                                    "prompts": ["a"]}, {400})
    for i in range(25):  # a header claiming a huge image in a tiny file
        w, h = int(rng.integers(1025, 2**31)), int(rng.integers(1025, 2**31))
        post(f"huge IHDR {w}x{h}", {"images": [fake_ihdr(w, h)], "prompts": ["a"]}, {413})
    post("zero-width IHDR", {"images": [fake_ihdr(0, 10)], "prompts": ["a"]}, {400})
    post("IHDR bad CRC", {"images": [fake_ihdr(8, 8)[:-8] + "AAAAAAAA"], "prompts": ["a"]}, {400})
    b = bomb()
    post("9000x9000 bomb", {"images": [b], "prompts": ["a"]}, {413})
    post("four 9000x9000 bombs", {"images": [b] * 4, "prompts": ["a"] * 4}, {413})
    post("request pixels", {"images": [fake_ihdr(1024, 1024)] * 5, "prompts": ["a"] * 5}, {413})
    post("too many images", {"images": [good] * 33, "prompts": ["a"] * 33}, {413})
    post("sizes differ", {"images": [good, good_payload(1, 8)["images"][0]], "prompts": ["a", "b"]}, {400})
    post("long prompt", {"images": [good], "prompts": ["x" * 1001]}, {413})
    post("big metadata", {"images": [good], "prompts": ["a"], "metadata": [{"k": "v" * 5000}]}, {413})
    for depth in (17, 100, 1000, 10**5, 10**6):
        post(f"nested {depth}", b'{"images": [], "prompts": [], "metadata": [' + b"[" * depth + b"]" * depth + b"]}",
             {400})
        post(f"nested {depth} unclosed", b"[" * depth, {400})
    for i, payload in enumerate([[], "x", {"images": "x", "prompts": []}, {"images": [good], "prompts": [1]},
                                 {"images": [good], "prompts": ["a"], "metadata": ["m"]},
                                 {"images": [1], "prompts": ["a"]}, {"images": [good], "prompts": ["a", "b"]},
                                 {"prompts": ["a"]}, {"images": []}]):
        post(f"wrong shape {i}", payload, {400})
    body = json.dumps(good_payload(1, 16)).encode()
    for i in range(10):  # Content-Length larger than the body: the half-close ends it at once
        post(f"length larger {i}", body, {None}, length=len(body) + int(rng.integers(1, 10000)))
    for i in range(10):  # smaller: the cut body is not JSON (the rest then reads as a garbled request)
        post(f"length smaller {i}", body, {400}, length=int(rng.integers(1, len(body) - 1)))
    post("length missing", body, {411}, length=False)
    for bad in ("-1", "abc", "1e3", "0x10", " ", "99999999999999999999", "\u00b2", "1 2"):
        post(f"length {bad!r}", body, {400, 413}, length=bad)
    post("length over the limit", body, {413}, length=HOSTILE_LIMITS.max_body_bytes + 1)
    post("chunked", body, {411}, headers={**AUTH, "Transfer-Encoding": "chunked"})
    post("no token", body, {401}, headers={})
    for i in range(15):
        token = base64.b64encode(rng.bytes(int(rng.integers(1, 40)))).decode()
        post(f"wrong token {i}", body, {401}, headers={"Authorization": f"Bearer {token}"})
    post("token as basic", body, {401}, headers={"Authorization": f"Basic {SECRET}"})
    post("token with a suffix", body, {401}, headers={"Authorization": f"Bearer {SECRET}x"})
    post("wrong route", body, {404}, path="/admin")
    cases.append(("GET without token", b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", {401}, True))
    # stalled clients: the connection stays open, the socket timeout drops it
    cases.append(("stall in headers", b"POST /score HTTP/1.1\r\nHost: x\r\n", {None}, False))
    cases.append(("stall in body", http_post(body, AUTH, length=len(body) + 100), {None}, False))
    return cases


def test_hostile_requests_are_refused_in_bounded_time_and_good_ones_still_score(monkeypatch):
    scorer = Counting()
    s = start(scorer, limits=HOSTILE_LIMITS, secret=SECRET)
    port, cases = s.server_address[1], hostile_cases()
    assert len(cases) >= 200
    decoded = []  # the pixels of every image that reached the decoder
    real_decode = server_mod.decode_png
    monkeypatch.setattr(server_mod, "decode_png",
                        lambda text, *a: decoded.append(np.prod(png_size(text))) or real_decode(text, *a))
    failures = []
    try:
        for name, data, expect, half_close in cases:
            t0 = time.perf_counter()
            status, answer = raw_exchange(port, data, half_close)
            took = time.perf_counter() - t0
            if status not in expect or took > BOUND:
                failures.append((name, status, round(took, 2), answer[:160]))
            elif status is not None:
                error = json.loads(answer)["error"]
                if status == 413 and "(--" not in error:
                    failures.append((name, "413 without the flag", error))
        assert not failures, failures[:10]
        # nothing hostile reached the scorer, nor an image over the limit a decoder
        assert scorer.calls == 0 and max(decoded) <= HOSTILE_LIMITS.max_image_pixels
        policy = RetryPolicy(timeout=5.0, retries=0)
        payload = good_payload(3, 16, seed=5)
        answer = request_json(f"{s.url}/score", payload, policy, AUTH)
        ims = np.stack([server_mod.decode_png(x) for x in payload["images"]])
        assert answer["scores"] == brightness(ims, [], []) and scorer.calls == 1
    finally:
        stop(s)


def test_four_9000_square_black_pngs_are_refused_before_decoding(monkeypatch):
    scorer = Counting()
    s = start(scorer)  # the default limits
    monkeypatch.setattr(server_mod, "decode_png", lambda *a, **k: pytest.fail("decoded a bomb"))
    b = bomb()
    try:
        t0 = time.perf_counter()
        with pytest.raises(RemoteError, match=r"HTTP 413: image 0's width x height \(9000 x 9000\) is 81000000, "
                                              r"over the limit of 16777216 \(--max-image-pixels\)"):
            request_json(f"{s.url}/score", {"images": [b] * 4, "prompts": ["a"] * 4}, RetryPolicy(5.0, 0))
        assert time.perf_counter() - t0 < 1.0 and scorer.calls == 0
    finally:
        stop(s)


def test_png_size_and_json_depth_checks():
    assert png_size(encode_png(np.zeros((3, 5, 3), np.uint8))) == (5, 3)
    assert png_size(fake_ihdr(9000, 9000)) == (9000, 9000)
    for bad in ("", "bm90IGEgcG5n", fake_ihdr(4, 4)[:20], "@@@@" * 20):
        with pytest.raises(ValueError):
            png_size(bad)
    check_json_depth(b'{"a": ["[[[[[[[[[[", {"b": "\\"[[[["}]}', 3)  # brackets in strings do not count
    with pytest.raises(ValueError, match="nesting depth is 4, over the limit of 3 \\(--max-json-depth\\)"):
        check_json_depth(b'{"a": [[{"b": 1}]]}', 3)


def test_a_busy_server_answers_503_after_the_queue_wait():
    release = threading.Event()
    s = start(lambda im, p, m: release.wait(10) and brightness(im, p, m),
              limits=Limits(max_inflight=1, queue_wait=0.2))
    payload, policy = good_payload(1), RetryPolicy(timeout=10.0, retries=0)
    first = threading.Thread(target=request_json, args=(f"{s.url}/score", payload, policy))
    try:
        first.start()
        time.sleep(0.3)  # the first holds the only slot
        with pytest.raises(RemoteError, match=r"HTTP 503: busy: 1 requests in flight \(--max-inflight\)"):
            request_json(f"{s.url}/score", payload, policy)
    finally:
        release.set()
        first.join(10)
        stop(s)


def test_a_stalled_client_never_holds_the_scorer():
    """A client that sends its headers and half its body, then nothing, holds one in-flight slot (its body counts
    in the memory bound) until the socket timeout drops it, but not the scorer: good requests score meanwhile."""
    scorer = Counting()
    s = start(scorer, limits=Limits(max_inflight=2, socket_timeout=3.0))
    body = json.dumps(good_payload(2)).encode()
    try:
        stalled = socket.create_connection(("127.0.0.1", s.server_address[1]))
        stalled.sendall(http_post(body)[: -len(body) // 2])
        time.sleep(0.2)
        t0 = time.perf_counter()
        for seed in range(3):
            payload = good_payload(2, seed=seed)
            answer = request_json(f"{s.url}/score", payload, RetryPolicy(timeout=10.0, retries=0))
            assert answer["scores"]["score"] == brightness(scorer.images[-1], None, None)["score"]
        assert time.perf_counter() - t0 < 2.0 and scorer.calls == 3  # well before the stalled one is dropped
        stalled.settimeout(10.0)
        assert stalled.recv(1024) == b""  # then the server closes it, unanswered
        stalled.close()
    finally:
        stop(s)


def test_limits_refuse_bad_values():
    with pytest.raises(ValueError, match="--max-images must be a positive int"):
        Limits(max_images=0)
    with pytest.raises(ValueError, match="--socket-timeout must be a positive float"):
        Limits(socket_timeout=float("inf"))


# -- the secret and the bind address ---------------------------------------------------------------------------
def test_off_loopback_without_a_secret_exits_with_one_line(monkeypatch, capsys):
    monkeypatch.delenv("FLOWRL_REWARD_SECRET", raising=False)
    for host in ("0.0.0.0", "", "10.1.2.3", "example.org", "::"):
        assert main(["--scorer", "rewards.geneval:toy_scorer", "--host", host, "--port", "0"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"refusing to serve on {host!r} without a secret" in err, err
    monkeypatch.setenv("SHORT", "abc")
    assert main(["--scorer", "x:y", "--secret-env", "SHORT"]) == 2
    assert "at least 16 printable ASCII" in capsys.readouterr().err
    assert main(["--scorer", "x:y", "--secret-env", "UNSET_VARIABLE_FOR_TEST"]) == 2
    assert "--secret-env UNSET_VARIABLE_FOR_TEST: that environment variable is not set" in capsys.readouterr().err
    assert main(["--scorer", "x:y", "--secret-file", "/nonexistent/secret"]) == 2
    assert "--secret-file /nonexistent/secret: cannot read it" in capsys.readouterr().err


def test_a_secret_gates_every_request_and_the_scorer():
    scorer = Counting()
    s = start(scorer, host="0.0.0.0", secret=SECRET)
    url, policy = f"http://127.0.0.1:{s.server_address[1]}", RetryPolicy(timeout=5.0, retries=0)
    try:
        for headers in ({}, {"Authorization": "Bearer wrong-secret-0123456789"}, {"Authorization": SECRET}):
            with pytest.raises(RemoteError, match="HTTP 401: missing or wrong bearer token") as e:
                request_json(f"{url}/score", good_payload(), policy, headers)
            assert SECRET not in str(e.value)
            with pytest.raises(RemoteError, match="HTTP 401"):
                request_json(f"{url}/health", None, policy, headers)
        assert scorer.calls == 0
        assert request_json(f"{url}/health", None, policy, AUTH)["status"] == "ok"
        answer = request_json(f"{url}/score", good_payload(), policy, AUTH)
        assert len(answer["scores"]["score"]) == 2 and scorer.calls == 1
    finally:
        stop(s)
    with pytest.raises(ValueError, match="refusing to serve on '0.0.0.0' without a secret"):
        RewardServer(brightness, host="0.0.0.0")


def test_cli_server_with_a_secret_file_off_loopback(tmp_path):
    """`python -m rewards.server --host 0.0.0.0 --secret-file`: the remote reward gets in with the variable."""
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    secret_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k != "FLOWRL_REWARD_SECRET"}
    proc = subprocess.Popen([sys.executable, "-m", "rewards.server", "--scorer", "rewards.geneval:toy_scorer",
                             "--host", "0.0.0.0", "--port", "0", "--secret-file", str(secret_file)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "serving rewards.geneval:toy_scorer on http://0.0.0.0:" in line, proc.stderr.read()
        url = "http://127.0.0.1:" + line.strip().rsplit(":", 1)[1]
        with pytest.raises(RemoteError, match=r"HTTP 401.*the server wants its secret in \$FLOWRL_REWARD_SECRET"):
            build_reward("remote", url=url, timeout=5.0, retries=0)
        os.environ["TEST_REWARD_SECRET"] = SECRET
        try:
            reward = build_reward("remote", url=url, timeout=5.0, retries=0, secret_env="TEST_REWARD_SECRET")
        finally:
            del os.environ["TEST_REWARD_SECRET"]
        assert reward.scorer == "rewards.geneval:toy_scorer" and SECRET not in repr(reward)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert SECRET not in err  # never logged
