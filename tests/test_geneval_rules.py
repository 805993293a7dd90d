"""GenEval's grading, rule by rule, against its official evaluator (github.com/djghosh13/geneval,
``evaluation/evaluate_images.py``), on hand-made detections. Each test names the rule it covers: the function of
that file and what it does. Detections are {class: [(box, mask)]} after the filter, most confident first, as the
official ``evaluate_image`` hands them to ``evaluate``."""
import numpy as np
import pytest

from rewards.geneval import box_iou, grade, keep_detections, relation


def box(x0, y0=0, side=10):
    return np.array([x0, y0, x0 + side, y0 + side], dtype=float)


def objs(*xs):
    return [(box(x), None) for x in xs]


def always(colour):
    return lambda objects, name: [colour] * len(objects)


def verdict(objects, meta, colors=always("red")):
    return grade(objects, meta, colors)["correct"]


def test_include_is_at_least_count():
    """evaluate(): ``found_objects = objects[class][:count]``; fewer than ``count`` fails, more pass (the
    at-least rule of every tag but counting)."""
    meta = {"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}]}
    assert verdict({"dog": objs(0), "cat": objs(30)}, meta)
    assert verdict({"dog": objs(0, 30, 60), "cat": objs(90, 120)}, meta)      # extra copies still pass
    assert not verdict({"dog": objs(0)}, meta)                                 # "expected cat>=1, found 0"


def test_counting_is_include_n_plus_exclude_n_plus_one():
    """evaluate(): a counting prompt is include {count: n} and exclude {count: n + 1}; an exclude fails when
    ``len(objects[class]) >= count``: so exactly n passes, n - 1 and n + 1 fail."""
    meta = {"tag": "counting", "include": [{"class": "apple", "count": 3}],
            "exclude": [{"class": "apple", "count": 4}]}
    assert verdict({"apple": objs(0, 20, 40)}, meta)
    assert not verdict({"apple": objs(0, 20)}, meta)
    assert not verdict({"apple": objs(0, 20, 40, 60)}, meta)


def test_exclude_counts_every_kept_detection():
    """evaluate(): an exclude {class, count} fails when the kept detections of that class number >= count."""
    meta = {"tag": "single_object", "include": [{"class": "dog", "count": 1}],
            "exclude": [{"class": "cat", "count": 1}]}
    assert verdict({"dog": objs(0)}, meta)
    assert not verdict({"dog": objs(0), "cat": objs(30)}, meta)


def test_confidence_thresholds_are_strict_and_tag_dependent():
    """evaluate_image(): ``bbox[index][ordering, 4] > confidence_threshold``, THRESHOLD 0.3 and 0.9 for the
    counting tag: a box at exactly the threshold is dropped."""
    raw = {"apple": [(box(0), 0.9, None), (box(20), 0.9001, None), (box(40), 0.3, None), (box(60), 0.31, None)]}
    assert len(keep_detections(raw, "counting")["apple"]) == 1
    assert len(keep_detections(raw, "colors")["apple"]) == 3


def test_most_confident_first_and_at_most_max_objects():
    """evaluate_image(): ``np.argsort(confidence)[::-1]`` then ``[:MAX_OBJECTS]`` (16) per class."""
    raw = {"dog": [(box(i), 0.5 + i / 100, None) for i in range(20)]}
    kept = keep_detections(raw, "single_object")["dog"]
    assert len(kept) == 16 and [b[0] for b, _ in kept] == list(range(19, 3, -1))


def test_overlapping_boxes_all_count_at_the_default_max_overlap():
    """evaluate_image(): NMS_THRESHOLD (option max_overlap) defaults to 1, and then no box is suppressed: two
    near-identical boxes of one class are two objects (a duplicated detection passes "two dogs")."""
    raw = {"dog": [(box(0), 0.99, None), (box(1), 0.95, None)]}
    meta = {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}]}
    kept = keep_detections(raw, "counting")
    assert len(kept["dog"]) == 2 and verdict(kept, meta)
    # with max_overlap < 1 a box overlapping a more confident one at IoU >= max_overlap is dropped
    assert box_iou(box(0), box(1)) >= 0.5
    assert len(keep_detections(raw, "single_object", max_overlap=0.5)["dog"]) == 1
    assert len(keep_detections({"dog": [(box(0), 0.9, None), (box(30), 0.8, None)]}, "x", 0.5)["dog"]) == 2


def test_iou_counts_pixels_inclusively():
    """compute_iou(): a box covers (x2 - x1 + 1) x (y2 - y1 + 1) pixels."""
    assert box_iou([0, 0, 9, 9], [0, 0, 9, 9]) == 1.0
    assert box_iou([0, 0, 9, 9], [5, 0, 14, 9]) == pytest.approx(50 / 150)
    assert box_iou([0, 0, 9, 9], [10, 0, 19, 9]) == 0.0


def test_colour_is_judged_on_the_top_count_objects():
    """evaluate(): ``color_classification(image, found_objects, ...)`` on the ``count`` most confident, and
    ``colors.count(color) < count`` fails."""
    meta = {"tag": "colors", "include": [{"class": "car", "count": 2, "color": "red"}]}
    by_x = lambda objects, name: ["red" if b[0] < 50 else "blue" for b, _ in objects]  # noqa: E731
    assert verdict({"car": objs(0, 10, 60)}, meta, by_x)           # top two red, a blue third is not looked at
    assert not verdict({"car": objs(0, 60, 10)}, meta, by_x)       # the red one third in confidence does not help


def test_position_margin_threshold():
    """relative_position(): the centre offset shrinks by POSITION_THRESHOLD (0.1) x the summed box extents per
    axis, all shrunk components < 1e-3 means no relation, and "left of" needs shrunk_x / |offset| < -0.5
    (strictly)."""
    a = [0, 0, 10, 10]
    assert relation(a, [2, 0, 12, 10]) == set()            # offset 2 = 0.1 x 20: shrunk to 0, too close to call
    assert relation(a, [4, 0, 14, 10]) == set()            # shrunk 2 / 4 = exactly 0.5: not "left of"
    assert relation(a, [4.01, 0, 14.01, 10]) == {"left of"}
    assert relation([0, 0, 10, 10], [0, 30, 10, 40]) == {"above"}  # image y grows downward
    assert relation([0, 30, 10, 40], [0, 0, 10, 10]) == {"below"}


def test_position_all_pairs_against_the_matched_target():
    """evaluate(): every found object must stand in the relation to every object of the target include's
    matched group; a target that did not match (count or colour failed) is "no target" and fails."""
    meta = {"tag": "position", "include": [{"class": "cat", "count": 1},
                                           {"class": "dog", "count": 1, "position": ["left of", 0]}]}
    assert verdict({"cat": objs(30), "dog": objs(0)}, meta)
    assert not verdict({"cat": objs(0), "dog": objs(30)}, meta)
    assert not verdict({"dog": objs(0)}, meta)                          # no cat: no target
    # only the top-`count` target objects form the matched group: a second, less confident cat on the dog's
    # left does not matter
    assert verdict({"cat": objs(30, -40), "dog": objs(0)}, meta)
    coloured = {"tag": "position", "include": [{"class": "cat", "count": 1, "color": "black"},
                                               {"class": "dog", "count": 1, "position": ["left of", 0]}]}
    assert not verdict({"cat": objs(30), "dog": objs(0)}, coloured, always("white"))  # target failed its colour


def test_colour_attribution_needs_each_object_its_own_colour():
    """evaluate(): a color_attr prompt is two includes with a colour each; both colour checks must pass."""
    meta = {"tag": "color_attr", "include": [{"class": "handbag", "count": 1, "color": "pink"},
                                             {"class": "scissors", "count": 1, "color": "black"}]}
    right = lambda objects, name: ["pink" if name == "handbag" else "black"] * len(objects)  # noqa: E731
    swapped = lambda objects, name: ["black" if name == "handbag" else "pink"] * len(objects)  # noqa: E731
    found = {"handbag": objs(0), "scissors": objs(40)}
    assert verdict(found, meta, right)
    assert not verdict(found, meta, swapped)
