"""The reward interface: input / output validation, naming convention, registry, specs, MultiReward."""
import math

import pytest
import torch

from rewards import REWARDS, MultiReward, Reward, RewardOutputError, build_reward, parse_reward_spec, register


class Const(Reward):
    """Scores each image with fixed values; ``bad`` marks samples that come back NaN."""

    name = "const"

    def __init__(self, bad=(), value=float("nan")):
        self.bad, self.value = list(bad), value

    def score(self, images, prompts, metadata):
        s = torch.arange(images.shape[0], dtype=torch.float32)
        s[self.bad] = self.value
        return s


class Multi(Reward):
    name = "multi"
    main_key = "overall"

    def score(self, images, prompts, metadata):
        m = images.mean(dim=(1, 2, 3))
        return {"overall": m, "counting": 2 * m, "colour": images.new_ones(len(prompts), dtype=torch.float64)}


def imgs(n=3, h=8, w=8):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(0))


def prompts(n=3):
    return [f"prompt {i}" for i in range(n)]


# -- outputs ------------------------------------------------------------------------------------------
def test_single_tensor_is_main_key_named_after_reward():
    out = Const()(imgs(), prompts())
    assert list(out) == ["const"]
    assert out["const"].shape == (3,) and out["const"].dtype == torch.float32


def test_multi_score_naming_and_float32():
    out = Multi()(imgs(), prompts())
    assert set(out) == {"multi", "multi/counting", "multi/colour"}
    assert all(v.dtype == torch.float32 and v.shape == (3,) for v in out.values())
    torch.testing.assert_close(out["multi/counting"], 2 * out["multi"])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_output_names_reward_key_and_indices(value):
    with pytest.raises(RewardOutputError, match=r"'const'.*\[0, 2\]") as e:
        Const(bad=[0, 2], value=value)(imgs(), prompts())
    assert (e.value.reward, e.value.key, e.value.indices) == ("const", "const", [0, 2])
    assert isinstance(e.value, ValueError)


def test_nonfinite_extra_score_names_full_key():
    class Bad(Multi):
        def score(self, images, prompts, metadata):
            out = super().score(images, prompts, metadata)
            out["counting"][1] = float("nan")
            return out

    with pytest.raises(RewardOutputError, match=r"multi/counting.*\[1\]") as e:
        Bad()(imgs(), prompts())
    assert e.value.key == "multi/counting" and e.value.indices == [1]


@pytest.mark.parametrize("raw, match", [
    (lambda n: torch.zeros(n, 1), r"shape \(3, 1\), expected \(3,\)"),
    (lambda n: torch.zeros(n + 1), r"shape \(4,\)"),
    (lambda n: torch.zeros(n, dtype=torch.long), "floating-point"),
    (lambda n: {"other": torch.zeros(n)}, "main key 'score'"),
    (lambda n: {"score": torch.zeros(n), "a/b": torch.zeros(n)}, "bad score key 'a/b'"),
    (lambda n: [0.0] * n, "Tensor or a dict"),
])
def test_malformed_output_rejected(raw, match):
    class R(Reward):
        name = "shaky"

        def score(self, images, prompts, metadata):
            return raw(len(prompts))

    with pytest.raises(RewardOutputError, match=match):
        R()(imgs(), prompts())


def test_no_grad_by_default_and_grad_when_asked():
    class Mean(Reward):
        name = "mean"

        def score(self, images, prompts, metadata):
            return images.mean(dim=(1, 2, 3))

    x = imgs().requires_grad_(True)
    r = Mean()
    assert not r(x, prompts())["mean"].requires_grad
    r.needs_grad = True
    r(x, prompts())["mean"].sum().backward()
    assert x.grad is not None


def test_metadata_defaults_to_empty_dicts():
    seen = {}

    class Peek(Reward):
        name = "peek"

        def score(self, images, prompts, metadata):
            seen["m"] = metadata
            return images.new_zeros(len(prompts))

    Peek()(imgs(2), prompts(2))
    assert seen["m"] == [{}, {}]
    Peek()(imgs(2), prompts(2), [{"a": 1}, {}])
    assert seen["m"] == [{"a": 1}, {}]


# -- inputs -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("images, match", [
    (torch.rand(3, 8, 8), r"shape \(N, 3, H, W\), got \(3, 8, 8\)"),
    (torch.rand(3, 4, 8, 8), r"shape \(N, 3, H, W\), got \(3, 4, 8, 8\)"),
    (torch.rand(3, 3, 8, 8) * 2 - 1, r"\[0, 1\]"),
    (torch.rand(3, 3, 8, 8) * 255, r"\[0, 1\]"),
    (torch.full((3, 3, 8, 8), float("nan")), "NaN"),
    (torch.zeros(3, 3, 8, 8, dtype=torch.uint8), "floating point"),
    (torch.rand(0, 3, 8, 8), "empty"),
])
def test_bad_images_rejected(images, match):
    with pytest.raises(ValueError, match=f"reward 'const'.*{match}"):
        Const(bad=[])(images, prompts(3))


def test_tiny_range_excursion_allowed():
    x = imgs()
    x[0, 0, 0, 0], x[0, 0, 0, 1] = -1e-4, 1 + 1e-4
    Const(bad=[])(x, prompts())


@pytest.mark.parametrize("ps, md, match", [
    (["a", "b"], None, "got 2 prompts for 3 images"),
    ("abc", None, "list of str"),
    (["a", "b", 3], None, r"indices \[2\]"),
    (["a", "b", "c"], [{}], "got 1 metadata entries for 3 images"),
    (["a", "b", "c"], [{}, {}, "x"], "dict"),
    (["a", "b", "c"], {"a": 1}, "list of dicts"),
])
def test_bad_prompts_or_metadata_rejected(ps, md, match):
    with pytest.raises(ValueError, match=f"reward 'const'.*{match}"):
        Const(bad=[])(imgs(), ps, md)


# -- registry -----------------------------------------------------------------------------------------
def test_unknown_reward_lists_known():
    with pytest.raises(ValueError, match=r"unknown reward 'pixscore'.*brightness"):
        build_reward("pixscore")


def test_bad_kwargs_name_reward_and_argument():
    with pytest.raises(ValueError, match=r"reward 'brightness'.*'targte'"):
        build_reward("brightness", targte=0.5)
    with pytest.raises(ValueError, match=r"reward 'brightness'.*target"):
        build_reward("brightness", target=2.0)


def test_register_rejects_conflicts_and_bad_names():
    @register("test_tmp_reward")
    class A(Reward):
        def score(self, images, prompts, metadata):
            return images.new_zeros(len(prompts))

    try:
        assert REWARDS["test_tmp_reward"] is A and A.name == "test_tmp_reward"
        assert list(build_reward("test_tmp_reward")(imgs(), prompts())) == ["test_tmp_reward"]
        with pytest.raises(ValueError, match="already registered"):
            register("test_tmp_reward")(Multi)
    finally:
        del REWARDS["test_tmp_reward"]
    for bad in ["a/b", "a:b", "a,b", "", " a"]:
        with pytest.raises(ValueError, match="bad reward name"):
            register(bad)
    with pytest.raises(TypeError):
        register("not_a_reward")(object)


# -- specs --------------------------------------------------------------------------------------------
def test_spec_forms():
    want = {"jpeg_compressibility": 1.0, "brightness": 0.5}
    assert parse_reward_spec("jpeg_compressibility:1.0, brightness:0.5") == want
    assert parse_reward_spec(["jpeg_compressibility", "brightness:0.5"]) == want
    assert parse_reward_spec({"jpeg_compressibility": 1, "brightness": 0.5}) == want
    assert parse_reward_spec("color") == {"color": 1.0}
    assert parse_reward_spec("color:-2,brightness:0") == {"color": -2.0, "brightness": 0.0}


@pytest.mark.parametrize("spec, match", [
    ("brightness,brightness:2", "appears twice"),
    (["color", "color"], "appears twice"),
    ("brightness:abc", r"'brightness'.*number"),
    ("brightness:nan", r"'brightness'.*finite"),
    ({"brightness": math.inf}, r"'brightness'.*finite"),
    ({"brightness": True}, r"'brightness'.*number"),
    ({"brightness": None}, r"'brightness'.*number"),
    ("brightness,nope:1", "unknown reward 'nope'"),
    ("brightness,,color", "bad reward spec entry"),
    ("", "bad reward spec entry"),
    ([], "empty"),
    (3, "str, list or dict"),
])
def test_spec_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_reward_spec(spec)


# -- MultiReward --------------------------------------------------------------------------------------
def test_multireward_keeps_components_apart():
    mr = MultiReward("brightness:2,color:0.5,jpeg_compressibility:0",
                     {"color": {"rgb": (0.0, 0.0, 1.0)}})
    assert mr.weights == {"brightness": 2.0, "color": 0.5, "jpeg_compressibility": 0.0}
    x = imgs(4)
    scores = mr(x, prompts(4))
    assert set(scores) == set(mr.weights)
    for name in mr.names:
        torch.testing.assert_close(scores[name], build_reward(name, **({"rgb": (0, 0, 1)} if name == "color" else {})
                                                              )(x, prompts(4))[name])
    torch.testing.assert_close(mr.weighted_sum(scores), 2 * scores["brightness"] + 0.5 * scores["color"])
    mr.weights["brightness"] = 99.0  # a copy: cannot change the spec behind the trainer's back
    assert mr.weights["brightness"] == 2.0


def test_multireward_extras_and_main_scores():
    @register("test_tmp_multi")
    class M(Multi):
        pass

    try:
        mr = MultiReward({"test_tmp_multi": 1.0, "brightness": 1.0})
        scores = mr(imgs(), prompts())
        assert set(scores) == {"test_tmp_multi", "test_tmp_multi/counting", "test_tmp_multi/colour", "brightness"}
        assert set(mr.main_scores(scores)) == {"test_tmp_multi", "brightness"}
        with pytest.raises(ValueError, match="lack reward component"):
            mr.main_scores({"brightness": scores["brightness"]})
    finally:
        del REWARDS["test_tmp_multi"]


def test_multireward_bad_kwargs():
    with pytest.raises(ValueError, match=r"kwargs given for \['color'\]"):
        MultiReward("brightness", {"color": {"rgb": (0, 0, 1)}})
    with pytest.raises(ValueError, match=r"reward 'color'.*'colour'"):
        MultiReward("color", {"color": {"colour": "red"}})
