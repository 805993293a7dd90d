import json
import math

import pytest
import torch

from flowrl.core import PerPromptStatTracker, group_advantages, group_ids

EPS = 1e-4


@pytest.mark.parametrize("std", ["group", "global"])
def test_fresh_tracker_equals_group_advantages(std):
    gen = torch.Generator().manual_seed(0)
    keys = [f"prompt {i % 5}" for i in range(20)] + ["lonely", "same", "same"]
    rewards = torch.cat([torch.randn(20, generator=gen), torch.tensor([3.0, 0.7, 0.7])])
    tracker = PerPromptStatTracker(std=std, clip=5.0)
    got = tracker.update(keys, rewards)
    torch.testing.assert_close(got, group_advantages(rewards, group_ids(keys), std=std))
    assert torch.equal(got[-3:], torch.zeros(3))
    assert tracker.stats()["num_zero_variance"] == 2


def test_history_accumulates_and_is_capped():
    t = PerPromptStatTracker()
    torch.testing.assert_close(t.update(["a", "a"], torch.tensor([1.0, 3.0])),
                               torch.tensor([-1 / (1 + EPS), 1 / (1 + EPS)]))
    # history [1, 3, 5]: mean 3, population std sqrt(8/3)
    torch.testing.assert_close(t.update(["a"], torch.tensor([5.0])), torch.tensor([2 / (math.sqrt(8 / 3) + EPS)]))
    capped = PerPromptStatTracker(max_history=2)
    capped.update(["a", "a"], torch.tensor([1.0, 3.0]))
    # history [3, 5]: mean 4, std 1
    torch.testing.assert_close(capped.update(["a"], torch.tensor([5.0])), torch.tensor([1 / (1 + EPS)]))
    assert capped.stats()["mean_group_size"] == 2


def test_global_std_uses_current_batch():
    t = PerPromptStatTracker(std="global")
    r = torch.tensor([0.0, 2.0, 10.0, 10.0])
    adv = t.update(["a", "a", "b", "b"], r)
    gs = r.double().std(unbiased=False).item()
    torch.testing.assert_close(adv, torch.tensor([-1 / (gs + EPS), 1 / (gs + EPS), 0.0, 0.0]))


def test_stats_and_clear():
    t = PerPromptStatTracker()
    t.update(["a", "a", "b", "b", "b", "c"], torch.tensor([1.0, 2.0, 3.0, 3.0, 3.0, 4.0]))
    assert t.stats() == {"num_prompts": 3, "mean_group_size": 2.0, "num_zero_variance": 2, "seen_prompts": 3}
    t.clear()
    t.update(["d", "d"], torch.tensor([1.0, 2.0]))
    assert t.stats() == {"num_prompts": 1, "mean_group_size": 2.0, "num_zero_variance": 0, "seen_prompts": 4}


def test_resume_through_json_is_exact():
    keys = ["p0", ("p1", 3), 7, ("p1", 3), "p0", 7, ("p1", 3)]

    def step(tracker, i):
        return tracker.update(keys, torch.randn(len(keys), generator=torch.Generator().manual_seed(i)))

    a = PerPromptStatTracker(std="group", max_history=5)
    for i in range(3):
        step(a, i)
    state = json.loads(json.dumps(a.state_dict()))
    b = PerPromptStatTracker(std="group", max_history=5)
    b.load_state_dict(state)
    assert b.state_dict() == a.state_dict()
    for i in range(3, 5):
        assert torch.equal(step(a, i), step(b, i))
    assert a.stats() == b.stats()
    # a tracker that did not resume gives different advantages (the history matters)
    fresh = PerPromptStatTracker(std="group", max_history=5)
    assert not torch.equal(step(fresh, 5), step(a, 5))


def test_errors():
    t = PerPromptStatTracker()
    with pytest.raises(ValueError, match=r"indices \[1\]"):
        t.update(["a", "a"], torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="one key each"):
        t.update(["a"], torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="std"):
        PerPromptStatTracker(std="none")
    other = PerPromptStatTracker(max_history=3)
    with pytest.raises(ValueError, match="max_history"):
        other.load_state_dict(t.state_dict())
