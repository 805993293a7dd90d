"""The shapes world's exact detector, GenEval-style grading and the "shapes" reward."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import rewards.toy  # noqa: F401  (registers "shapes" until rewards/__init__ imports it)
from flowrl.toy import detector, geneval, world
from rewards.base import build_reward

N = 200  # images per category and condition


def gaussian_blur(x, sigma=0.7):
    t = torch.arange(-3, 4, dtype=torch.float32)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).view(1, 1, 1, -1).repeat(3, 1, 1, 1)
    x = F.conv2d(F.pad(x, (3, 3, 0, 0), mode="replicate"), k, groups=3)
    return F.conv2d(F.pad(x, (0, 0, 3, 3), mode="replicate"), k.transpose(2, 3), groups=3)


def soften(x):
    """Stand-in for a VAE round trip: 2x down, bilinear back up."""
    return F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="bilinear", align_corners=False)


def by_tag(tag):
    return [p for p in world.all_prompts() if p["tag"] == tag]


def meta_of(prompt):
    return next(p for p in world.all_prompts() if p["prompt"] == prompt)


def accuracy(images, metas):
    return float(np.mean([g["correct"] for g in geneval.grade_batch(images, metas)]))


@pytest.fixture(scope="module")
def truth():
    """N correct renderings per category: {tag: (images, metas)}."""
    out = {}
    for i, tag in enumerate(world.TAGS):
        x, _, m = world.make_dataset(N, seed=100 + i, prompts=by_tag(tag))
        out[tag] = (x, m)
    return out


@pytest.mark.parametrize("condition", ["plain", "blur", "soft"])
def test_ground_truth_graded_correct_in_every_category(truth, condition):
    fn = {"plain": lambda x: x, "blur": gaussian_blur, "soft": soften}[condition]
    for tag, (x, m) in truth.items():
        assert accuracy(fn(x).clamp(0, 1), m) >= 0.98, (condition, tag)


def test_noise_and_black_are_graded_wrong(truth):
    g = torch.Generator().manual_seed(0)
    inputs = {"noise": torch.rand(N, 3, 32, 32, generator=g), "black": torch.zeros(N, 3, 32, 32)}
    for name, x in inputs.items():
        dets = detector.detect_batch(x)
        assert sum(map(len, dets)) <= 0.02 * N, name
        for tag, (_, m) in truth.items():
            correct = [geneval.grade_detections(d, meta)["correct"] for d, meta in zip(dets, m)]
            assert np.mean(correct) <= 0.02, (name, tag)


def test_detections_report_colour_shape_and_place():
    meta = meta_of("a red circle left of a blue square")
    sc = world.sample_scene(meta, 0)
    dets = sorted(detector.detect(world.render(sc)), key=lambda d: d.centroid[0])
    assert [(d.color, d.shape) for d in dets] == [("red", "circle"), ("blue", "square")]
    for d, o in zip(dets, sc.objects):
        assert abs(d.centroid[0] - o.cx) < 0.6 and abs(d.centroid[1] - o.cy) < 0.6
        assert d.bbox[0] <= o.cx <= d.bbox[2] and d.iou > 0.95
        assert abs(d.area - world.AREA[o.shape] * o.size ** 2) < 0.15 * d.area
    # any resolution is read at the world's
    assert [(d.color, d.shape) for d in sorted(detector.detect(world.render(sc, 64)), key=lambda d: d.centroid[0])] \
        == [("red", "circle"), ("blue", "square")]


def _render_variant(meta, edit, n=60, seed=0):
    """Images of a modified copy of meta (what a wrong generation would show)."""
    rng = np.random.default_rng(seed)
    m = copy.deepcopy(meta)
    edit(m)
    return world.render_batch([world.sample_scene(m, rng) for _ in range(n)])


@pytest.mark.parametrize("n,delta", [(2, -1), (2, 1), (3, -1), (3, 1), (4, -1), (4, 1)])
def test_counting_off_by_one_is_wrong(n, delta):
    meta = meta_of(f"{world.NUMBERS[n]} red triangles")

    def edit(m):
        m["objects"][0]["count"] = n + delta
    x = _render_variant(meta, edit)
    assert accuracy(x, [meta] * len(x)) <= 0.02
    scores = [g["score"] for g in geneval.grade_batch(x, [meta] * len(x))]
    assert np.median(scores) == pytest.approx(1 - 1 / n)                # partial credit, never full


@pytest.mark.parametrize("rel", list(world.RELATIONS))
def test_position_swapped_is_wrong(rel):
    meta = meta_of(f"a green square {rel} a yellow diamond")

    def edit(m):
        m["include"][0]["position"][0] = world.RELATIONS[rel]
    x = _render_variant(meta, edit)
    assert accuracy(x, [meta] * len(x)) <= 0.02
    assert accuracy(world.render_batch([world.sample_scene(meta, s) for s in range(60)]), [meta] * 60) >= 0.98
    assert all(g["score"] == pytest.approx(2 / 3) for g in geneval.grade_batch(x, [meta] * len(x)))


def test_color_attr_swapped_is_wrong_but_two_object_is_not():
    meta = meta_of("a red circle with a blue square")

    def edit(m):
        m["objects"][0]["color"], m["objects"][1]["color"] = "blue", "red"
    x = _render_variant(meta, edit)
    assert accuracy(x, [meta] * len(x)) <= 0.02
    assert accuracy(x, [meta_of("a red circle and a blue square")] * len(x)) >= 0.98   # colours not graded
    assert accuracy(x, [meta_of("a blue circle with a red square")] * len(x)) >= 0.98
    assert all(g["score"] == pytest.approx(0.5) for g in geneval.grade_batch(x, [meta] * len(x)))


def test_relations_use_genevals_margin():
    def det(cx, cy, s=8):
        box = (cx - s // 2, cy - s // 2, cx + s // 2, cy + s // 2)
        return detector.Detection("red", "square", (cx, cy), box, 64, 1)
    assert geneval.relations(det(5, 16), det(25, 16)) == {"left of"}
    assert geneval.relations(det(25, 16), det(5, 16)) == {"right of"}
    assert geneval.relations(det(16, 5), det(16, 25)) == {"above"}
    assert geneval.relations(det(16, 16), det(17, 16)) == set()          # within 0.1 * (wa + wb)
    assert geneval.relations(det(5, 5), det(25, 25)) == {"left of", "above"}


def test_evaluate_table_and_markdown(truth):
    x = torch.cat([truth[t][0][:10] for t in world.TAGS] + [torch.zeros(10, 3, 32, 32)])
    metas = [m for t in world.TAGS for m in truth[t][1][:10]] + truth["counting"][1][:10]
    table = geneval.evaluate(x, metas, prompts=[f"p{i % 7}" for i in range(len(metas))])
    assert table["categories"]["counting"] == {"accuracy": 0.5, "correct": 10, "count": 20, "score": 0.5}
    assert table["categories"]["position"]["accuracy"] == 1.0
    assert table["overall"] == pytest.approx((5 + 0.5) / 6)             # mean of category accuracies
    assert len(table["per_image"]) == 70 and sum(e["count"] for e in table["per_prompt"].values()) == 70
    md = geneval.format_table(table)
    assert md.count("\n") == 8 and "| counting | 0.500 |" in md and "**0.917**" in md


def test_reward_keys_modes_and_errors(truth):
    x, metas = truth["color_attr"]
    x = torch.cat([x[:3], torch.zeros(1, 3, 32, 32)])
    metas = metas[:4]
    prompts = [f"prompt {i}" for i in range(4)]
    out = build_reward("shapes")(x, prompts, metas)
    assert set(out) == {"shapes", "shapes/correct", "shapes/strict"}
    assert all(v.shape == (4,) and v.dtype == torch.float32 for v in out.values())
    assert out["shapes"].tolist() == [1, 1, 1, 0] and out["shapes/correct"].tolist() == [1, 1, 1, 0]
    half = _render_variant(meta_of("a red circle with a blue square"),
                           lambda m: m["objects"][0].update(color="green"), n=1)
    meta = world.metadata_of(meta_of("a red circle with a blue square"))
    dense = build_reward("shapes")(half, ["p"], [meta])
    binary = build_reward("shapes", mode="binary")(half, ["p"], [meta])
    assert dense["shapes"].item() == pytest.approx(0.75) and binary["shapes"].item() == 0
    assert dense["shapes/correct"].item() == 0
    with pytest.raises(ValueError, match="a lost prompt"):
        build_reward("shapes")(x[:1], ["a lost prompt"], [{}])
    with pytest.raises(ValueError, match="a lost prompt"):
        build_reward("shapes")(x[:1], ["a lost prompt"], None)
    with pytest.raises(ValueError, match="mode"):
        build_reward("shapes", mode="fuzzy")
    soft = build_reward("shapes", mode="soft")(x, prompts, metas)
    assert set(soft) == {"shapes", "shapes/dense", "shapes/correct", "shapes/strict"}
    assert soft["shapes/dense"].tolist() == out["shapes"].tolist() and soft["shapes"].tolist() == [1, 1, 1, 0]


def test_strict_verdict_refuses_extra_copies(truth):
    for tag, (x, m) in truth.items():   # ground truth holds exactly the named objects
        assert all(g["strict"] == g["correct"] for g in geneval.grade_batch(x[:40], m[:40])), tag
    meta = meta_of("a red circle")
    twice = _render_variant(meta, lambda m: m["objects"][0].update(count=2), n=20)
    grades = geneval.grade_batch(twice, [world.metadata_of(meta)] * len(twice))
    assert all(g["correct"] for g in grades) and not any(g["strict"] for g in grades)   # GenEval's at-least rule
    # the strict reward: one more requirement, named / found = 1/2, beside the count; binary = strict
    metas = [world.metadata_of(meta)] * len(twice)
    assert build_reward("shapes")(twice, ["p"] * 20, metas)["shapes"].tolist() == [1.0] * 20
    strict = build_reward("shapes", strict=True)(twice, ["p"] * 20, metas)["shapes"]
    assert strict.tolist() == pytest.approx([0.75] * 20)
    assert build_reward("shapes", mode="binary", strict=True)(twice, ["p"] * 20, metas)["shapes"].sum() == 0
    assert build_reward("shapes", mode="soft", strict=True)(twice, ["p"] * 20, metas)["shapes"].tolist() == \
        pytest.approx([0.75] * 20)
    for tag, (x, m) in truth.items():   # on ground truth the strict score is GenEval's dense score
        ref = build_reward("shapes")(x[:40], ["p"] * 40, m[:40])["shapes"]
        assert torch.equal(build_reward("shapes", strict=True)(x[:40], ["p"] * 40, m[:40])["shapes"], ref), tag
    with pytest.raises(ValueError, match="strict"):
        build_reward("shapes", strict="yes")


def test_verdict_bonus_adds_the_verdict(truth):
    """soft + b * strict verdict: a correct image with nothing extra gains b, one with an extra copy gains nothing
    (its strict verdict is 0), and without strict the bonus follows GenEval's verdict."""
    meta = meta_of("a red circle")
    metas = [world.metadata_of(meta)] * 20
    once = _render_variant(meta, lambda m: None, n=20)
    twice = _render_variant(meta, lambda m: m["objects"][0].update(count=2), n=20)
    for mode in ("soft", "dense"):
        plain = build_reward("shapes", mode=mode, strict=True)
        bonus = build_reward("shapes", mode=mode, strict=True, verdict_bonus=1.5)
        for x in (once, twice):
            p, b = plain(x, ["p"] * 20, metas), bonus(x, ["p"] * 20, metas)
            torch.testing.assert_close(b["shapes"], p["shapes"] + 1.5 * p["shapes/strict"])
        assert bonus(once, ["p"] * 20, metas)["shapes"].tolist() == pytest.approx([2.5] * 20)
        assert bonus(twice, ["p"] * 20, metas)["shapes"].tolist() == pytest.approx([0.75] * 20)
    geneval_bonus = build_reward("shapes", mode="soft", verdict_bonus=1.0)(twice, ["p"] * 20, metas)
    assert geneval_bonus["shapes"].tolist() == pytest.approx([2.0] * 20)   # GenEval passes the extra copy
    for bad in (-1.0, "1", True):
        with pytest.raises(ValueError, match="verdict_bonus"):
            build_reward("shapes", mode="soft", verdict_bonus=bad)
    with pytest.raises(ValueError, match="binary"):
        build_reward("shapes", mode="binary", verdict_bonus=1.0)


def test_strict_counts_objects_no_template_fits():
    """A smear beside the named shape is still an extra object: strict refuses it, GenEval does not."""
    meta = meta_of("a red circle")
    x = _render_variant(meta, lambda m: None, n=20)
    smeared = x.clone()
    ok = []
    for img in smeared:   # a red 3 x 12 bar inside five empty rows, so it touches nothing
        rows = (img.amax(dim=(0, 2)) < 0.05).nonzero().flatten().tolist()
        band = next((r for r in rows if all(r + k in rows for k in range(5))), None)
        ok.append(band is not None)
        if band is not None:
            img[:, band + 1:band + 4, 2:14] = torch.tensor(world.COLORS["red"]).view(3, 1, 1)
    smeared, x = smeared[ok], x[ok]
    assert len(smeared) >= 10
    assert any(o.shape == "" and o.iou == 0 for o in detector.detect_batch(smeared[:1], min_iou=0.0)[0])
    shapes_only = detector.MIN_IOU
    assert detector.detect_batch(smeared, min_iou=shapes_only) == detector.detect_batch(x, min_iou=shapes_only)
    metas = [world.metadata_of(meta)] * len(x)
    g = geneval.grade_batch(smeared, metas)
    assert all(e["correct"] for e in g) and not any(e["strict"] for e in g)
    assert all(e["strict"] for e in geneval.grade_batch(x, metas))
    strict = build_reward("shapes", strict=True)(smeared, ["p"] * len(x), metas)["shapes"]
    assert strict.tolist() == pytest.approx([0.75] * len(x))


def _notched_square(k):
    """A red 12 px square missing a k x k corner: a near miss of a square for k = 5 (IoU 0.73), full for k <= 4."""
    x = torch.zeros(1, 3, 32, 32)
    x[0, :, 10:22, 10:22] = torch.tensor(world.COLORS["red"]).view(3, 1, 1)
    x[0, :, 10:10 + k, 10:10 + k] = 0
    return x


def test_soft_score_credits_near_misses_and_equals_dense_on_truth(truth):
    for tag, (x, m) in truth.items():   # every true shape is a full detection: soft == dense
        assert all(g["soft_score"] == g["score"] for g in geneval.grade_batch(x[:40], m[:40], soft=True)), tag
    meta = world.metadata_of(meta_of("a red square"))
    near = _notched_square(5)
    (d,), = detector.detect_batch(near, min_iou=geneval.SOFT_IOU)
    assert d.shape == "square" and geneval.SOFT_IOU < d.iou < detector.MIN_IOU
    assert detector.detect_batch(near) == [[]]
    g = geneval.grade_batch(near, [meta], soft=True)[0]
    assert not g["correct"] and g["score"] == 0 and g["soft_score"] == pytest.approx(geneval.soft_weight(d.iou))
    assert 0 < g["soft_score"] < 1
    # a smaller notch scores higher (a full detection at k = 4); black scores nothing
    closer = geneval.grade_batch(_notched_square(4), [meta], soft=True)[0]
    assert g["soft_score"] < closer["soft_score"] == closer["score"] == 1
    assert geneval.grade_batch(torch.zeros(1, 3, 32, 32), [meta], soft=True)[0]["soft_score"] == 0
    assert geneval.soft_weight(geneval.SOFT_IOU) == 0 and geneval.soft_weight(detector.MIN_IOU) == 1


def test_weighted_requirements_by_hand():
    def det(shape, cx, w=1.0):
        return detector.Detection("red", shape, (cx, 16), (cx - 4, 12, cx + 4, 20), 64, 1.0), w
    two = world.metadata_of(meta_of("two red triangles"))
    dets, ws = zip(det("triangle", 6), det("triangle", 24, 0.5))
    assert geneval.requirements(list(dets), two, list(ws)) == [pytest.approx(1 - 0.5 / 2)]
    assert geneval.requirements(list(dets), two) == [1.0]                     # unweighted: exactly two
    rel = world.metadata_of(meta_of("a red circle left of a blue square"))
    pairs = [det("circle", 6), det("square", 24, 0.5), det("square", 2, 0.5)]   # one pair holds, one is reversed
    dets, ws = zip(*pairs)
    # circle count 1, relation: weighted pairs 0.5 holding / (0.5 + 0.5), square count 0.5 + 0.5
    assert geneval.requirements(list(dets), rel, list(ws)) == [1.0, pytest.approx(0.5), 1.0]
