"""A reward server: any scorer behind a small HTTP endpoint on loopback, for rewards whose dependencies cannot
live in the training environment (GenEval's mmdet / mmcv stack, an OCR engine, a judge on its own GPU).

    python -m rewards.server --scorer rewards.geneval:GenEvalScorer --scorer-kwargs '{"detector": ...}' --port 18085

A scorer is a callable ``scorer(images, prompts, metadata) -> {name: [float] * N}``: ``images`` a uint8 array
(N, H, W, 3), ``prompts`` N strings, ``metadata`` N JSON dicts. ``--scorer module:attr`` names it; with
``--scorer-kwargs`` the attribute is a factory called once with those arguments (a class, say) and its
result is the scorer. The client is the ``remote`` reward (rewards/remote.py).

Protocol (JSON both ways, so a server can be written in anything):
    GET  /health -> {"status": "ok", "scorer": "<module:attr>"}
    POST /score  {"images": [base64 PNG, ...], "prompts": [...], "metadata": [{...}, ...]}
              -> {"scores": {"name": [float, ...], ...}}
    errors       -> {"error": "..."} with 400 (a malformed request) or 500 (the scorer raised or returned junk)

Why PNG in JSON: images are quantised to uint8 exactly as an image file holds them, which is what detectors
and OCR engines are built and benchmarked on (GenEval grades saved PNGs), so a score through the server is
the score of the saved image. PNG is lossless and about half the size of raw pixels on smooth images (a
512x512 one: 397 KB against 768 KB, 42 ms to encode); base64 adds a third. Never pickle: unpickling a request
runs arbitrary code in the server.

One request is scored at a time (a lock): scorers usually hold one model on one device, and several training
processes may call at once. This module needs only the standard library, numpy and Pillow, so it also runs
as a plain file (``python path/to/server.py``) where the rest of flowrl does not install.
"""
from __future__ import annotations

import argparse
import base64
import importlib
import io
import json
import math
import sys
import threading
import traceback
from collections.abc import Callable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
from PIL import Image

Scorer = Callable[[np.ndarray, list, list], Mapping[str, Sequence[float]]]
PNG_COMPRESS_LEVEL = 1  # zlib level 1: level 6 saves another 14% of the bytes at twice the encode time


# -- codec (shared with the client) -------------------------------------------------------------------
def encode_png(image: np.ndarray) -> str:
    """(H, W, 3) uint8 -> base64 PNG text."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 array, got {image.dtype} {image.shape}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(text: str) -> np.ndarray:
    """base64 PNG text -> (H, W, 3) uint8 (any PNG mode is converted to RGB)."""
    with Image.open(io.BytesIO(base64.b64decode(text, validate=True)), formats=["PNG"]) as img:
        return np.asarray(img.convert("RGB"))


class BadRequest(ValueError):
    """The request, not the scorer, is at fault (HTTP 400)."""


def parse_request(body: bytes) -> tuple[np.ndarray, list[str], list[dict]]:
    try:
        req = json.loads(body)
    except ValueError as e:
        raise BadRequest(f"body is not JSON: {e}") from None
    if not isinstance(req, dict) or not {"images", "prompts"} <= set(req):
        raise BadRequest('expected a JSON object with "images" and "prompts" (and optional "metadata")')
    images, prompts = req["images"], req["prompts"]
    metadata = req.get("metadata") or [{} for _ in images]
    if not isinstance(images, list) or not images:
        raise BadRequest('"images" must be a non-empty list of base64 PNG strings')
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise BadRequest('"prompts" must be a list of strings')
    if not isinstance(metadata, list) or not all(isinstance(m, dict) for m in metadata):
        raise BadRequest('"metadata" must be a list of objects')
    if not len(images) == len(prompts) == len(metadata):
        raise BadRequest(f"got {len(images)} images, {len(prompts)} prompts, {len(metadata)} metadata entries")
    try:
        arrays = [decode_png(x) for x in images]
    except Exception as e:  # noqa: BLE001 - any decoding failure is the request's fault
        raise BadRequest(f"an image is not a base64 PNG: {type(e).__name__}: {e}") from None
    if len({a.shape for a in arrays}) != 1:
        raise BadRequest(f"images differ in size: {sorted({a.shape for a in arrays})}")
    return np.stack(arrays), prompts, metadata


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


# -- server -------------------------------------------------------------------------------------------
class RewardServer(ThreadingHTTPServer):
    daemon_threads = True  # a stuck request must not keep the process alive at shutdown

    def __init__(self, scorer: Scorer, host: str = "127.0.0.1", port: int = 0, name: str = ""):
        if not callable(scorer):
            raise TypeError(f"scorer must be callable, got {type(scorer).__name__}")
        self.scorer, self.scorer_name = scorer, name or getattr(scorer, "__qualname__", type(scorer).__name__)
        self.lock = threading.Lock()
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def score(self, body: bytes) -> dict:
        images, prompts, metadata = parse_request(body)
        with self.lock:
            scores = self.scorer(images, prompts, metadata)
        return {"scores": check_scores(scores, len(prompts))}


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer
    protocol_version = "HTTP/1.1"

    def _send(self, status: int, obj: dict) -> None:
        body = json.dumps(obj).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path.rstrip("/") == "/health":
            self._send(200, {"status": "ok", "scorer": self.server.scorer_name})
        else:
            self._send(404, {"error": f"no route GET {self.path}; try GET /health or POST /score"})

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        if self.path.rstrip("/") != "/score":
            self._send(404, {"error": f"no route POST {self.path}; try POST /score"})
            return
        try:
            self._send(200, self.server.score(body))
        except BadRequest as e:
            self._send(400, {"error": str(e)})
        except Exception as e:  # noqa: BLE001 - the scorer's failure goes back to the client, the server lives on
            traceback.print_exc()
            self._send(500, {"error": f"{type(e).__name__}: {e}"})

    def log_message(self, fmt, *args):  # one line per request on stderr, without the default's timestamp noise
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


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rewards.server", description=__doc__.split("\n\n")[0])
    ap.add_argument("--scorer", required=True, help="module:callable, e.g. rewards.geneval:GenEvalScorer")
    ap.add_argument("--scorer-kwargs", default=None,
                    help="JSON object; when given, the callable is a factory called with it to build the scorer")
    ap.add_argument("--host", default="127.0.0.1",
                    help="bind address; the default keeps the server on loopback (no authentication here)")
    ap.add_argument("--port", type=int, default=18085, help="0 picks a free port")
    args = ap.parse_args(argv)
    kwargs = None
    if args.scorer_kwargs is not None:
        kwargs = json.loads(args.scorer_kwargs)
        if not isinstance(kwargs, dict):
            ap.error("--scorer-kwargs must be a JSON object")
    server = RewardServer(load_scorer(args.scorer, kwargs), args.host, args.port, name=args.scorer)
    print(f"rewards.server: serving {args.scorer} on {server.url}", flush=True)  # scripts read the port here
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
