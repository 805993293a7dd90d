"""Explicit, position-independent random streams.

Every random draw of a rollout comes from a ``torch.Generator`` seeded by a hash of *what* is drawn (run seed,
iteration, prompt id, tree, branch path, step), never by *where* it sits in a batch. So a sample's noise is the
same whether its prompt is processed alone, in a batch of 8, or on another process, and a resumed run continues
the same streams.
"""
from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts) -> int:
    """A 63-bit seed from a tuple of ints / strings (stable across processes and Python runs)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def randn(shape, seed: int, device="cpu") -> torch.Tensor:
    """Standard normal float32 noise from a generator seeded with ``seed`` on ``device``."""
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=g, device=device, dtype=torch.float32)
