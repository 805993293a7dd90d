"""JSON over HTTP with deadlines and retries, shared by the remote reward client and the VLM judge.

Stdlib only (urllib): the reward server's clients must not pull a web stack into the training environment.

Time. ``timeout`` bounds each socket operation (connect, each send, each read); ``deadline`` bounds one attempt
as a whole, connect to the last byte of the answer: a watchdog shuts the attempt's socket when it passes, so a
server that trickles its answer cannot hold the caller longer. An answer over ``MAX_ANSWER_BYTES`` is refused.

What is retried: a refused or reset connection, a timeout or a missed deadline, a garbled HTTP answer, and HTTP
408 / 429 / 502 / 503 / 504 — the failures of a server that is restarting, overloaded or behind a proxy that lost
it. Everything else (400, 401, 404, 413, 500 from a scorer that raised) is a deterministic answer and fails at once
with the server's message. Attempt ``k`` (from 0) is followed by a pause of ``backoff * 2**k`` seconds.
"""
from __future__ import annotations

import http.client
import ipaddress
import json
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

RETRY_STATUS = (408, 429, 502, 503, 504)
MAX_ANSWER_BYTES = 64 * 2**20  # scores and judge answers are small; a server sending more is broken


class RemoteError(RuntimeError):
    """A request failed for good; the message names the URL and says why."""


@dataclass(frozen=True)
class RetryPolicy:
    timeout: float = 60.0          # seconds per socket operation (connect, each send, each read)
    retries: int = 3               # extra attempts after the first
    backoff: float = 1.0           # seconds before the first retry; doubles after each
    deadline: float | None = None  # seconds for one attempt as a whole; None: the timeout

    def __post_init__(self):
        for name in ("timeout", "backoff", "deadline"):
            v = getattr(self, name)
            if name == "deadline" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or v == float("inf"):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.timeout == 0 or self.deadline == 0:
            raise ValueError("timeout and deadline must be > 0")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {self.retries!r}")

    @property
    def attempt_deadline(self) -> float:
        return self.timeout if self.deadline is None else self.deadline


class _HTTPFailure(Exception):
    def __init__(self, code: int, text: str):
        super().__init__(f"HTTP {code}: {text}")
        self.code = code


class _TooBig(Exception):
    pass


class _Watchdog:
    """Shuts every socket of one attempt once ``seconds`` have passed; ``fired`` says whether it did."""

    def __init__(self, seconds: float):
        self.lock, self.socks, self.fired = threading.Lock(), [], False
        self.timer = threading.Timer(seconds, self._fire)
        self.timer.daemon = True

    def watch(self, sock) -> None:
        with self.lock:
            self.socks.append(sock)
            if self.fired:
                _shut(sock)

    def _fire(self) -> None:
        with self.lock:
            self.fired = True
            for sock in self.socks:
                _shut(sock)


def _shut(sock) -> None:
    try:  # shutdown (not close) wakes a thread blocked in send / recv; the plain socket's, for TLS too
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


def _watched(cls: type, dog: _Watchdog) -> type:
    class Watched(cls):
        def connect(self):
            super().connect()
            dog.watch(self.sock)

    return Watched


class _WatchedOpen:
    """A urllib handler mixin: every connection the handler opens is watched by ``dog``."""

    def __init__(self, dog: _Watchdog):
        super().__init__()
        self.dog = dog

    def do_open(self, http_class, req, **kwargs):
        return super().do_open(_watched(http_class, self.dog), req, **kwargs)


class _HTTPHandler(_WatchedOpen, urllib.request.HTTPHandler):
    pass


class _HTTPSHandler(_WatchedOpen, urllib.request.HTTPSHandler):
    pass


def _error_text(err: urllib.error.HTTPError) -> str:
    body = err.read(65536).decode("utf-8", "replace")
    try:
        return str(json.loads(body).get("error", body))
    except (ValueError, AttributeError):
        return body.strip()[:2000] or err.reason


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _opener(url: str, dog: _Watchdog) -> urllib.request.OpenerDirector:
    """A loopback server is reached directly: an http_proxy set for the cluster must not swallow it."""
    handlers = [_HTTPHandler(dog), _HTTPSHandler(dog)]
    return urllib.request.build_opener(*handlers, *([urllib.request.ProxyHandler({})] if _is_loopback(url) else []))


def _read(resp) -> bytes:
    chunks, size = [], 0
    while chunk := resp.read(2**20):
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise _TooBig
        chunks.append(chunk)
    return b"".join(chunks)


def _attempt(url: str, data: bytes | None, method: str, headers: dict, policy: RetryPolicy) -> bytes:
    """One request; the answer's body, or _HTTPFailure / a transport error (TimeoutError past the deadline)."""
    deadline = policy.attempt_deadline
    dog = _Watchdog(deadline)
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    dog.timer.start()
    try:
        try:
            with _opener(url, dog).open(req, timeout=min(policy.timeout, deadline)) as resp:
                body = _read(resp)
        except urllib.error.HTTPError as e:
            raise _HTTPFailure(e.code, _error_text(e)) from None
    except (_HTTPFailure, _TooBig, OSError, http.client.HTTPException) as e:
        if dog.fired:
            raise TimeoutError(f"timed out: no complete answer within the {deadline:g} s deadline") from None
        raise e
    finally:
        dog.timer.cancel()
    if dog.fired:  # the last read may have ended at the shutdown: the body is not to be trusted
        raise TimeoutError(f"timed out: no complete answer within the {deadline:g} s deadline")
    return body


def request_json(url: str, payload: Mapping[str, Any] | bytes | None, policy: RetryPolicy,
                 headers: Mapping[str, str] | None = None) -> Any:
    """GET (payload None) or POST a JSON body (a mapping, or its bytes already encoded); the decoded JSON answer,
    after retries. Raises RemoteError."""
    data = payload if isinstance(payload, (bytes, bytearray)) or payload is None else json.dumps(payload).encode()
    method = "GET" if payload is None else "POST"
    hdrs = {"Content-Type": "application/json", "Accept": "application/json", **(headers or {})}
    attempts, last = policy.retries + 1, ""
    for k in range(attempts):
        try:
            body = _attempt(url, data, method, hdrs, policy)
        except _HTTPFailure as e:
            last = str(e)
            if e.code not in RETRY_STATUS:
                raise RemoteError(f"{method} {url} failed with {last}") from None
        except _TooBig:
            raise RemoteError(f"{method} {url}: the answer is over {MAX_ANSWER_BYTES} bytes") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", e)
            last = f"{type(reason).__name__}: {reason}" if not isinstance(reason, str) else reason
            if data is not None and len(data) > 2**20 and isinstance(reason, (BrokenPipeError, ConnectionResetError)):
                last += f" (sending {len(data)} bytes: the server may refuse a body this big, see its --max-body-bytes)"
        else:
            try:
                return json.loads(body)
            except ValueError:
                raise RemoteError(f"{method} {url}: the answer is not JSON: {body[:200]!r}") from None
        if k + 1 < attempts:
            time.sleep(policy.backoff * 2**k)
    raise RemoteError(f"{method} {url} failed after {attempts} attempt(s); last error: {last}")


__all__ = ["MAX_ANSWER_BYTES", "RETRY_STATUS", "RemoteError", "RetryPolicy", "request_json"]
