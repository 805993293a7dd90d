"""The reward server's limits on what one request may ask of it, each a flag of ``python -m rewards.server``, and
the checks that run before anything is decoded: the JSON's nesting depth (scanned, not recursed) and each image's
size read from its PNG header.

A refused request gets a 4xx whose message names the limit and its flag. The limits bound the server's memory:
at most ``max_inflight`` requests are read and decoded at once, each holding at most its body and the parsed
text of its images (2 x ``max_body_bytes``), then its decoded pixels (3 bytes each, ``max_request_pixels``) and
one image being decoded (PIL's 4 bytes a pixel and a 3-byte copy, ``max_image_pixels``): ``memory_bound()``,
plus the scorer's own. scripts/bench_reward_server.py measures the peak against it.
Stdlib and numpy only, like the server.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import re
import struct
from dataclasses import dataclass, fields

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# a JSON string (escapes included); the image strings, the bulk of a body, hold no bracket
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_OPEN, _CLOSE = np.frombuffer(b"[{", np.uint8), np.frombuffer(b"]}", np.uint8)


class LimitExceeded(ValueError):
    """A request over one of the limits; ``status`` is its HTTP status (413 for sizes, 400 for depth)."""

    def __init__(self, message: str, status: int = 413):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 256 * 2**20        # Content-Length above this: 413 before a byte of the body is read
    max_images: int = 256                    # images in one request
    max_image_pixels: int = 4096 * 4096      # width x height of one image, from its PNG header
    max_request_pixels: int = 64 * 1024**2   # the sum over a request's images (64 at 1024 x 1024)
    max_prompt_chars: int = 8192             # characters of one prompt
    max_metadata_bytes: int = 65536          # bytes of one metadata entry as JSON
    max_json_depth: int = 32                 # nesting of arrays / objects in the body (the protocol itself needs 3)
    max_inflight: int = 4                    # requests read, decoded and scored at once; the others wait
    max_connections: int = 64                # open connections (a thread each); one more is closed at once
    queue_wait: float = 60.0                 # seconds a request waits for a free slot before a 503
    socket_timeout: float = 30.0             # seconds of silence on a connection before it is dropped
    body_deadline: float = 300.0             # seconds to receive a whole body, however it trickles in

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            ok = isinstance(v, int) if f.type == "int" else isinstance(v, (int, float)) and v < float("inf")
            if isinstance(v, bool) or not ok or not v > 0:
                raise ValueError(f"--{flag(f.name)} must be a positive {f.type}, got {v!r}")

    def memory_bound(self) -> int:
        """Bytes the requests in flight may hold at once (bodies, their parsed text, decoded pixels)."""
        return self.max_inflight * (2 * self.max_body_bytes + 3 * self.max_request_pixels + 8 * self.max_image_pixels)


def flag(name: str) -> str:
    return name.replace("_", "-")


def add_limit_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("limits (a request over one gets a 4xx naming it)")
    for f in fields(Limits):
        g.add_argument(f"--{flag(f.name)}", type=int if f.type == "int" else float, default=f.default,
                       metavar="N" if f.type == "int" else "S", help=f"default {f.default}")


def limits_from_args(args: argparse.Namespace) -> Limits:
    return Limits(**{f.name: getattr(args, f.name) for f in fields(Limits)})


def over(what: str, value: int, limit: int, name: str, status: int = 413) -> LimitExceeded:
    return LimitExceeded(f"{what} is {value}, over the limit of {limit} (--{flag(name)})", status)


def check_json_depth(body: bytes, limit: int) -> None:
    """Refuse nesting deeper than ``limit`` before ``json.loads`` recurses into it; strings are blanked first, so
    brackets inside them do not count. Vectorised in 1 MB chunks, so a body of brackets costs little memory."""
    structure, depth = np.frombuffer(_JSON_STRING.sub(b"", body), np.uint8), 0
    for start in range(0, structure.size, 2**20):
        chunk = structure[start:start + 2**20]
        step = np.isin(chunk, _OPEN).astype(np.int64) - np.isin(chunk, _CLOSE)
        levels = np.cumsum(step) + depth
        if int(levels.max()) > limit:
            raise over("the JSON nesting depth", int(levels.max()), limit, "max_json_depth", status=400)
        depth = int(levels[-1])


def png_size(text: str) -> tuple[int, int]:
    """(width, height) from a base64 PNG's IHDR chunk, decoding only its first 44 characters (33 bytes: the
    signature, IHDR's length and type, its 13 bytes of data, and the CRC); raises ValueError if it is not a PNG."""
    if not isinstance(text, str):
        raise ValueError(f"an image must be a base64 string, got {type(text).__name__}")
    try:
        head = base64.b64decode(text[:44], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("an image is not base64") from None
    if len(head) < 33 or head[:8] != PNG_SIGNATURE:
        raise ValueError("an image is not a PNG (no PNG signature)")
    length, kind, width, height = struct.unpack(">I4sII", head[8:24])
    if kind != b"IHDR" or length != 13:
        raise ValueError("an image is not a PNG (its first chunk is not IHDR)")
    if binascii.crc32(head[12:29]) != struct.unpack(">I", head[29:33])[0]:
        raise ValueError("an image's PNG header fails its CRC")
    if not (width and height):
        raise ValueError(f"an image's PNG header says {width} x {height}")
    return width, height


__all__ = ["Limits", "LimitExceeded", "add_limit_args", "check_json_depth", "limits_from_args", "png_size"]
