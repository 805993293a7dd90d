"""Pref-GRPO's pairwise win-rate reward: win rates within caller-given groups, ties, judge call counts, both
presentation orders, and errors."""
import pytest
import torch

from rewards import MultiReward, build_reward


def solid(levels):
    return torch.stack([torch.full((3, 4, 4), v / 255) for v in levels])


class Recorder:
    """A judge that prefers the brighter image and records the pairs it saw (by brightness level)."""

    def __init__(self, p_first=None):
        self.calls, self.p_first = [], p_first

    def __call__(self, a, b, prompts):
        la, lb = ((x.mean(dim=(1, 2, 3)) * 255).round() for x in (a, b))
        self.calls.append(list(zip(la.tolist(), lb.tolist())))
        if self.p_first is not None:
            return torch.full((len(prompts),), self.p_first)
        return (la > lb).float() + 0.5 * (la == lb).float()


def test_win_rates_are_ranks_within_each_group():
    # group 0: levels 30 < 90 < 200 < 250; group 1: 120 = 120 > 10 (a tie counts 1/2 to each)
    levels = [200, 30, 250, 90, 120, 10, 120]
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    prompts = ["a"] * 4 + ["b"] * 3
    out = build_reward("pairwise", judge="reward:brightness")(solid(levels), prompts, groups=groups)["pairwise"]
    assert out.tolist() == pytest.approx([2 / 3, 0.0, 1.0, 1 / 3, 0.75, 0.0, 0.75])
    for g in (0, 1):  # every judgement hands out one win, so a group's rates average to exactly 1/2
        assert out[groups == g].double().mean().item() == pytest.approx(0.5, abs=1e-7)


def test_one_judge_call_with_every_pair_once():
    rec = Recorder()
    reward = build_reward("pairwise", judge=rec)
    groups = torch.tensor([3, 3, 7, 3, 7, 7, 7])  # interleaved, arbitrary ids
    reward(solid([1, 2, 3, 4, 5, 6, 7]), ["x"] * 7, groups=groups)
    assert len(rec.calls) == 1 and len(rec.calls[0]) == 3 + 6  # C(3, 2) + C(4, 2)
    assert {frozenset(p) for p in rec.calls[0]} == {frozenset(p) for p in [(1, 2), (1, 4), (2, 4), (3, 5), (3, 6),
                                                                            (3, 7), (5, 6), (5, 7), (6, 7)]}


def test_both_orders_cancel_a_position_bias():
    biased = Recorder(p_first=1.0)  # always prefers whichever image it is shown first
    x, g = solid([1, 2, 3]), torch.zeros(3, dtype=torch.long)
    one_order = build_reward("pairwise", judge=biased)(x, ["x"] * 3, groups=g)["pairwise"]
    assert one_order.tolist() == [1.0, 0.5, 0.0]  # pairs are shown as (earlier, later)
    both = build_reward("pairwise", judge=Recorder(p_first=1.0), both_orders=True)(x, ["x"] * 3, groups=g)
    assert both["pairwise"].tolist() == [0.5, 0.5, 0.5]
    fair = build_reward("pairwise", judge=Recorder(), both_orders=True)(x, ["x"] * 3, groups=g)
    assert fair["pairwise"].tolist() == [0.0, 0.5, 1.0]


def test_group_of_one_scores_a_tie():
    rec = Recorder()
    out = build_reward("pairwise", judge=rec)(solid([5, 1, 9]), ["a", "b", "b"], groups=torch.tensor([0, 1, 1]))
    assert out["pairwise"].tolist() == [0.5, 0.0, 1.0] and len(rec.calls[0]) == 1
    rec = Recorder()
    out = build_reward("pairwise", judge=rec)(solid([5, 1]), ["a", "b"], groups=torch.tensor([0, 1]))
    assert out["pairwise"].tolist() == [0.5, 0.5] and rec.calls == []  # nothing to compare: no judge call


def test_groups_are_required_and_checked():
    reward = build_reward("pairwise", judge=Recorder())
    with pytest.raises(ValueError, match="compares samples within groups: pass groups="):
        reward(solid([1, 2]), ["a", "a"])
    with pytest.raises(ValueError, match="LongTensor of shape \\(2,\\)"):
        reward(solid([1, 2]), ["a", "a"], groups=torch.tensor([0.0, 0.0]))
    with pytest.raises(ValueError, match="group 0 mixes prompts"):
        reward(solid([1, 2]), ["a", "b"], groups=torch.tensor([0, 0]))


def test_a_bad_judge_is_named():
    x, g = solid([1, 2, 3]), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="3 probabilities in \\[0, 1\\]"):
        build_reward("pairwise", judge=lambda a, b, p: torch.full((len(p),), 2.0))(x, ["x"] * 3, groups=g)
    with pytest.raises(ValueError, match="3 probabilities"):
        build_reward("pairwise", judge=lambda a, b, p: [0.5])(x, ["x"] * 3, groups=g)
    with pytest.raises(ValueError, match="unknown judge 'gpt'"):
        build_reward("pairwise", judge="gpt")
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        build_reward("pairwise", judge="reward:nope")


def test_groups_reach_the_pairwise_component_of_a_multi_reward():
    mr = MultiReward({"brightness": 1.0, "pairwise": 0.5}, {"pairwise": {"judge": "reward:brightness"}})
    assert mr.uses_groups
    out = mr(solid([10, 20, 30, 40]), ["a", "a", "b", "b"], groups=torch.tensor([0, 0, 1, 1]))
    assert out["pairwise"].tolist() == [0.0, 1.0, 0.0, 1.0]
    assert out["brightness"].tolist() == pytest.approx([v / 255 for v in (10, 20, 30, 40)])


def test_a_pointwise_judge_scores_each_image_once():
    from rewards import Reward
    from rewards.pairwise import PairwiseWinRate, ScoreJudge

    class Counting(Reward):
        name = "counting"

        def __init__(self):
            self.batches = []

        def score(self, images, prompts, metadata):
            self.batches.append(len(prompts))
            return images.mean(dim=(1, 2, 3))

    inner = Counting()
    reward = PairwiseWinRate(judge=ScoreJudge(inner))
    out = reward(solid([3, 1, 2, 9, 8]), ["a"] * 3 + ["b"] * 2, groups=torch.tensor([0, 0, 0, 1, 1]))
    assert out["pairwise"].tolist() == [1.0, 0.0, 0.5, 1.0, 0.0] and inner.batches == [5]
