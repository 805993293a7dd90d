"""GenEval as a server-side scorer (run it under ``python -m rewards.server``, score with the ``geneval`` reward).

GenEval (Ghosh et al. 2023, github.com/djghosh13/geneval) grades an image against its prompt's metadata
(``tag``, ``include`` [{class, count, color?, position?}], ``exclude``) with a COCO instance detector
(Mask2Former Swin-S, mmdetection config ``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco``, checkpoint
``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth`` from GenEval's ``evaluation/download_models.sh``) and a
CLIP ViT-L-14 (OpenAI weights, open_clip) zero-shot colour classifier. That stack (mmdet 2.x / mmcv-full 1.x)
conflicts with flowrl's, so it runs in its own environment behind the reward server:

    python -m rewards.server --port 18085 --scorer rewards.geneval:GenEvalScorer --scorer-kwargs \
      '{"config": "<mmdet>/configs/mask2former/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py",
        "checkpoint": "<dir>/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth",
        "class_names": "<geneval>/evaluation/object_names.txt", "device": "cuda"}'

The detector and colour classifier are plain callables, so any stack fits (``GenEvalScorer(detector=...,
color_classifier=...)`` from Python):

    detector(images: uint8 (N, H, W, 3)) -> per image {class name: [(box [x1, y1, x2, y2], confidence, mask), ...]}
        mask: (H, W) bool or None. Every detection, unfiltered: thresholds are GenEval's and applied here.
    color_classifier(image: uint8 (H, W, 3), objects: [(box, mask), ...], class name) -> [colour name per object]

Scores per image: ``correct`` (GenEval's binary verdict) and ``score`` (dense, for training: the mean over the
prompt's requirements of the fraction met, the same definition as the shapes world's grading in
flowrl/toy/geneval.py; ``score == 1`` exactly when ``correct``). flow_grpo's dense GenEval reward differs: it
counts objects with an exact-count rule for every tag.

This module needs only numpy at import; mmdet and open_clip are imported when the default stack is built.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# GenEval's evaluation settings (evaluation/evaluate_images.py)
THRESHOLD = 0.3            # detection confidence kept
COUNTING_THRESHOLD = 0.9   # ... for the counting tag, where a spurious box flips the verdict
MAX_OBJECTS = 16           # per class
POSITION_THRESHOLD = 0.1   # relative margin of the relation test
MAX_OVERLAP = 1.0          # same-class IoU at which a less confident box is dropped (1: none is)
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")


def relation(box_a: Sequence[float], box_b: Sequence[float], margin: float = POSITION_THRESHOLD) -> set[str]:
    """Relations of box a to box b between box centres: each axis offset shrinks by ``margin`` times the summed
    extents, and a relation holds when its axis carries more than half of the (unshrunk) offset's length."""
    a, b = np.asarray(box_a[:4], dtype=float), np.asarray(box_b[:4], dtype=float)
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    extent = (a[2:] - a[:2]) + (b[2:] - b[:2])
    shrunk = np.maximum(np.abs(offset) - margin * extent, 0) * np.sign(offset)
    norm = np.linalg.norm(offset)
    if norm == 0 or np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / norm
    return {name for name, hit in (("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5),
                                   ("below", dy > 0.5)) if hit}


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU in GenEval's pixel convention: a box [x1, y1, x2, y2] covers (x2 - x1 + 1) x (y2 - y1 + 1) pixels."""
    def area(x1, y1, x2, y2):
        return max(x2 - x1 + 1, 0) * max(y2 - y1 + 1, 0)

    inter = area(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    union = area(*a[:4]) + area(*b[:4]) - inter
    return inter / union if union else 0.0


def keep_detections(raw: dict[str, list], tag: str, max_overlap: float = MAX_OVERLAP) -> dict[str, list]:
    """GenEval's filter: confidence above the (tag's) threshold, most confident first, at most MAX_OBJECTS, then
    (``max_overlap`` < 1, GenEval's ``max_overlap`` option) a greedy suppression of boxes overlapping a kept one
    of the same class at IoU >= max_overlap. At GenEval's default 1.0 overlapping boxes all count."""
    threshold = COUNTING_THRESHOLD if tag == "counting" else THRESHOLD
    out = {}
    for name, dets in raw.items():
        ranked = sorted((d for d in dets if float(d[1]) > threshold), key=lambda d: -float(d[1]))[:MAX_OBJECTS]
        kept = []
        while ranked:
            best = ranked.pop(0)
            kept.append(best)
            if max_overlap < 1:
                ranked = [d for d in ranked if box_iou(best[0], d[0]) < max_overlap]
        if kept:
            out[name] = [(np.asarray(d[0], dtype=float)[:4], d[2] if len(d) > 2 else None) for d in kept]
    return out


def grade(objects: dict[str, list], meta: dict, colors_of: Callable[[list, str], list[str]]) -> dict:
    """{"correct": GenEval's verdict, "score": fraction of requirements met} from filtered detections.

    GenEval's rules: an include needs ``count`` detections of its class; its colour and position are judged on
    the ``count`` most confident; a position holds when every one of them stands in the relation to every
    object of the matched include it refers to (none matched: it fails); an exclude fails at ``count`` or more.
    """
    if not isinstance(meta, dict) or "include" not in meta or "tag" not in meta:
        raise ValueError(f"GenEval metadata needs 'tag' and 'include', got {meta!r}")
    correct, parts, matched = True, [], []
    caps = {e["class"]: e["count"] for e in meta.get("exclude", [])}
    for req in meta["include"]:
        name, n = req["class"], req["count"]
        found = objects.get(name, [])
        top = found[:n]
        ok = len(top) >= n
        exact = caps.get(name) == n + 1  # counting: "exactly n" is include n + exclude n+1
        parts.append(max(0.0, 1 - abs(len(found) - n) / n) if exact else len(top) / n)
        if "color" in req:
            hits = sum(c == req["color"] for c in colors_of(top, name)) if top else 0
            parts.append(min(hits, n) / n)
            ok = ok and hits >= n
        if "position" in req:
            rel, j = req["position"]
            if not 0 <= j < len(matched):
                raise ValueError(f"position of {name!r} refers to include {j}, not an earlier one: {meta!r}")
            ref = meta["include"][j]
            pairs = [rel in relation(a[0], b[0]) for a in top for b in objects.get(ref["class"], [])[:ref["count"]]]
            parts.append(sum(pairs) / len(pairs) if pairs else 0.0)
            ok = ok and matched[j] is not None and bool(pairs) and all(pairs)
        matched.append(top if ok else None)
        correct = correct and ok
    for e in meta.get("exclude", []):
        n_found = len(objects.get(e["class"], []))
        if n_found >= e["count"]:
            correct = False
        if not any(r["class"] == e["class"] and r["count"] + 1 == e["count"] for r in meta["include"]):
            parts.append(float(n_found < e["count"]))  # an exclude that is not a counting cap of an include
    return {"correct": correct, "score": float(np.mean(parts)) if parts else 1.0}


class GenEvalScorer:
    """A reward-server scorer: ``{"score": dense, "correct": 0/1}`` per image (see the module docstring).

    Give ``detector`` and ``color_classifier`` callables, or ``config`` + ``checkpoint`` to build GenEval's
    own stack (mmdet Mask2Former + open_clip ViT-L-14); ``class_names`` a file with one name per line in the
    detector's class order (GenEval's ``evaluation/object_names.txt``), default the detector's own names.
    """

    def __init__(self, detector: Callable | None = None, color_classifier: Callable | None = None, *,
                 config: str | None = None, checkpoint: str | None = None, class_names: str | None = None,
                 clip_arch: str = "ViT-L-14", clip_pretrained: str = "openai", device: str = "cuda",
                 max_overlap: float = MAX_OVERLAP):
        if not 0 < max_overlap <= 1:
            raise ValueError(f"GenEvalScorer: max_overlap must be in (0, 1], got {max_overlap!r}")
        self.max_overlap = max_overlap
        if detector is None:
            if not (config and checkpoint):
                raise ValueError("GenEvalScorer: give a detector callable, or config and checkpoint for mmdet")
            detector = MMDetDetector(config, checkpoint, class_names, device)
        if color_classifier is None:
            color_classifier = ClipColorClassifier(clip_arch, clip_pretrained, device)
        self.detector, self.color_classifier = detector, color_classifier

    def __call__(self, images: np.ndarray, prompts: list[str], metadata: list[dict]) -> dict[str, list[float]]:
        for p, m in zip(prompts, metadata):
            if not isinstance(m, dict) or "tag" not in m or "include" not in m:
                raise ValueError(f"prompt {p!r} has no GenEval metadata ('tag', 'include'), got {m!r}")
        detections = self.detector(images)
        if len(detections) != len(images):
            raise ValueError(f"detector returned {len(detections)} results for {len(images)} images")
        scores, correct = [], []
        for image, raw, meta in zip(images, detections, metadata):
            g = grade(keep_detections(raw, meta["tag"], self.max_overlap), meta,
                      lambda objs, name, image=image: list(self.color_classifier(image, objs, name)))
            scores.append(g["score"])
            correct.append(float(g["correct"]))
        return {"score": scores, "correct": correct}


def toy_scorer(images: np.ndarray, prompts: list[str], metadata: list[dict]) -> dict[str, list[float]]:
    """The shapes world's exact detector behind the same protocol and keys as GenEvalScorer: a detector-free
    stand-in that exercises the server path end to end (tests, the toy recipe through ``remote``)."""
    import torch

    from flowrl.toy import geneval as toy

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
    grades = toy.grade_batch(x, [dict(m) for m in metadata])
    return {"score": [g["score"] for g in grades], "correct": [float(g["correct"]) for g in grades]}


# -- GenEval's own stack (imported lazily; needs the mmdet / open_clip environment) -------------------------
def _missing(what: str, extra: str) -> ImportError:
    return ImportError(f"GenEvalScorer needs {what} for its default stack ({extra}); install GenEval's environment "
                       "(github.com/djghosh13/geneval, environment.yml) or pass your own callable")


class MMDetDetector:
    """mmdetection 2.x ``init_detector`` / ``inference_detector`` as a GenEval detector callable."""

    def __init__(self, config: str, checkpoint: str, class_names: str | None = None, device: str = "cuda"):
        try:
            from mmdet.apis import inference_detector, init_detector
        except ImportError as e:
            raise _missing("mmdet", f"mmdet.apis: {e}") from None
        for label, path in (("config", config), ("checkpoint", checkpoint)):
            if not Path(path).is_file():
                raise FileNotFoundError(f"GenEvalScorer: {label} {path} does not exist")
        self.model = init_detector(config, checkpoint, device=device)
        self._infer = inference_detector
        self.names = (Path(class_names).read_text().split("\n") if class_names else list(self.model.CLASSES))
        self.names = [n.strip() for n in self.names if n.strip()]

    def __call__(self, images: np.ndarray) -> list[dict[str, list]]:
        out = []
        for result in self._infer(self.model, list(images)):
            boxes, masks = result if isinstance(result, tuple) else (result, None)
            if len(boxes) != len(self.names):
                raise ValueError(f"detector has {len(boxes)} classes but class_names lists {len(self.names)}")
            out.append({name: [(b[:4], float(b[4]), None if masks is None else masks[k][i])
                               for i, b in enumerate(boxes[k])]
                        for k, name in enumerate(self.names)})
        return out


class ClipColorClassifier:
    """GenEval's colour check: each object cropped to its box, pixels outside its mask painted grey (#999), then
    zero-shot CLIP over COLORS with three prompt templates averaged."""

    TEMPLATES = ("a photo of a {c} {name}", "a photo of a {c}-colored {name}", "a photo of a {c} object")

    def __init__(self, arch: str = "ViT-L-14", pretrained: str = "openai", device: str = "cuda"):
        try:
            import open_clip
            import torch
        except ImportError as e:
            raise _missing("open_clip", str(e)) from None
        self.torch, self.device = torch, device
        self.model, _, self.transform = open_clip.create_model_and_transforms(arch, pretrained=pretrained,
                                                                              device=device)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(arch)
        self._classifiers: dict[str, Any] = {}

    def _classifier(self, name: str):
        if name not in self._classifiers:
            torch = self.torch
            with torch.no_grad():
                weights = []
                for c in COLORS:
                    tokens = self.tokenizer([t.format(c=c, name=name) for t in self.TEMPLATES]).to(self.device)
                    emb = self.model.encode_text(tokens)
                    emb = emb / emb.norm(dim=-1, keepdim=True)
                    mean = emb.mean(0)
                    weights.append(mean / mean.norm())
                self._classifiers[name] = torch.stack(weights, dim=1)
        return self._classifiers[name]

    def __call__(self, image: np.ndarray, objects: list, name: str) -> list[str]:
        from PIL import Image

        torch = self.torch
        pil, grey = Image.fromarray(image), Image.new("RGB", (image.shape[1], image.shape[0]), "#999")
        crops = []
        for box, mask in objects:
            masked = pil if mask is None else Image.composite(pil, grey, Image.fromarray(np.asarray(mask, bool)))
            crops.append(self.transform(masked.crop(tuple(float(v) for v in box[:4]))))
        with torch.no_grad():
            feats = self.model.encode_image(torch.stack(crops).to(self.device))
            feats = feats / feats.norm(dim=-1, keepdim=True)
            logits = feats @ self._classifier(name)
        return [COLORS[i] for i in logits.argmax(1).tolist()]


__all__ = ["COLORS", "COUNTING_THRESHOLD", "MAX_OBJECTS", "MAX_OVERLAP", "POSITION_THRESHOLD", "THRESHOLD",
           "ClipColorClassifier", "GenEvalScorer", "MMDetDetector", "box_iou", "grade", "keep_detections", "relation",
           "toy_scorer"]
