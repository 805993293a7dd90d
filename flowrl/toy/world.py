"""The shapes world: a procedural text-to-image domain with GenEval's six task categories.

Coloured flat shapes on black, 32x32. Every prompt names a colour for every object (an undertrained model
collapses colourless prompts to empty images). Category templates are distinct so a string identifies its task:

    single_object  "a [small|big] red circle"           graded on the shape only (GenEval single_object)
    colors         "a [small|big] circle that is red"   graded on shape + colour (GenEval colors)
    two_object     "a red circle and a blue square"     graded on both shapes present, colours ignored
    color_attr     "a red circle with a blue square"    graded on each shape having its colour
    counting       "three green triangles"              graded on exactly three triangles, colour ignored
    position       "a red circle left of a blue square" graded on both present + the relation (GenEval rule)

Metadata follows GenEval's layout: ``include`` (requirements: class, count, optional color and
``position: [relation, index of the reference include]``) and ``exclude`` (counting: no ``count+1`` of the
class). ``objects`` (and ``size``) say what the prompt names, so scenes render it even where grading ignores it.
Coordinates are pixels of the 32x32 world; ``render`` rescales for other sizes.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

WORLD_SIZE = 32
# Saturated and far apart in chromaticity (rgb / max channel), which a blur onto black does not change.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.95, 0.15, 0.10),
    "green": (0.15, 0.85, 0.20),
    "blue": (0.20, 0.35, 1.00),
    "yellow": (0.95, 0.90, 0.15),
    "white": (0.95, 0.95, 0.95),
    "purple": (0.70, 0.20, 0.95),
}
SHAPES = ("circle", "square", "triangle", "diamond")
AREA = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5}   # shape area / box side^2
CENTROID_DY = {"circle": 0.0, "square": 0.0, "triangle": 1 / 6, "diamond": 0.0}  # centroid below box centre / side
PLURALS = {s: s + "s" for s in SHAPES}
NUMBERS = {2: "two", 3: "three", 4: "four"}
RELATIONS = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
# Object extent (bbox side, px). Size words only enrich single-object prompts; multi-object scenes shrink to fit.
SIZE_RANGE = {"small": (8.0, 10.0), None: (10.0, 12.5), "big": (13.0, 16.0)}
MULTI_RANGE = {2: (8.5, 12.0), 3: (8.0, 11.0), 4: (8.0, 10.5), 5: (7.0, 8.5)}  # 5: off-by-one tests
GAP = 3.0       # min px between two objects' boxes: keeps same-colour neighbours apart after a VAE's blur
REL_GAP = 4.0   # min px between the boxes along a position relation's axis
BORDER = 1.0    # min px between a box and the image edge


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    cx: float
    cy: float
    size: float  # bbox side in world pixels; every shape spans its full box

    @property
    def box(self) -> tuple[float, float, float, float]:
        h = self.size / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]


def inside(shape: str, u, v):
    """Membership test in the unit box [-1, 1]^2 (v grows downwards); shared with the detector's templates."""
    if shape == "circle":
        return u * u + v * v <= 1
    if shape == "square":
        return (abs(u) <= 1) & (abs(v) <= 1)
    if shape == "triangle":  # apex up, base = height = box side
        return (abs(v) <= 1) & (abs(u) <= (v + 1) / 2)
    if shape == "diamond":
        return abs(u) + abs(v) <= 1
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


# -- prompts ----------------------------------------------------------------------------------------
def _obj(shape, color, count=1):
    return {"class": shape, "color": color, "count": count}


def _families():
    """Yields (tag, semantic key, meta). Strings sharing a key describe the same scene; splits keep them together."""
    for size in (None, "small", "big"):
        pre = f"{size} " if size else ""
        for c in COLORS:
            for s in SHAPES:
                key = ("one", size, c, s)
                yield "single_object", key, {"prompt": f"a {pre}{c} {s}", "include": [{"class": s, "count": 1}],
                                             "objects": [_obj(s, c)], "size": size}
                yield "colors", key, {"prompt": f"a {pre}{s} that is {c}",
                                      "include": [{"class": s, "count": 1, "color": c}],
                                      "objects": [_obj(s, c)], "size": size}
    for n, word in NUMBERS.items():
        for c in COLORS:
            for s in SHAPES:
                yield "counting", ("count", n, c, s), {
                    "prompt": f"{word} {c} {PLURALS[s]}", "include": [{"class": s, "count": n}],
                    "exclude": [{"class": s, "count": n + 1}], "objects": [_obj(s, c, n)]}
    for s1 in SHAPES:
        for s2 in SHAPES:
            if s1 == s2:
                continue  # as GenEval: two different classes, so each requirement names one object
            for c1 in COLORS:
                for c2 in COLORS:
                    if c1 == c2:
                        continue
                    objs = [_obj(s1, c1), _obj(s2, c2)]
                    pair = tuple(sorted([(c1, s1), (c2, s2)]))
                    yield "two_object", ("pair",) + pair, {
                        "prompt": f"a {c1} {s1} and a {c2} {s2}",
                        "include": [{"class": s1, "count": 1}, {"class": s2, "count": 1}], "objects": objs}
                    yield "color_attr", ("pair",) + pair, {
                        "prompt": f"a {c1} {s1} with a {c2} {s2}",
                        "include": [{"class": s1, "count": 1, "color": c1}, {"class": s2, "count": 1, "color": c2}],
                        "objects": objs}
                    for rel in RELATIONS:
                        # "A left of B" and "B right of A" are one scene: canonical key on left-of / above
                        canon = (rel, (c1, s1), (c2, s2)) if rel in ("left of", "above") else \
                            (RELATIONS[rel], (c2, s2), (c1, s1))
                        yield "position", ("rel",) + canon, {
                            "prompt": f"a {c1} {s1} {rel} a {c2} {s2}",
                            "include": [{"class": s1, "count": 1, "position": [rel, 1]}, {"class": s2, "count": 1}],
                            "objects": objs}


def _with_tag(tag, meta):
    out = {"prompt": meta["prompt"], "tag": tag}
    out.update({k: v for k, v in meta.items() if k != "prompt" and v is not None})
    return out


def all_prompts() -> list[dict]:
    """Every prompt of the world as a GenEval-style metadata dict, in a fixed order (grouped by tag)."""
    items = [_with_tag(tag, meta) for tag, _, meta in _families()]
    return sorted(items, key=lambda m: TAGS.index(m["tag"]))  # stable: keeps generation order within a tag


def _rank(seed: int, key) -> str:
    return hashlib.sha256(f"{seed}|{key!r}".encode()).hexdigest()


def split_prompts(seed: int = 0, heldout_fraction: float = 0.25) -> tuple[list[dict], list[dict]]:
    """(train, held-out), disjoint within every tag. Whole scenes are held out: "A left of B" goes with "B right
    of A", "a red circle and a blue square" with its reordering, and a scene's key ranks the same in every tag,
    so "a red circle" and "a circle that is red" land on the same side. Held-out scenes are never trained on."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction!r}")
    keys: dict[str, list] = {t: [] for t in TAGS}
    for tag, key, _ in _families():
        if key not in keys[tag]:
            keys[tag].append(key)
    held = set()
    for tag, ks in keys.items():
        ks = sorted(ks, key=lambda k: _rank(seed, k))
        held.update((tag, k) for k in ks[:max(1, round(heldout_fraction * len(ks)))])
    train, heldout = [], []
    for tag, key, meta in _families():
        (heldout if (tag, key) in held else train).append(_with_tag(tag, meta))
    order = lambda m: TAGS.index(m["tag"])  # noqa: E731
    return sorted(train, key=order), sorted(heldout, key=order)


def metadata_of(meta: dict) -> dict:
    """The grading metadata a reward receives: the prompt dict without its prompt string."""
    return {k: v for k, v in meta.items() if k != "prompt"}


WORDS: tuple[str, ...] = tuple(sorted({w for m in all_prompts() for w in m["prompt"].split()}))


# -- scenes -----------------------------------------------------------------------------------------
def _fits(cand: np.ndarray, placed: list[np.ndarray], rel: str | None) -> np.ndarray:
    """Which candidate boxes (T, 4: x0, y0, x1, y1) keep GAP from every placed box and, with ``rel``, stand
    so that object 0 (placed[0]) is ``rel`` of the candidate."""
    ok = np.ones(len(cand), dtype=bool)
    for b in placed:
        ok &= ((cand[:, 2] + GAP <= b[0]) | (b[2] + GAP <= cand[:, 0])
               | (cand[:, 3] + GAP <= b[1]) | (b[3] + GAP <= cand[:, 1]))
    if rel is not None:
        # A strictly beyond B along the axis by REL_GAP, and mostly aligned with it: GenEval's rule then holds
        # with room to spare (the offset exceeds 0.1*(wa+wb) per axis, the on-axis share is > 0.5).
        a, b = placed[0], cand.T
        dx = (a[0] + a[2] - b[0] - b[2]) / 2
        dy = (a[1] + a[3] - b[1] - b[3]) / 2
        ok &= {"left of": (a[2] + REL_GAP <= b[0]) & (np.abs(dy) <= 0.5 * np.abs(dx)),
               "right of": (b[2] + REL_GAP <= a[0]) & (np.abs(dy) <= 0.5 * np.abs(dx)),
               "above": (a[3] + REL_GAP <= b[1]) & (np.abs(dx) <= 0.5 * np.abs(dy)),
               "below": (b[3] + REL_GAP <= a[1]) & (np.abs(dx) <= 0.5 * np.abs(dy))}[rel]
    return ok


def sample_scene(meta: dict, rng: np.random.Generator | int | None = None, tries: int = 64) -> Scene:
    """A random correct scene for a prompt's metadata: jittered sizes and places, no overlaps, relations kept.
    Objects are placed one after another, each from ``tries`` uniform candidates (vectorised) that fit beside
    the ones placed; a dead end restarts the scene."""
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    specs = [(o["class"], o["color"]) for o in meta["objects"] for _ in range(o["count"])]
    lo, hi = SIZE_RANGE[meta.get("size")] if len(specs) == 1 else MULTI_RANGE[len(specs)]
    rel = next((r["position"][0] for r in meta.get("include", []) if "position" in r), None)
    for _ in range(200):
        placed: list[np.ndarray] = []
        for i in range(len(specs)):
            size = rng.uniform(lo, hi, tries)
            c = rng.uniform(BORDER + size[:, None] / 2, WORLD_SIZE - BORDER - size[:, None] / 2, (tries, 2))
            cand = np.concatenate([c - size[:, None] / 2, c + size[:, None] / 2], axis=1)
            hit = np.flatnonzero(_fits(cand, placed, rel if i == 1 else None))
            if not hit.size:
                break
            placed.append(cand[hit[0]])
        else:
            return Scene(tuple(Obj(s, col, float(b[0] + b[2]) / 2, float(b[1] + b[3]) / 2, float(b[2] - b[0]))
                               for (s, col), b in zip(specs, placed)))
    raise RuntimeError(f"could not place the objects of {meta.get('prompt', meta)!r}")


_SHAPE_ID = {s: i for i, s in enumerate(SHAPES)}
_RGB = torch.tensor(list(COLORS.values()), dtype=torch.float32)
_COLOR_ID = {c: i for i, c in enumerate(COLORS)}


def render_batch(scenes: list[Scene], size: int = WORLD_SIZE, supersample: int = 4, chunk: int = 2048
                 ) -> torch.Tensor:
    """(N, 3, size, size) float in [0, 1]: coverage from supersample^2 points per pixel (anti-aliasing).

    Each object is rasterised only in a window around its box, all objects of a shape at once, and the
    windows are added into the canvases (objects never overlap). Chunks bound the memory."""
    if len(scenes) > chunk:
        return torch.cat([render_batch(scenes[a:a + chunk], size, supersample, chunk)
                          for a in range(0, len(scenes), chunk)])
    n, scale = len(scenes), size / WORLD_SIZE
    objs = [(i, o) for i, sc in enumerate(scenes) for o in sc.objects]
    win = int(np.ceil(max((o.size for _, o in objs), default=1) * scale)) + 2   # window side, output px
    pad = win
    canvas = torch.zeros(3, n, size + 2 * pad, size + 2 * pad)   # channel-first: each plane is contiguous
    if not objs:
        return canvas[:, :, pad:-pad, pad:-pad].permute(1, 0, 2, 3).contiguous()
    img = torch.tensor([i for i, _ in objs])
    par = torch.tensor([[o.cx * scale, o.cy * scale, o.size * scale / 2] for _, o in objs], dtype=torch.float32)
    sid = torch.tensor([_SHAPE_ID[o.shape] for _, o in objs])
    rgb = _RGB[torch.tensor([_COLOR_ID[o.color] for _, o in objs])]
    org = torch.floor(par[:, :2]).long() - win // 2                 # window's top-left pixel
    local = (torch.arange(win * supersample, dtype=torch.float32) + 0.5) / supersample
    cov = torch.empty(len(objs), win, win)
    for shape, k in _SHAPE_ID.items():
        sel = (sid == k).nonzero().flatten()
        if sel.numel() == 0:
            continue
        p, o = par[sel], org[sel].float()
        u = (o[:, 0, None, None] + local.view(1, 1, -1) - p[:, 0, None, None]) / p[:, 2, None, None]
        v = (o[:, 1, None, None] + local.view(1, -1, 1) - p[:, 1, None, None]) / p[:, 2, None, None]
        m = inside(shape, u, v).float()
        cov[sel] = m.view(-1, win, supersample, win, supersample).mean(dim=(2, 4))
    ar = torch.arange(win)
    ys = (org[:, 1, None] + pad + ar)[:, :, None].expand(-1, win, win)
    xs = (org[:, 0, None] + pad + ar)[:, None, :].expand(-1, win, win)
    flat = (img[:, None, None] * (size + 2 * pad) + ys) * (size + 2 * pad) + xs   # index into (n, H', W')
    for ch in range(3):
        canvas[ch].view(-1).index_add_(0, flat.reshape(-1), (cov * rgb[:, ch, None, None]).reshape(-1))
    return canvas[:, :, pad:-pad, pad:-pad].permute(1, 0, 2, 3).clamp(0, 1).contiguous()


def render(scene: Scene, size: int = WORLD_SIZE) -> torch.Tensor:
    """(3, size, size) float in [0, 1] on black, anti-aliased by 4x supersampling."""
    return render_batch([scene], size)[0]


def make_dataset(n: int, seed: int, prompts: list[dict] | None = None, balanced: bool = True
                 ) -> tuple[torch.Tensor, list[str], list[dict]]:
    """n correct renderings of prompts drawn with replacement from ``prompts`` (default: all). ``balanced``
    draws a tag uniformly, then a prompt of it: otherwise position (45% of the strings) swamps counting.
    Returns (images (n,3,32,32), prompt strings, metadata without the prompt). Deterministic in seed."""
    prompts = all_prompts() if prompts is None else list(prompts)
    if not prompts:
        raise ValueError("make_dataset needs at least one prompt")
    rng = np.random.default_rng(seed)
    if balanced:
        groups = [[i for i, m in enumerate(prompts) if m["tag"] == t] for t in dict.fromkeys(m["tag"] for m in prompts)]
        gi = rng.integers(len(groups), size=n)
        idx = [groups[g][j] for g, j in zip(gi, (rng.random(n) * [len(groups[g]) for g in gi]).astype(int))]
    else:
        idx = rng.integers(len(prompts), size=n).tolist()
    scenes = [sample_scene(prompts[i], rng) for i in idx]
    images = render_batch(scenes) if n else torch.empty(0, 3, WORLD_SIZE, WORLD_SIZE)
    return images, [prompts[i]["prompt"] for i in idx], [metadata_of(prompts[i]) for i in idx]


__all__ = ["WORLD_SIZE", "COLORS", "SHAPES", "PLURALS", "NUMBERS", "RELATIONS", "TAGS", "WORDS", "Obj", "Scene",
           "inside", "all_prompts", "split_prompts", "metadata_of", "sample_scene", "render", "render_batch",
           "make_dataset"]
