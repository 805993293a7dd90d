"""GenEval's grading rules on hand-made detections (no detector needed), and the scorer's plumbing."""
import importlib.util

import numpy as np
import pytest

from rewards.geneval import GenEvalScorer, grade, keep_detections, relation

COUNTING = {"tag": "counting", "include": [{"class": "apple", "count": 3}],
            "exclude": [{"class": "apple", "count": 4}]}
COLORS = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
# "a photo of a dog left of a cat": GenEval's position refers to an earlier include by index
POSITION = {"tag": "position", "include": [{"class": "cat", "count": 1},
                                           {"class": "dog", "count": 1, "position": ["left of", 0]}]}


def red_left_of_50(objects, name):
    return ["red" if box[0] < 50 else "blue" for box, _ in objects]


def obj(x0, y0=0, side=10):
    return (np.array([x0, y0, x0 + side, y0 + side], dtype=float), None)


def test_relation_between_box_centres_with_genevals_margin():
    a = [0, 0, 10, 10]
    # offset (-30, 0), shrunk by 0.1 * (10 + 10) to -28; -28 / 30 < -0.5
    assert relation(a, [30, 0, 40, 10]) == {"left of"}
    assert relation([30, 0, 40, 10], a) == {"right of"}
    # diagonal: each axis carries 28 / 42.4 = 0.66 of the offset
    assert relation(a, [30, 30, 40, 40]) == {"left of", "above"}
    # 1 px apart is inside the margin: no relation at all
    assert relation(a, [1, 0, 11, 10]) == set()


def test_filter_uses_the_counting_threshold_and_caps_per_class():
    raw = {"apple": [(obj(0)[0], c, None) for c in (0.95, 0.5, 0.92, 0.91, 0.2)]}
    assert [b[0] for b, _ in keep_detections(raw, "counting")["apple"]] == [0, 0, 0]
    assert len(keep_detections(raw, "counting")["apple"]) == 3       # > 0.9 only
    assert len(keep_detections(raw, "single_object")["apple"]) == 4  # > 0.3
    boxes = [(obj(i)[0], 0.9 + i / 1000, None) for i in range(20)]
    kept = keep_detections({"dog": boxes}, "two_object")["dog"]
    assert len(kept) == 16 and [b[0] for b, _ in kept] == list(range(19, 3, -1))  # most confident first
    assert keep_detections({"dog": [(obj(0)[0], 0.1, None)]}, "two_object") == {}


@pytest.mark.parametrize("n,correct,score", [(3, True, 1.0), (4, False, 2 / 3), (2, False, 2 / 3), (0, False, 0.0)])
def test_counting_is_exact(n, correct, score):
    g = grade({"apple": [obj(20 * i) for i in range(n)]} if n else {}, COUNTING, red_left_of_50)
    assert g["correct"] is correct and g["score"] == pytest.approx(score)


def test_colour_is_judged_on_the_most_confident_objects():
    assert grade({"car": [obj(10)]}, COLORS, red_left_of_50) == {"correct": True, "score": 1.0}
    assert grade({"car": [obj(60)]}, COLORS, red_left_of_50) == {"correct": False, "score": 0.5}
    # a red car second in confidence is not looked at: GenEval checks the top ``count`` only
    assert grade({"car": [obj(60), obj(10)]}, COLORS, red_left_of_50)["correct"] is False


def test_position_all_pairs_rule():
    dog_left = {"cat": [obj(30)], "dog": [obj(0)]}
    assert grade(dog_left, POSITION, red_left_of_50) == {"correct": True, "score": 1.0}
    swapped = {"cat": [obj(0)], "dog": [obj(30)]}
    assert grade(swapped, POSITION, red_left_of_50) == {"correct": False, "score": pytest.approx(2 / 3)}
    no_cat = {"dog": [obj(0)]}  # cat count 0, dog count 1, no pair to judge: (0 + 1 + 0) / 3
    assert grade(no_cat, POSITION, red_left_of_50) == {"correct": False, "score": pytest.approx(1 / 3)}


def test_at_least_outside_counting_and_plain_excludes():
    single = {"tag": "single_object", "include": [{"class": "dog", "count": 1}]}
    assert grade({"dog": [obj(0), obj(30)]}, single, red_left_of_50) == {"correct": True, "score": 1.0}
    no_cat = dict(single, exclude=[{"class": "cat", "count": 1}])
    assert grade({"dog": [obj(0)], "cat": [obj(30)]}, no_cat, red_left_of_50) == {"correct": False, "score": 0.5}


def test_scorer_applies_tag_thresholds_per_image():
    def detector(images):
        assert images.dtype == np.uint8 and images.shape == (2, 16, 16, 3)
        apples = [(obj(20 * i)[0], c, None) for i, c in enumerate((0.99, 0.95, 0.93, 0.6))]
        return [{"apple": apples}, {"apple": apples}]

    single = {"tag": "single_object", "include": [{"class": "apple", "count": 4}]}
    scorer = GenEvalScorer(detector=detector, color_classifier=red_left_of_50)
    out = scorer(np.zeros((2, 16, 16, 3), np.uint8), ["three apples", "four apples"], [COUNTING, single])
    # counting keeps the three above 0.9 (exactly three: correct); single_object keeps all four above 0.3
    assert out == {"score": [1.0, 1.0], "correct": [1.0, 1.0]}
    with pytest.raises(ValueError, match="has no GenEval metadata"):
        scorer(np.zeros((1, 16, 16, 3), np.uint8), ["x"], [{}])


def test_default_stack_needs_its_environment(tmp_path):
    with pytest.raises(ValueError, match="config and checkpoint"):
        GenEvalScorer(color_classifier=red_left_of_50)
    if importlib.util.find_spec("mmdet") is None:
        with pytest.raises(ImportError, match="mmdet.*github.com/djghosh13/geneval"):
            GenEvalScorer(config=str(tmp_path / "c.py"), checkpoint=str(tmp_path / "w.pth"),
                          color_classifier=red_left_of_50)
