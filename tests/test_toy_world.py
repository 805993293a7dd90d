"""The shapes world: vocabulary, prompt sets and splits, scenes, rendering, datasets."""
import collections

import numpy as np
import pytest
import torch

from flowrl.toy import world


def test_vocabulary_covers_every_prompt_and_every_object_has_a_colour():
    prompts = world.all_prompts()
    assert len({p["prompt"] for p in prompts}) == len(prompts)            # strings identify prompts
    assert {p["tag"] for p in prompts} == set(world.TAGS)
    assert len(world.COLORS) >= 6 and len(world.SHAPES) >= 3
    for p in prompts:
        words = p["prompt"].split()
        assert set(words) <= set(world.WORDS), p["prompt"]
        named = [w for w in words if w in world.COLORS]
        assert len(named) == len(p["objects"]) >= 1, p["prompt"]         # a colour for every object
        assert all(o["color"] in world.COLORS and o["class"] in world.SHAPES for o in p["objects"])
    for w in list(world.COLORS) + list(world.SHAPES) + list(world.PLURALS.values()):
        assert w in world.WORDS


def test_templates_are_distinct_per_category():
    by = {p["prompt"]: p for p in world.all_prompts()}
    assert by["a red circle"]["include"] == [{"class": "circle", "count": 1}]
    assert by["a circle that is red"]["include"] == [{"class": "circle", "count": 1, "color": "red"}]
    assert "color" not in by["a red circle and a blue square"]["include"][0]
    assert by["a red circle with a blue square"]["include"][1]["color"] == "blue"
    assert by["three green triangles"]["exclude"] == [{"class": "triangle", "count": 4}]
    assert by["a red circle left of a blue square"]["include"][0]["position"] == ["left of", 1]


def test_split_is_deterministic_disjoint_and_large_enough():
    train, held = world.split_prompts(seed=0)
    assert (train, held) == world.split_prompts(seed=0)
    assert world.split_prompts(seed=1)[1] != held
    assert len(train) + len(held) == len(world.all_prompts())
    for tag in world.TAGS:
        tr = {p["prompt"] for p in train if p["tag"] == tag}
        he = {p["prompt"] for p in held if p["tag"] == tag}
        assert not tr & he and len(he) >= 12 and len(tr) >= len(he), tag
    # a held-out scene is held out in every wording: its reordering and its other-category twin
    he = {p["prompt"] for p in held}
    assert ("a red circle" in he) == ("a circle that is red" in he)
    swapped = {p["prompt"] for p in held if p["tag"] == "two_object"}
    for s in swapped:
        a, b = s.split(" and ")
        assert f"a {b[2:]} and {a}" in he


def _box_gap(a, b):
    return max(b.box[0] - a.box[2], a.box[0] - b.box[2], b.box[1] - a.box[3], a.box[1] - b.box[3])


def test_scenes_are_correct_separated_and_inside():
    rng = np.random.default_rng(0)
    for meta in world.all_prompts()[::7]:
        sc = world.sample_scene(meta, rng)
        want = collections.Counter((o["class"], o["color"]) for o in meta["objects"] for _ in range(o["count"]))
        assert collections.Counter((o.shape, o.color) for o in sc.objects) == want
        for o in sc.objects:
            assert min(o.box) >= world.BORDER - 1e-9 and max(o.box) <= world.WORLD_SIZE - world.BORDER + 1e-9
        for i, a in enumerate(sc.objects):
            for b in sc.objects[:i]:
                assert _box_gap(a, b) >= world.GAP - 1e-9
        if meta["tag"] == "position":
            a, b = sc.objects
            rel = meta["include"][0]["position"][0]
            dx, dy = a.cx - b.cx, a.cy - b.cy
            axis, sign = {"left of": (dx, -1), "right of": (dx, 1), "above": (dy, -1), "below": (dy, 1)}[rel]
            assert sign * axis > 0 and abs(axis) >= 2 * min(abs(dx), abs(dy)) - 1e-9


def test_render_is_deterministic_antialiased_and_scales():
    meta = next(p for p in world.all_prompts() if p["prompt"] == "a big red circle")
    sc = world.sample_scene(meta, 3)
    assert sc == world.sample_scene(meta, 3)
    img = world.render(sc)
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32
    assert 0 <= img.min() and img.max() <= 1
    edge = img[0][(img[0] > 0.05) & (img[0] < 0.9)]
    assert edge.numel() > 10                                              # anti-aliased edge pixels
    area = img[0].sum() / world.COLORS["red"][0]
    o = sc.objects[0]
    assert abs(area - np.pi * o.size ** 2 / 4) < 1.5                      # coverage integrates to the area
    big = world.render(sc, size=64)
    assert big.shape == (3, 64, 64)
    # same coverage up to 4x4 vs 8x8 sampling of an edge pixel
    assert torch.allclose(torch.nn.functional.avg_pool2d(big[None], 2)[0], img, atol=0.15)
    assert abs(big.sum() / 4 - img.sum()) < 0.5
    assert torch.equal(world.render_batch([]), torch.zeros(0, 3, 32, 32))


def test_make_dataset_is_deterministic_and_balanced():
    train, _ = world.split_prompts()
    x, p, m = world.make_dataset(600, seed=5, prompts=train)
    x2, p2, m2 = world.make_dataset(600, seed=5, prompts=train)
    assert torch.equal(x, x2) and p == p2 and m == m2
    assert x.shape == (600, 3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert not torch.equal(x, world.make_dataset(600, seed=6, prompts=train)[0])
    train_strings = {q["prompt"] for q in train}
    assert set(p) <= train_strings and all("prompt" not in q and "tag" in q for q in m)
    counts = collections.Counter(q["tag"] for q in m)
    assert set(counts) == set(world.TAGS) and min(counts.values()) > 60   # ~100 each when balanced
    counts = collections.Counter(q["tag"] for q in world.make_dataset(600, 5, train, balanced=False)[2])
    assert counts["position"] > 4 * counts["counting"]
    with pytest.raises(ValueError):
        world.make_dataset(4, 0, [])
