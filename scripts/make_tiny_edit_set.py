"""Write the shipped tiny editing prompt set (flowrl/data/prompts/tiny_edit.jsonl and its input images).

Each row asks for one edit of a rendered shapes-world scene: add an object (counting) or recolour one (colors).
The row keeps GenEval-style metadata of the *target* scene, so the shapes / geneval rewards grade the edit, and
its ``image`` field names the input image relative to the jsonl file. Deterministic: rerunning rewrites the
same bytes.

    python scripts/make_tiny_edit_set.py
"""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from flowrl.toy.world import render, sample_scene

OUT = Path(__file__).resolve().parents[1] / "flowrl" / "data" / "prompts"
SIZE = 64  # the tiny pipelines' default resolution


def _one(cls, color):
    return {"class": cls, "color": color, "count": 1}


# (source scene objects, edit prompt, target tag, target include, target objects)
EDITS = [
    ([_one("circle", "red")], "add a second red circle", "counting",
     [{"class": "circle", "count": 2}], [{"class": "circle", "color": "red", "count": 2}]),
    ([_one("square", "blue")], "add a second blue square", "counting",
     [{"class": "square", "count": 2}], [{"class": "square", "color": "blue", "count": 2}]),
    ([_one("triangle", "green")], "add a second green triangle", "counting",
     [{"class": "triangle", "count": 2}], [{"class": "triangle", "color": "green", "count": 2}]),
    ([{"class": "diamond", "color": "yellow", "count": 2}], "add a third yellow diamond", "counting",
     [{"class": "diamond", "count": 3}], [{"class": "diamond", "color": "yellow", "count": 3}]),
    ([_one("circle", "blue")], "make the circle red", "colors",
     [{"class": "circle", "count": 1, "color": "red"}], [_one("circle", "red")]),
    ([_one("square", "red")], "make the square green", "colors",
     [{"class": "square", "count": 1, "color": "green"}], [_one("square", "green")]),
    ([_one("triangle", "yellow")], "make the triangle blue", "colors",
     [{"class": "triangle", "count": 1, "color": "blue"}], [_one("triangle", "blue")]),
    ([_one("diamond", "green")], "make the diamond yellow", "colors",
     [{"class": "diamond", "count": 1, "color": "yellow"}], [_one("diamond", "yellow")]),
]


def main() -> None:
    (OUT / "tiny_edit").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (source, prompt, tag, include, objects) in enumerate(EDITS):
        image = render(sample_scene({"objects": source}, rng=i), size=SIZE)
        name = f"tiny_edit/{i:02d}.png"
        pixels = (image.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
        Image.fromarray(pixels).save(OUT / name)
        rows.append({"prompt": prompt, "image": name, "tag": tag, "include": include, "objects": objects})
    (OUT / "tiny_edit.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} rows to {OUT / 'tiny_edit.jsonl'}")


if __name__ == "__main__":
    main()
