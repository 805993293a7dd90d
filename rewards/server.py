"""A reward server: any scorer behind a small HTTP endpoint on loopback, for rewards whose dependencies cannot
live in the training environment (GenEval's mmdet / mmcv stack, an OCR engine, a judge on its own GPU).

    python -m rewards.server --scorer rewards.geneval:GenEvalScorer --scorer-kwargs '{"detector": ...}' --port 18085

A scorer is a callable ``scorer(images, prompts, metadata) -> {name: [float] * N}``: ``images`` a uint8 array
(N, H, W, 3), ``prompts`` N strings, ``metadata`` N JSON dicts. ``--scorer module:attr`` names it; with
``--scorer-kwargs`` the attribute is a factory called once with those arguments (a class, say) and its
result is the scorer. The client is the ``remote`` reward (rewards/remote.py).

Protocol (JSON both ways, so a server can be written in anything):
    GET  /health -> {"status": "ok", "scorer": "<module:attr>", "limits": {...}}
    POST /score  {"images": [base64 PNG, ...], "prompts": [...], "metadata": [{...}, ...]}
              -> {"scores": {"name": [float, ...], ...}}
    errors       -> {"error": "..."} with 400 (a malformed request), 401 (no or a wrong token), 411 / 413 (no
                    Content-Length, a request over a limit: the message names its flag), 503 (busy: retry) or
                    500 (the scorer raised or returned junk)

Limits (rewards/server_limits.py): body size (checked from Content-Length before a byte is read), images per
request, pixels per image and per request (from the PNG headers, before anything is decompressed), prompt
length, metadata size, JSON nesting depth. A connection silent for --socket-timeout is dropped and a body must
arrive within --body-deadline, so a stalled client never holds more than its own thread and in-flight slot;
the scorer's lock is taken only once a body is in and parsed. At most --max-inflight requests are read, decoded
and scored at once; the others wait up to --queue-wait seconds for a slot, then get a 503 the clients retry.

Secret. With one (from the variable --secret-env names, default FLOWRL_REWARD_SECRET, or --secret-file),
every request, /health included, needs ``Authorization: Bearer <secret>``; without it the answer is a 401 and
nothing is scored. The server refuses to bind off loopback without a secret. The secret is never logged.

Why PNG in JSON: images are quantised to uint8 exactly as an image file holds them, which is what detectors
and OCR engines are built and benchmarked on (GenEval grades saved PNGs), so a score through the server is
the score of the saved image. PNG is lossless and about half the size of raw pixels on smooth images (a
512x512 one: 397 KB against 768 KB, 42 ms to encode); base64 adds a third. Never pickle: unpickling a request
runs arbitrary code in the server.

One request is scored at a time (a lock): scorers usually hold one model on one device, and several training
processes may call at once. This module needs only the standard library, numpy and Pillow, so it also runs
as a plain file (``python path/to/server.py``, server_limits.py beside it) where the rest of flowrl does not
install.
"""
from __future__ import annotations

import argparse
import base64
import hmac
import importlib
import io
import ipaddress
import json
import math
import os
import socket
import stat
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

try:  # a package module, or a plain file next to server_limits.py (see the docstring)
    from .server_limits import LimitExceeded, Limits, add_limit_args, check_json_depth, limits_from_args, over, png_size
except ImportError:
    from server_limits import LimitExceeded, Limits, add_limit_args, check_json_depth, limits_from_args, over, png_size

Scorer = Callable[[np.ndarray, list, list], Mapping[str, Sequence[float]]]
PNG_COMPRESS_LEVEL = 1  # zlib level 1: level 6 saves another 14% of the bytes at twice the encode time
SECRET_ENV = "FLOWRL_REWARD_SECRET"  # the variable the server and its clients read the shared secret from


# -- codec (shared with the client) -------------------------------------------------------------------
def encode_png(image: np.ndarray) -> str:
    """(H, W, 3) uint8 -> base64 PNG text."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 array, got {image.dtype} {image.shape}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(text: str, max_pixels: int | None = None) -> np.ndarray:
    """base64 PNG text -> (H, W, 3) uint8 (any PNG mode is converted to RGB). With ``max_pixels``, the size in
    the PNG header is checked before anything is decompressed."""
    if max_pixels is not None:
        width, height = png_size(text)
        if width * height > max_pixels:
            raise over("an image's width x height", width * height, max_pixels, "max_image_pixels")
    with Image.open(io.BytesIO(base64.b64decode(text, validate=True)), formats=["PNG"]) as img:
        if max_pixels is not None and img.width * img.height > max_pixels:  # PIL's size, should it differ
            raise over("an image's width x height", img.width * img.height, max_pixels, "max_image_pixels")
        return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))  # convert would copy an RGB one


class BadRequest(ValueError):
    """The request, not the scorer, is at fault (HTTP 400)."""


def _check_entries(prompts: list, metadata: list, limits: Limits) -> None:
    for i, p in enumerate(prompts):
        if len(p) > limits.max_prompt_chars:
            raise over(f"prompt {i}'s length", len(p), limits.max_prompt_chars, "max_prompt_chars")
    for i, m in enumerate(metadata):
        size = len(json.dumps(m).encode("utf-8"))
        if size > limits.max_metadata_bytes:
            raise over(f"metadata entry {i}'s size in bytes", size, limits.max_metadata_bytes, "max_metadata_bytes")


def _image_sizes(images: list, limits: Limits) -> tuple[int, int]:
    """Every image's (width, height) from its PNG header, checked against the limits; the common size."""
    sizes = []
    for i, text in enumerate(images):
        try:
            sizes.append(png_size(text))
        except ValueError as e:
            raise BadRequest(f"an image is not a base64 PNG (image {i}: {e})") from None
        w, h = sizes[-1]
        if w * h > limits.max_image_pixels:
            raise over(f"image {i}'s width x height ({w} x {h})", w * h, limits.max_image_pixels, "max_image_pixels")
    if len(set(sizes)) != 1:
        raise BadRequest(f"images differ in size (width, height): {sorted(set(sizes))[:10]}")
    total = sum(w * h for w, h in sizes)
    if total > limits.max_request_pixels:
        raise over("the request's total pixels", total, limits.max_request_pixels, "max_request_pixels")
    return sizes[0]


def load_request(body: bytes, limits: Limits = Limits()) -> tuple[list, list[str], list[dict]]:
    """The body -> (base64 images, prompts, metadata), every limit but the pixels' checked; nesting before
    parsing, so json.loads never recurses deep."""
    check_json_depth(body, limits.max_json_depth)
    try:
        req = json.loads(body)
    except RecursionError:  # unreachable below the depth check; kept so nesting can never become a 500
        raise over("the JSON nesting depth", limits.max_json_depth + 1, limits.max_json_depth, "max_json_depth",
                   status=400) from None
    except ValueError as e:  # UnicodeDecodeError included: the body is not UTF-8
        raise BadRequest(f"body is not JSON: {e}") from None
    if not isinstance(req, dict) or not {"images", "prompts"} <= set(req):
        raise BadRequest('expected a JSON object with "images" and "prompts" (and optional "metadata")')
    images, prompts = req["images"], req["prompts"]
    if not isinstance(images, list) or not images:
        raise BadRequest('"images" must be a non-empty list of base64 PNG strings')
    if len(images) > limits.max_images:
        raise over("the number of images", len(images), limits.max_images, "max_images")
    metadata = req.get("metadata") or [{} for _ in images]
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise BadRequest('"prompts" must be a list of strings')
    if not isinstance(metadata, list) or not all(isinstance(m, dict) for m in metadata):
        raise BadRequest('"metadata" must be a list of objects')
    if not len(images) == len(prompts) == len(metadata):
        raise BadRequest(f"got {len(images)} images, {len(prompts)} prompts, {len(metadata)} metadata entries")
    _check_entries(prompts, metadata, limits)
    return images, prompts, metadata


def decode_images(images: list, limits: Limits = Limits()) -> np.ndarray:
    """Base64 PNGs -> (N, H, W, 3) uint8, the sizes checked from the PNG headers before any is decompressed.
    Decoded in place (no second copy by np.stack); each text is dropped from ``images`` once decoded."""
    width, height = _image_sizes(images, limits)
    out = np.empty((len(images), height, width, 3), np.uint8)
    for i, text in enumerate(images):
        try:
            out[i] = decode_png(text, limits.max_image_pixels)
        except LimitExceeded:
            raise
        except Exception as e:  # noqa: BLE001 - any decoding failure is the request's fault
            raise BadRequest(f"an image is not a base64 PNG (image {i}: {type(e).__name__}: {e})") from None
        images[i] = None
    return out


def parse_request(body: bytes, limits: Limits = Limits()) -> tuple[np.ndarray, list[str], list[dict]]:
    """The body -> (images (N, H, W, 3) uint8, prompts, metadata); every limit checked before the image that
    could break it is decompressed."""
    images, prompts, metadata = load_request(body, limits)
    return decode_images(images, limits), prompts, metadata


def check_scores(scores: Any, n: int) -> dict[str, list[float]]:
    """The scorer's answer as {name: N floats}; anything else raises naming the key."""
    if not isinstance(scores, Mapping) or not scores:
        raise ValueError(f"scorer must return a non-empty dict of score lists, got {type(scores).__name__}")
    out = {}
    for key, values in scores.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"scorer returned a bad score name {key!r}")
        try:
            floats = [float(v) for v in values]
        except (TypeError, ValueError):
            raise ValueError(f"scorer's {key!r} must be a list of numbers") from None
        if len(floats) != n:
            raise ValueError(f"scorer's {key!r} has {len(floats)} values for {n} images")
        bad = [i for i, v in enumerate(floats) if not math.isfinite(v)]
        if bad:  # JSON cannot carry NaN portably
            raise ValueError(f"scorer's {key!r} is NaN/inf at {bad[:10]}")
        out[key] = floats
    return out


# -- authentication -------------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback  # 127.0.0.0/8 and ::1
    except ValueError:
        return False  # "" (every interface) or a name, which may resolve anywhere


def check_secret(secret: str | None, host: str) -> None:
    """A secret, when given, must be a usable bearer token; a bind off loopback must have one."""
    if secret is not None and (len(secret) < 16 or not all(33 <= ord(c) < 127 for c in secret)):
        raise ValueError("the secret must be at least 16 printable ASCII characters without spaces, e.g. "
                         "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
    if secret is None and not is_loopback(host):
        raise ValueError(f"refusing to serve on {host!r} without a secret: any host that reaches it could run the "
                         f"scorer; set {SECRET_ENV} (or --secret-env NAME / --secret-file PATH) or bind 127.0.0.1")


# -- server -------------------------------------------------------------------------------------------
class RewardServer(ThreadingHTTPServer):
    daemon_threads = True  # a stuck request must not keep the process alive at shutdown

    def __init__(self, scorer: Scorer, host: str = "127.0.0.1", port: int = 0, name: str = "",
                 limits: Limits = Limits(), secret: str | None = None):
        if not callable(scorer):
            raise TypeError(f"scorer must be callable, got {type(scorer).__name__}")
        check_secret(secret, host)
        self.scorer, self.scorer_name = scorer, name or getattr(scorer, "__qualname__", type(scorer).__name__)
        self.limits, self._secret = limits, None if secret is None else secret.encode("ascii")
        self.lock = threading.Lock()                                   # one request scored at a time
        self.slots = threading.BoundedSemaphore(limits.max_inflight)   # requests read / decoded / scored at once
        self.connections = threading.BoundedSemaphore(limits.max_connections)
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def authorized(self, header: str | None) -> bool:
        if self._secret is None:
            return True
        scheme, _, token = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("latin-1"), self._secret)

    def score(self, images: np.ndarray, prompts: list[str], metadata: list[dict]) -> dict:
        with self.lock:  # taken only once the body is in and parsed: a slow client never holds the scorer
            scores = self.scorer(images, prompts, metadata)
        return {"scores": check_scores(scores, len(prompts))}

    # a thread per connection, at most max_connections of them; one more is closed at once
    def process_request(self, request, client_address):
        if not self.connections.acquire(blocking=False):
            sys.stderr.write(f"rewards.server: {client_address[0]} refused: {self.limits.max_connections} "
                             "connections open (--max-connections)\n")
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer
    protocol_version = "HTTP/1.1"

    def setup(self):
        self.timeout = self.server.limits.socket_timeout  # a silent client is dropped (TimeoutError below)
        super().setup()

    def _send(self, status: int, obj: dict, close: bool = False, headers: Mapping[str, str] | None = None) -> None:
        """``close``: the body was not read, so the connection cannot carry another request."""
        body = json.dumps(obj).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def send_error(self, code, message=None, explain=None):  # http.server's own errors, as JSON too
        self._send(int(code), {"error": message or explain or HTTPStatus(code).phrase}, close=True)

    def _refuse_unauthorized(self) -> bool:
        if self.server.authorized(self.headers.get("Authorization")):
            return False
        self._send(401, {"error": "missing or wrong bearer token (Authorization: Bearer <the server's secret>)"},
                   close=True, headers={"WWW-Authenticate": "Bearer"})
        return True

    def do_GET(self):
        if self._refuse_unauthorized():
            return
        if self.path.rstrip("/") == "/health":
            self._send(200, {"status": "ok", "scorer": self.server.scorer_name, "limits": asdict(self.server.limits)})
        else:
            self._send(404, {"error": f"no route GET {self.path}; try GET /health or POST /score"})

    def _content_length(self) -> int | None:
        """The body's declared length, or None once a 411 / 400 / 413 has been sent (the body left unread)."""
        text, limit = self.headers.get("Content-Length"), self.server.limits.max_body_bytes
        if text is None or self.headers.get("Transfer-Encoding"):
            self._send(411, {"error": "a POST needs a Content-Length header (chunked bodies are not accepted)"},
                       close=True)
            return None
        if not (text.strip().isascii() and text.strip().isdigit()):  # "²".isdigit() too
            self._send(400, {"error": f"Content-Length must be a non-negative integer, got {text[:40]!r}"},
                       close=True)
            return None
        length = int(text)
        if length > limit:
            self._send(413, {"error": str(over("the body's Content-Length", length, limit, "max_body_bytes"))},
                       close=True)
            return None
        return length

    def _read_body(self, length: int) -> bytearray | None:
        """Exactly ``length`` bytes within --body-deadline, each read waiting at most --socket-timeout; None if
        the client closed or stalled (the connection is then dropped: it has no answer to wait for)."""
        limits = self.server.limits
        deadline, body, got = time.monotonic() + limits.body_deadline, bytearray(length), 0
        view = memoryview(body)
        try:
            while got < length:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"body not complete within {limits.body_deadline:g} s (--body-deadline)")
                self.connection.settimeout(min(limits.socket_timeout, left))
                chunk = self.rfile.read1(min(length - got, 2**20))
                if not chunk:
                    self.log_error("client closed after %d of %d body bytes", got, length)
                    self.close_connection = True
                    return None
                view[got:got + len(chunk)] = chunk
                got += len(chunk)
        except TimeoutError as e:
            self.log_error("dropped: %s after %d of %d body bytes", e or "timed out", got, length)
            self.close_connection = True
            return None
        finally:
            self.connection.settimeout(limits.socket_timeout)
        return body

    def do_POST(self):
        if self.path.rstrip("/") != "/score":
            self._send(404, {"error": f"no route POST {self.path}; try POST /score"}, close=True)
            return
        if self._refuse_unauthorized():
            return
        length = self._content_length()
        if length is None:
            return
        limits = self.server.limits
        if not self.server.slots.acquire(timeout=limits.queue_wait):
            self._send(503, {"error": f"busy: {limits.max_inflight} requests in flight (--max-inflight) for over "
                                      f"{limits.queue_wait:g} s (--queue-wait); retry later"},
                       close=True, headers={"Retry-After": "1"})
            return
        try:
            body = self._read_body(length)
            if body is None:
                return
            try:
                texts, prompts, metadata = load_request(body, limits)
                del body  # the request's memory: its body, then its texts, then its pixels, not all three
                answer = self.server.score(decode_images(texts, limits), prompts, metadata)
            except LimitExceeded as e:
                self._send(e.status, {"error": str(e)})
                return
            except BadRequest as e:
                self._send(400, {"error": str(e)})
                return
            except Exception as e:  # noqa: BLE001 - the scorer's failure goes back to the client, the server lives on
                traceback.print_exc()
                self._send(500, {"error": f"{type(e).__name__}: {e}"})
                return
            self._send(200, answer)
        finally:
            self.server.slots.release()

    def log_message(self, fmt, *args):  # one line per request on stderr (never a header: the token is in one)
        sys.stderr.write(f"rewards.server: {self.address_string()} {fmt % args}\n")


def load_callable(target: str, kwargs: Mapping[str, Any] | None, what: str) -> Callable:
    """``module:attr`` (dotted attr allowed) -> the object; with ``kwargs`` (even {}), ``attr(**kwargs)``.
    ``what`` names the option in errors (also used by the OCR engine and pairwise judge options)."""
    module, sep, attr = target.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"{what} must look like module:callable, got {target!r}")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    obj = obj(**kwargs) if kwargs is not None else obj
    if not callable(obj):
        raise ValueError(f"{what} {target!r} is not callable" + (" once built" if kwargs is not None else ""))
    return obj


def load_scorer(target: str, kwargs: Mapping[str, Any] | None = None) -> Scorer:
    """``module:attr`` -> the scorer; with ``kwargs`` (even {}), ``attr(**kwargs)``."""
    return load_callable(target, kwargs, "--scorer")


def read_secret(secret_env: str | None, secret_file: str | None) -> str | None:
    """The shared secret from --secret-file, else from the variable --secret-env names (default SECRET_ENV, which
    may be unset: no secret). Raises ValueError naming the flag; never quotes the secret."""
    if secret_file is not None:
        path = Path(secret_file)
        try:
            text = path.read_text(encoding="utf-8").strip()
            mode = path.stat().st_mode
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--secret-file {secret_file}: cannot read it ({type(e).__name__}: {e})") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            sys.stderr.write(f"rewards.server: warning: --secret-file {secret_file} is readable by other users "
                             "(chmod 600 it)\n")
        if not text:
            raise ValueError(f"--secret-file {secret_file} is empty")
        return text
    text = os.environ.get(secret_env or SECRET_ENV, "").strip()
    if secret_env is not None and not text:
        raise ValueError(f"--secret-env {secret_env}: that environment variable is not set")
    return text or None


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rewards.server", description=__doc__.split("\n\n")[0])
    ap.add_argument("--scorer", required=True, help="module:callable, e.g. rewards.geneval:GenEvalScorer")
    ap.add_argument("--scorer-kwargs", default=None,
                    help="JSON object; when given, the callable is a factory called with it to build the scorer")
    ap.add_argument("--host", default="127.0.0.1",
                    help="bind address; off loopback (127.0.0.0/8, ::1, localhost) a secret is required")
    ap.add_argument("--port", type=int, default=18085, help="0 picks a free port")
    secret = ap.add_mutually_exclusive_group()
    secret.add_argument("--secret-env", default=None, metavar="NAME",
                        help=f"environment variable holding the shared secret (default {SECRET_ENV}; unset: none); "
                             "clients send it as 'Authorization: Bearer <secret>'")
    secret.add_argument("--secret-file", default=None, metavar="PATH",
                        help="file holding the shared secret (there is no --secret: argv is visible to every user)")
    add_limit_args(ap)
    args = ap.parse_args(argv)
    kwargs = None
    if args.scorer_kwargs is not None:
        kwargs = json.loads(args.scorer_kwargs)
        if not isinstance(kwargs, dict):
            ap.error("--scorer-kwargs must be a JSON object")
    try:  # every refusal before the scorer (maybe a model) is loaded: one line and exit status 2
        limits = limits_from_args(args)
        secret = read_secret(args.secret_env, args.secret_file)
        check_secret(secret, args.host)
    except ValueError as e:
        sys.stderr.write(f"python -m rewards.server: {e}\n")
        return 2
    Image.MAX_IMAGE_PIXELS = limits.max_image_pixels  # PIL's own bomb guard agrees with ours (this process only)
    server = RewardServer(load_scorer(args.scorer, kwargs), args.host, args.port, name=args.scorer, limits=limits,
                          secret=secret)
    print(f"rewards.server: serving {args.scorer} on {server.url}", flush=True)  # scripts read the port here
    if secret is not None:
        sys.stderr.write("rewards.server: every request needs 'Authorization: Bearer <secret>'\n")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
