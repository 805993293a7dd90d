"""The benchmark folder: GenEval's layout, used by every benchmark so one reader, one resume rule and GenEval's own
tools serve them all.

    <out>/<index:05d>/metadata.jsonl         the prompt's metadata line (one JSON object, ``prompt`` included)
    <out>/<index:05d>/samples/<k:05d>.png    image k of prompt ``index``

GenEval's ``generation/diffusers_generate.py`` writes exactly this, and its ``evaluation/evaluate_images.py``
reads any sub-folder whose name is digits, ``json.load``s its metadata.jsonl and grades every
``samples/<digits>.png``, so a folder written here is graded by GenEval's script unchanged. Files are written to a
temporary name and renamed, so a killed run leaves no half-written image that a resumed one would trust.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

INDEX_DIGITS = 5  # {index:0>5} in GenEval's generation script
SAMPLE_DIGITS = 5  # {sample_count:05}.png in the same script


def prompt_dir(out: Path, index: int) -> Path:
    return Path(out) / f"{index:0{INDEX_DIGITS}d}"


def sample_path(out: Path, index: int, k: int) -> Path:
    return prompt_dir(out, index) / "samples" / f"{k:0{SAMPLE_DIGITS}d}.png"


def replace(path: Path, write) -> None:
    """``write(tmp)``, then an atomic rename onto ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_metadata(out: Path, index: int, prompt: str, metadata: dict) -> None:
    """The prompt's metadata.jsonl as GenEval writes it: its metadata line, ``prompt`` included."""
    folder = prompt_dir(out, index)
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    line = {**metadata, "prompt": prompt}
    path = folder / "metadata.jsonl"
    if path.is_file() and json.loads(path.read_text()) == line:
        return
    replace(path, lambda p: p.write_text(json.dumps(line)))


def write_image(path: Path, image: torch.Tensor) -> None:
    """One (3, H, W) image in [0, 1] as an 8-bit PNG, rounded as every image file stores it."""
    from PIL import Image

    array = (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    replace(path, lambda p: Image.fromarray(array).save(p, format="PNG"))


def missing(out: Path, index: int, num: int) -> list[int]:
    """The samples k < num of prompt ``index`` not on disk yet."""
    return [k for k in range(num) if not sample_path(out, index, k).is_file()]


def read_images(out: Path, pairs: list[tuple[int, int]]) -> torch.Tensor:
    """(N, 3, H, W) float in [0, 1] of the given (index, k) samples, as read back from their PNGs: what is scored
    is what is on disk, so a resumed or multi-process benchmark scores exactly what one uninterrupted run would."""
    from PIL import Image

    arrays = []
    for index, k in pairs:
        with Image.open(sample_path(out, index, k)) as im:
            arrays.append(np.asarray(im.convert("RGB")))
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        raise ValueError(f"{out}: samples of different sizes {sorted(sizes)}; one benchmark folder, one resolution")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


__all__ = ["missing", "prompt_dir", "read_images", "replace", "sample_path", "write_image", "write_metadata"]
