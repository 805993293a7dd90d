"""An exact, model-free object detector for the shapes world.

1. Pixels -> colour labels. A pixel is foreground when its brightest channel reaches ``V_MIN`` (about half
   coverage of a palette colour, so a blurred edge is cut where the true edge was); its label is the nearest
   palette colour in *chromaticity* (rgb / max channel), which blurring onto black leaves unchanged, within
   ``CHROMA_TOL``; anything else is background.
2. Connected components per colour (4-connectivity), for a whole batch at once by min-label propagation
   with pointer jumping (numpy, no scipy).
3. Components outside ``MIN_AREA`` / ``MIN_EXTENT..MAX_EXTENT`` / ``MAX_ASPECT`` are dropped; each survivor's
   soft coverage (its pixels plus two rings of dim edge pixels, value / colour brightness) is compared with
   every shape rendered by the world's own geometry at the size its mass implies and at its mass centroid,
   blurred at a few levels (blur, VAE softness); the best soft IoU (sum min / sum max) wins if it reaches
   ``MIN_IOU``. The template carries every cheap moment at once (fill ratio, top-vs-bottom width, row profile),
   and a ragged noise blob matches nothing (the prototype's fill-ratio-only detector saw shapes in 30% of noise
   images). Templates fitted to the *binarised* bounding box failed under blur: a diamond's thin tips fall
   below threshold, its box shrinks, and it reads as a circle.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from . import world

V_MIN = 0.45        # brightest channel needed to count as foreground (palette colours are ~0.95-1.0)
CHROMA_TOL = 0.25   # max chromaticity distance to a palette colour (closest pair, purple/blue, is 0.55 apart)
MIN_AREA = 12       # px; the smallest rendered shape (a 7 px triangle or diamond) covers ~24
MIN_EXTENT, MAX_EXTENT = 5, 20   # bbox side in px; rendered shapes span 7..16
MAX_ASPECT = 1.5    # rendered shapes have square boxes
BLURS = (0.0, 0.5, 0.8, 1.1)   # template blur levels tried (px)
PAD = 4             # window margin around a component (px)
MIN_IOU = 0.8       # true shapes score >= 0.85 even after a 2x down/up softening; 4x4 blocks of noise ~0.75

_NAMES = tuple(world.COLORS)
_VMAX = np.array([max(c) for c in world.COLORS.values()], dtype=np.float32)
_CHROMA = np.array([np.array(c) / max(c) for c in world.COLORS.values()], dtype=np.float32)


@dataclass(frozen=True)
class Detection:
    color: str
    shape: str
    centroid: tuple[float, float]           # (x, y) mean of pixel centres, in pixels of the 32x32 world
    bbox: tuple[int, int, int, int]         # (x0, y0, x1, y1), x1/y1 exclusive
    area: int                               # pixels
    iou: float                              # with the winning template: a confidence


def _as_numpy(images: torch.Tensor) -> np.ndarray:
    x = images.detach().float().cpu()
    if x.dim() == 3:
        x = x[None]
    if x.shape[-2:] != (world.WORLD_SIZE, world.WORLD_SIZE):  # thresholds are in world pixels
        x = F.interpolate(x, size=(world.WORLD_SIZE, world.WORLD_SIZE), mode="area")
    return x.clamp(0, 1).numpy()


def color_labels(x: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) in [0, 1] -> (N, H, W) int8: palette index, or -1 for background."""
    v = x.max(axis=1)
    chroma = x / np.maximum(v, 1e-6)[:, None]
    d = ((chroma[:, None] - _CHROMA[None, :, :, None, None]) ** 2).sum(axis=2)   # (N, K, H, W)
    best = d.argmin(axis=1)
    ok = (v >= V_MIN) & (np.take_along_axis(d, best[:, None], 1)[:, 0] <= CHROMA_TOL ** 2)
    return np.where(ok, best, -1).astype(np.int8)


def components(labels: np.ndarray) -> np.ndarray:
    """(N, H, W) colour labels -> (N, H, W) component ids (flat index of the component's smallest pixel), -1
    on background. 4-connected, same colour only."""
    n, h, w = labels.shape
    fg = labels >= 0
    ids = np.arange(n * h * w, dtype=np.int64).reshape(n, h, w)
    big = np.iinfo(np.int64).max
    lab = np.where(fg, ids, big)
    same_x = fg[:, :, 1:] & (labels[:, :, 1:] == labels[:, :, :-1])   # pixel and its right neighbour
    same_y = fg[:, 1:, :] & (labels[:, 1:, :] == labels[:, :-1, :])   # pixel and the one below
    while True:
        new = lab.copy()
        np.minimum(new[:, :, :-1], np.where(same_x, lab[:, :, 1:], big), out=new[:, :, :-1])
        np.minimum(new[:, :, 1:], np.where(same_x, lab[:, :, :-1], big), out=new[:, :, 1:])
        np.minimum(new[:, :-1, :], np.where(same_y, lab[:, 1:, :], big), out=new[:, :-1, :])
        np.minimum(new[:, 1:, :], np.where(same_y, lab[:, :-1, :], big), out=new[:, 1:, :])
        flat = new.reshape(-1)
        m = fg.reshape(-1)
        for _ in range(3):  # pointer jumping: a label is a pixel of the same component, so follow it
            flat[m] = flat[flat[m]]
        if np.array_equal(new, lab):
            break
        lab = new
    return np.where(fg, lab, -1)


@lru_cache(maxsize=None)
def _blur_matrices(n: int) -> np.ndarray:
    """(len(BLURS), n, n): row i of level k holds the gaussian weights of pixel i (zero outside the window)."""
    d = np.arange(n)[:, None] - np.arange(n)[None, :]
    out = []
    for s in BLURS:
        if s == 0:
            out.append(np.eye(n))
        else:
            k = np.exp(-d ** 2 / (2 * s ** 2)) * (np.abs(d) <= 3)
            out.append(k / np.exp(-np.arange(-3, 4) ** 2 / (2 * s ** 2)).sum())
    return np.stack(out).astype(np.float32)


def _dilate(m: np.ndarray) -> np.ndarray:
    r = m.copy()
    r[1:] |= m[:-1]
    r[:-1] |= m[1:]
    r[:, 1:] |= m[:, :-1]
    r[:, :-1] |= m[:, 1:]
    return r


_SS = (np.arange(4) + 0.5) / 4  # 4x4 samples per pixel, as the renderer uses


def shape_scores(a: np.ndarray, y0: int, x0: int) -> dict[str, float]:
    """Soft IoU of a coverage map ``a`` (window whose top-left pixel is (y0, x0)) with each shape rendered at the
    size its mass implies and at its mass centroid, at the best of a few blur levels (blur, VAE softness)."""
    h, w = a.shape
    mass = a.sum()
    my = (a.sum(axis=1) @ (np.arange(y0, y0 + h) + 0.5)) / mass
    mx = (a.sum(axis=0) @ (np.arange(x0, x0 + w) + 0.5)) / mass
    py = (np.arange(y0, y0 + h)[:, None] + _SS).reshape(-1)
    px = (np.arange(x0, x0 + w)[:, None] + _SS).reshape(-1)
    t0 = np.empty((len(world.SHAPES), h, w), dtype=np.float32)
    for j, shape in enumerate(world.SHAPES):
        s = np.sqrt(mass / world.AREA[shape])
        cy = my - world.CENTROID_DY[shape] * s
        t = world.inside(shape, (px[None, :] - mx) / (s / 2), (py[:, None] - cy) / (s / 2))
        t0[j] = t.reshape(h, 4, w, 4).sum(axis=(1, 3)) / 16
    t = _blur_matrices(h)[:, None] @ t0[None] @ _blur_matrices(w).transpose(0, 2, 1)[:, None]   # (blur, shape, h, w)
    iou = np.minimum(a, t).sum(axis=(2, 3)) / np.maximum(a, t).sum(axis=(2, 3))
    return dict(zip(world.SHAPES, iou.max(axis=0).tolist()))


def detect_batch(images: torch.Tensor, min_iou: float = MIN_IOU) -> list[list[Detection]]:
    """Detections for each image of (N, 3, H, W) in [0, 1]; any H, W is resized (area) to the 32x32 world.
    ``min_iou`` below ``MIN_IOU`` also returns near-miss shapes (a soft reward weighs them by their ``iou``);
    ``min_iou=0`` returns every colour component of at least ``MIN_AREA`` px, those no shape's box fits with
    shape "" and iou 0: all the objects in the image, for rules that ask for nothing beyond the named ones."""
    x = _as_numpy(images)
    labels = color_labels(x)
    comp = components(labels)
    value = x.max(axis=1)
    n, h, w = labels.shape
    out: list[list[Detection]] = [[] for _ in range(n)]
    flat = comp.reshape(-1)
    roots, area = np.unique(flat[flat >= 0], return_counts=True)
    for root in roots[area >= MIN_AREA]:
        i, rest = divmod(int(root), h * w)
        mask = comp[i] == root
        ys, xs = np.nonzero(mask)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        bh, bw = y1 - y0, x1 - x0
        ci = labels[i, rest // w, rest % w]
        centroid, box = (float(xs.mean() + 0.5), float(ys.mean() + 0.5)), (int(x0), int(y0), int(x1), int(y1))
        if not (MIN_EXTENT <= min(bh, bw) and max(bh, bw) <= MAX_EXTENT and max(bh, bw) <= MAX_ASPECT * min(bh, bw)):
            if min_iou <= 0:   # no shape's box fits: an object all the same (merged copies, a smear)
                out[i].append(Detection(_NAMES[ci], "", centroid, box, int(ys.size), 0.0))
            continue
        # coverage: the component plus two rings of unlabelled (dim edge) pixels around it
        support = _dilate(_dilate(mask)) & ((comp[i] < 0) | mask)
        cov = np.where(support, np.clip(value[i] / _VMAX[ci], 0, 1), 0.0)
        wy0, wx0 = y0 - PAD, x0 - PAD
        win = np.pad(cov, PAD)[wy0 + PAD:y1 + 2 * PAD, wx0 + PAD:x1 + 2 * PAD]
        scores = shape_scores(win, wy0, wx0)
        shape = max(scores, key=scores.get)
        if scores[shape] < min_iou:
            continue
        out[i].append(Detection(_NAMES[ci], shape, centroid, box, int(ys.size), scores[shape]))
    return out


def detect(image: torch.Tensor) -> list[Detection]:
    """Detections in one (3, H, W) image in [0, 1]."""
    return detect_batch(image[None] if image.dim() == 3 else image)[0]


__all__ = ["Detection", "detect", "detect_batch", "color_labels", "components", "V_MIN", "CHROMA_TOL",
           "MIN_AREA", "MIN_EXTENT", "MAX_EXTENT", "MAX_ASPECT", "MIN_IOU", "shape_scores"]
