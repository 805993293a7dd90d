"""GenEval-style grading of shapes-world images with the exact detector.

Rules follow GenEval's evaluator on the metadata layout of ``world.all_prompts``:

- each ``include`` item {class, count}: at least ``count`` detections of the class (any colour);
- with ``color``: at least ``count`` of them have that colour (GenEval classifies the colour of its top
  ``count`` boxes; here any matching detection counts, since the detector's colours are exact);
- with ``position: [relation, j]``: every detection of the class stands in ``relation`` to every detection of
  include ``j`` (GenEval's all-pairs rule), judged between centroids with GenEval's margin: the offset shrinks by
  ``POSITION_THRESHOLD * (dim_a + dim_b)`` per axis and the relation's axis must carry > half of the offset;
- each ``exclude`` item {class, count}: fewer than ``count`` detections (counting: exactly n = >= n and < n+1).

``correct`` is GenEval's binary verdict. ``score`` is a dense variant for rewards: the mean over requirements of
the fraction met (count: min(found, n)/n, or 1 - |found - n|/n when an exclude caps it; colour: matches/n;
relation: fraction of pairs that hold, 0 if a side is missing). score == 1 exactly when correct.
``strict`` is the verdict with nothing beyond the named objects (GenEval's at-least rules pass extra copies),
counting as objects every colour component the detector sees, shapes or not: a copy that misses its template is
still a copy. ``grade_detections(..., strict=True)`` adds that as one more requirement, ``named / max(named,
objects)``, to the dense scores, so a reward trained on them cannot gain by drawing copies (one of which may pass),
and score == 1 exactly when strict.
``soft_score`` (``soft=True``) is the dense score over the detections down to ``SOFT_IOU``, each weighted by how
close its shape came to a template (``soft_weight``): a training reward that ranks near misses.
"""
from __future__ import annotations

import numpy as np
import torch

from . import world
from .detector import MIN_IOU, Detection, detect_batch

POSITION_THRESHOLD = 0.1  # GenEval's relative margin
# Near-miss shapes (soft IoU with their best template in [SOFT_IOU, MIN_IOU)) count in part in the soft score. The
# base's failures are mostly such shapes (a lopsided triangle at 0.65-0.79), which the verdict and the dense score
# see as nothing, so a group of them ranks flat; the soft score ranks them by how close they came.
SOFT_IOU = 0.5


def relations(a: Detection, b: Detection) -> set[str]:
    """Relations of a to b ("left of", "right of", "above", "below"); empty when too close to call."""
    off = np.subtract(a.centroid, b.centroid)
    dims = np.array([a.bbox[2] - a.bbox[0] + b.bbox[2] - b.bbox[0], a.bbox[3] - a.bbox[1] + b.bbox[3] - b.bbox[1]])
    revised = np.maximum(np.abs(off) - POSITION_THRESHOLD * dims, 0) * np.sign(off)
    norm = np.linalg.norm(off)
    if np.all(np.abs(revised) < 1e-3) or norm == 0:
        return set()
    dx, dy = revised / norm
    out = set()
    if dx < -0.5:
        out.add("left of")
    if dx > 0.5:
        out.add("right of")
    if dy < -0.5:
        out.add("above")
    if dy > 0.5:
        out.add("below")
    return out


def requirements(dets: list[Detection], meta: dict, weights: list[float] | None = None,
                 objects: int | None = None) -> list[float]:
    """Fraction met of each requirement the metadata states, in order (include items, then excludes, then, given
    the image's number of ``objects``, "nothing beyond the named objects": named / max(named, objects)).
    ``weights`` (one per detection, default 1) turn counts into sums of weights and pairs into weighted pairs:
    the soft score's near-miss shapes count in part."""
    w = [1.0] * len(dets) if weights is None else list(weights)
    include = meta["include"]
    caps = {e["class"]: e["count"] for e in meta.get("exclude", [])}
    found = [[(d, wd) for d, wd in zip(dets, w) if d.shape == r["class"]] for r in include]
    out = []
    for r, f in zip(include, found):
        n, k = r["count"], sum(wd for _, wd in f)
        if caps.get(r["class"]) == n + 1:   # counting: exactly n, penalised on both sides
            out.append(max(0.0, 1 - abs(k - n) / n))
        else:
            out.append(min(k, n) / n)
        if "color" in r:
            out.append(min(sum(wd for d, wd in f if d.color == r["color"]), n) / n)
        if "position" in r:
            rel, j = r["position"]
            pairs = [(wa * wb, rel in relations(a, b)) for a, wa in f for b, wb in found[j]]
            total = sum(p for p, _ in pairs)
            out.append(sum(p for p, ok in pairs if ok) / total if total > 0 else 0.0)
    for e in meta.get("exclude", []):
        if not any(r["class"] == e["class"] and r["count"] + 1 == e["count"] for r in include):
            out.append(float(sum(wd for d, wd in zip(dets, w) if d.shape == e["class"]) < e["count"]))
    if objects is not None:
        named = sum(r["count"] for r in include)
        out.append(named / max(named, objects))
    return out


def soft_weight(iou: float) -> float:
    """A detection's share in the soft score: 0 at ``SOFT_IOU``, rising linearly to 1 at the detector's
    ``MIN_IOU`` (where GenEval's verdict starts counting it)."""
    return float(np.clip((iou - SOFT_IOU) / (MIN_IOU - SOFT_IOU), 0.0, 1.0))


def _check(meta) -> None:
    if not isinstance(meta, dict) or "tag" not in meta or "include" not in meta:
        raise ValueError(f"GenEval metadata needs 'tag' and 'include' (see world.all_prompts), got {meta!r}")


def grade_detections(dets: list[Detection], meta: dict, soft: bool = False, strict: bool = False) -> dict:
    """GenEval's verdict, the strict verdict and the dense score on ``dets`` (``detect_batch(min_iou=0)``: every
    object; the verdicts and the dense score use those that reach ``MIN_IOU``); with ``soft`` also
    ``soft_score``, the dense score with every detection weighted by ``soft_weight`` (near misses in part); with
    ``strict`` both dense scores also ask for nothing beyond the named objects."""
    _check(meta)
    hard = [d for d in dets if d.iou >= MIN_IOU]
    req = requirements(hard, meta)
    correct = all(v == 1.0 for v in req)
    # GenEval asks for at least the named objects (bar counting): extra copies pass it. ``strict`` also wants
    # nothing more, so a model that learnt to draw several copies shows here
    named = sum(r["count"] for r in meta["include"])
    if strict:
        req = requirements(hard, meta, objects=len(dets))
    out = {"correct": correct, "strict": correct and len(dets) == named, "score": float(np.mean(req)) if req else 1.0}
    if soft:
        sreq = requirements(dets, meta, [soft_weight(d.iou) for d in dets], objects=len(dets) if strict else None)
        out["soft_score"] = float(np.mean(sreq)) if sreq else 1.0
    return out


def grade_batch(images: torch.Tensor, metas: list[dict], soft: bool = False, strict: bool = False) -> list[dict]:
    """grade_detections() for each image of (N, 3, H, W) in [0, 1], detecting once for the batch."""
    if len(metas) != images.shape[0]:
        raise ValueError(f"got {len(metas)} metadata entries for {images.shape[0]} images")
    for m in metas:
        _check(m)
    dets = detect_batch(images, min_iou=0.0)
    return [grade_detections(d, m, soft, strict) for d, m in zip(dets, metas)]


def grade(image: torch.Tensor, meta: dict) -> dict:
    """{"correct": bool (GenEval's rule for the tag), "strict": bool (correct, and no object beyond the named
    ones), "score": float in [0, 1] (fraction of requirements met)}."""
    return grade_batch(image[None] if image.dim() == 3 else image, [meta])[0]


def evaluate(images: torch.Tensor, metas: list[dict], prompts: list[str] | None = None) -> dict:
    """GenEval table: per-category accuracy and count, overall = mean of category accuracies, per-image and
    per-prompt correctness. Prompt strings come from ``prompts`` or each meta's "prompt"."""
    prompts = [m.get("prompt", "") for m in metas] if prompts is None else list(prompts)
    grades = grade_batch(images, metas)
    per_image = [{"prompt": p, "tag": m["tag"], **g} for p, m, g in zip(prompts, metas, grades)]
    cats = {}
    for tag in list(world.TAGS) + sorted({m["tag"] for m in metas} - set(world.TAGS)):
        rows = [r for r in per_image if r["tag"] == tag]
        if rows:
            k = sum(r["correct"] for r in rows)
            cats[tag] = {"accuracy": k / len(rows), "correct": k, "count": len(rows),
                         "score": float(np.mean([r["score"] for r in rows]))}
    per_prompt: dict[str, dict] = {}
    for r in per_image:
        e = per_prompt.setdefault(r["prompt"], {"tag": r["tag"], "correct": 0, "count": 0})
        e["correct"] += int(r["correct"])
        e["count"] += 1
    for e in per_prompt.values():
        e["accuracy"] = e["correct"] / e["count"]
    overall = float(np.mean([c["accuracy"] for c in cats.values()])) if cats else 0.0
    return {"overall": overall, "count": len(per_image), "categories": cats, "per_prompt": per_prompt,
            "per_image": per_image}


def format_table(table: dict) -> str:
    """Markdown: one row per category (accuracy, dense score, images), then the overall mean."""
    lines = ["| category | accuracy | score | images |", "|---|---:|---:|---:|"]
    for tag, c in table["categories"].items():
        lines.append(f"| {tag} | {c['accuracy']:.3f} | {c['score']:.3f} | {c['count']} |")
    lines.append(f"| **overall** | **{table['overall']:.3f}** | | {table['count']} |")
    return "\n".join(lines)


__all__ = ["POSITION_THRESHOLD", "SOFT_IOU", "soft_weight", "relations", "requirements", "grade", "grade_batch",
           "grade_detections", "evaluate", "format_table"]
