"""Image grids for people to look at (eval samples, before / after)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def save_grid(images: torch.Tensor, path: str | Path, cols: int = 8, min_cell: int = 0) -> Path:
    """(N, 3, H, W) in [0, 1] -> one PNG with ``cols`` images per row (written to a temp name, then renamed).
    ``min_cell``: images smaller than this are enlarged by a whole factor (pixel repetition), so a grid of 32x32
    images is large enough to look at."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n, _, h, w = images.shape
    cols = min(cols, n)
    rows = (n + cols - 1) // cols
    canvas = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i, img in enumerate(pixels):
        r, c = divmod(i, cols)
        canvas[r * h:(r + 1) * h, c * w:(c + 1) * w] = img
    k = -(-min_cell // min(h, w)) if min_cell > min(h, w) else 1
    if k > 1:
        canvas = canvas.repeat(k, axis=0).repeat(k, axis=1)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(canvas).save(tmp, format="PNG")
    tmp.replace(path)
    return path


def load_grid(path: str | Path, n: int) -> torch.Tensor:
    """The ``n`` images of a one-row grid written by ``save_grid(images, path, cols=n)``, (n, 3, H, W) in [0, 1]
    (exactly what the grid stores: 8-bit pixels)."""
    pixels = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255
    return torch.stack(pixels.chunk(n, dim=2))
