"""A verifiable arithmetic task generated in code: "a+b=" with the sum as the answer.

a and b are uniform three-digit numbers, [100, 999], so answers have 3 or 4 digits. One operand length keeps the
digit columns aligned: with shorter operands mixed in (a, b in [0, 999]) the tiny model's errors were mostly
misaligned columns on the rare short operands, not carries. Sums are written most significant digit first, so a
model must anticipate carries before writing the digits they change: an undertrained model is often close but
wrong by a carry, which gives RL something to fix.

The split is fixed: one seeded stream of distinct (a, b) pairs; its first ``HELDOUT_SIZE`` pairs are the held-out
set and the next ``TRAIN_SIZE`` the training set, so the two never share a pair. ``tag`` is the number of carries
in the column addition ("carry0" ... "carry3"), to break accuracy down by difficulty.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 0
HELDOUT_SIZE = 500
TRAIN_SIZE = 5000
OPERANDS = (100, 999)  # inclusive
SPLITS = ("train", "heldout")


def carries(a: int, b: int) -> int:
    n, c = 0, 0
    while a or b:
        c = (a % 10 + b % 10 + c) // 10
        n += c
        a, b = a // 10, b // 10
    return n


def _problem(a: int, b: int) -> dict:
    return {"prompt": f"{a}+{b}=", "answer": str(a + b), "tag": f"carry{carries(a, b)}"}


def _pairs() -> list[tuple[int, int]]:
    rng = random.Random(SEED)
    seen: set[tuple[int, int]] = set()
    out = []
    while len(out) < HELDOUT_SIZE + TRAIN_SIZE:
        a, b = rng.randint(*OPERANDS), rng.randint(*OPERANDS)
        if (a, b) not in seen:
            seen.add((a, b))
            out.append((a, b))
    return out


def problems(split: str, n: int | None = None) -> list[dict]:
    """The first ``n`` (default all) problems of ``split`` ("train" or "heldout"), in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    pairs = _pairs()
    pairs = pairs[:HELDOUT_SIZE] if split == "heldout" else pairs[HELDOUT_SIZE:]
    return [_problem(a, b) for a, b in pairs[:n]]


def parse_answer(completion: str) -> str | None:
    """The format rule: the stripped completion must be digits only (ASCII), else None (no answer)."""
    s = completion.strip()
    return s if s and s.isascii() and s.isdigit() else None


def write_prompt_files(directory: str | Path) -> list[Path]:
    """Writes ``arith_train.jsonl`` and ``arith_heldout.jsonl`` (keys prompt / answer / tag) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for split in SPLITS:
        path = directory / f"arith_{split}.jsonl"
        path.write_text("".join(json.dumps(p) + "\n" for p in problems(split)))
        paths.append(path)
    return paths
