"""Image grids for people to look at (eval samples, before / after); clips become animated GIF grids."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageSequence

FRAME_MS = 125  # GIF frame duration: 8 frames per second, a playable pace for short clips


def _pixels(images: torch.Tensor) -> np.ndarray:
    """(..., 3, H, W) in [0, 1] -> (..., H, W, 3) uint8."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).movedim(-3, -1).cpu().numpy()


def _tile(pixels: np.ndarray, cols: int, min_cell: int) -> np.ndarray:
    """(N, H, W, 3) -> one canvas with ``cols`` images per row, enlarged by pixel repetition below ``min_cell``."""
    n, h, w, _ = pixels.shape
    cols = min(cols, n)
    rows = (n + cols - 1) // cols
    canvas = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i, img in enumerate(pixels):
        r, c = divmod(i, cols)
        canvas[r * h:(r + 1) * h, c * w:(c + 1) * w] = img
    k = -(-min_cell // min(h, w)) if min_cell > min(h, w) else 1
    return canvas.repeat(k, axis=0).repeat(k, axis=1) if k > 1 else canvas


def _write_gif(frames: list[np.ndarray], path: Path) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    first, *rest = [Image.fromarray(f) for f in frames]
    first.save(tmp, format="GIF", save_all=True, append_images=rest, duration=FRAME_MS, loop=0)
    tmp.replace(path)
    return path


def save_grid(images: torch.Tensor, path: str | Path, cols: int = 8, min_cell: int = 0) -> Path:
    """(N, 3, H, W) in [0, 1] -> one PNG with ``cols`` images per row (written to a temp name, then renamed).
    ``min_cell``: images smaller than this are enlarged by a whole factor (pixel repetition), so a grid of 32x32
    images is large enough to look at. Clips (N, F, 3, H, W) give an animated GIF of grids, one per frame, at
    ``path`` with the suffix .gif. Returns the path written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if images.dim() == 5:
        pixels = _pixels(images)
        frames = [_tile(pixels[:, f], cols, min_cell) for f in range(pixels.shape[1])]
        return _write_gif(frames, path.with_suffix(".gif"))
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(_tile(_pixels(images), cols, min_cell)).save(tmp, format="PNG")
    tmp.replace(path)
    return path


def save_clip(clip: torch.Tensor, path: str | Path) -> Path:
    """One clip (F, 3, H, W) in [0, 1] -> an animated GIF at ``path``."""
    return _write_gif(list(_pixels(clip)), Path(path))


def load_grid(path: str | Path, n: int) -> torch.Tensor:
    """The ``n`` images of a one-row grid written by ``save_grid(images, path, cols=n)``, (n, 3, H, W) in [0, 1]
    (exactly what the grid stores: 8-bit pixels); from a GIF grid, the clips (n, F, 3, H, W) (its palette
    colours)."""
    def _read(im):
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float() / 255

    with Image.open(path) as im:
        if getattr(im, "n_frames", 1) > 1:
            frames = torch.stack([_read(f) for f in ImageSequence.Iterator(im)])  # (F, 3, H, n W)
            return torch.stack(frames.chunk(n, dim=3))
        return torch.stack(_read(im).chunk(n, dim=2))
