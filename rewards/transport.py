"""JSON over HTTP with timeouts and retries, shared by the remote reward client and the VLM judge.

Stdlib only (urllib): the reward server's clients must not pull a web stack into the training environment.

What is retried: a refused or reset connection, a timeout, and HTTP 408 / 429 / 502 / 503 / 504 — the
failures of a server that is restarting, overloaded or behind a proxy that lost it. Everything else (400, 404,
500 from a scorer that raised) is a deterministic answer and fails at once with the server's message. Attempt
``k`` (from 0) is followed by a pause of ``backoff * 2**k`` seconds.
"""
from __future__ import annotations

import ipaddress
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

RETRY_STATUS = (408, 429, 502, 503, 504)


class RemoteError(RuntimeError):
    """A request failed for good; the message names the URL and says why."""


@dataclass(frozen=True)
class RetryPolicy:
    timeout: float = 60.0   # seconds per socket operation (connect, each read), not for the whole request
    retries: int = 3        # extra attempts after the first
    backoff: float = 1.0    # seconds before the first retry; doubles after each

    def __post_init__(self):
        for name in ("timeout", "backoff"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or v == float("inf"):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.timeout == 0:
            raise ValueError("timeout must be > 0")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {self.retries!r}")


def _error_text(err: urllib.error.HTTPError) -> str:
    body = err.read().decode("utf-8", "replace")
    try:
        return str(json.loads(body).get("error", body))
    except (ValueError, AttributeError):
        return body.strip()[:2000] or err.reason


def _opener(url: str) -> urllib.request.OpenerDirector:
    """A loopback server is reached directly: an http_proxy set for the cluster must not swallow it."""
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    return urllib.request.build_opener(urllib.request.ProxyHandler({})) if loopback else urllib.request.build_opener()


def request_json(url: str, payload: Mapping[str, Any] | None, policy: RetryPolicy,
                 headers: Mapping[str, str] | None = None) -> Any:
    """GET (payload None) or POST a JSON body; the decoded JSON answer, after retries. Raises RemoteError."""
    data = None if payload is None else json.dumps(payload).encode("utf-8")
    method = "GET" if payload is None else "POST"
    hdrs = {"Content-Type": "application/json", "Accept": "application/json", **(headers or {})}
    attempts = policy.retries + 1
    opener, last = _opener(url), ""
    for k in range(attempts):
        try:
            req = urllib.request.Request(url, data=data, headers=hdrs, method=method)
            with opener.open(req, timeout=policy.timeout) as resp:
                body = resp.read()
            try:
                return json.loads(body)
            except ValueError:
                raise RemoteError(f"{method} {url}: the answer is not JSON: {body[:200]!r}") from None
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}: {_error_text(e)}"
            if e.code not in RETRY_STATUS:
                raise RemoteError(f"{method} {url} failed with {last}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            reason = getattr(e, "reason", e)
            last = f"{type(reason).__name__}: {reason}" if not isinstance(reason, str) else reason
        if k + 1 < attempts:
            time.sleep(policy.backoff * 2**k)
    raise RemoteError(f"{method} {url} failed after {attempts} attempt(s); last error: {last}")


__all__ = ["RETRY_STATUS", "RemoteError", "RetryPolicy", "request_json"]
