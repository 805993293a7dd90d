import math

import pytest
import torch

from flowrl.core import (
    ADVANTAGE_ESTIMATORS,
    batch_std,
    combine_rewards,
    get_advantage_estimator,
    group_advantages,
    group_ids,
    group_stats,
    pairwise_win_rates,
    preference_matrix,
)

MODES = ("group", "global", "none")
EPS = 1e-4


def _mixed_batch(seed=0, num_prompts=15):
    """Float32 rewards of prompts with group sizes 1..9, interleaved in a shuffled order."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 10, (num_prompts,), generator=gen).tolist()
    keys = [p for p, n in enumerate(sizes) for _ in range(n)]
    perm = torch.randperm(len(keys), generator=gen).tolist()
    keys = [keys[i] for i in perm]
    rewards = (torch.randn(len(keys), generator=gen) * 3.7 + 1.3).float()
    return keys, rewards


def _group_sums(adv, groups):
    return torch.zeros(int(groups.max()) + 1, dtype=torch.float64).index_add(0, groups, adv.double())


def test_group_ids_first_appearance_order():
    ids = group_ids(["b", "a", "b", ("p", 1), ("p", 1), ("p", 2), "a"])
    assert ids.dtype == torch.long
    assert ids.tolist() == [0, 1, 0, 2, 2, 3, 1]
    assert group_ids([]).tolist() == []


def test_hand_values_population_std():
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 14.0])
    g = torch.tensor([0, 0, 0, 1, 1])
    s0 = math.sqrt(2 / 3)  # population std of 1, 2, 3 (the unbiased one would be 1.0)
    want = torch.tensor([-1 / (s0 + EPS), 0.0, 1 / (s0 + EPS), -2 / (2 + EPS), 2 / (2 + EPS)])
    torch.testing.assert_close(group_advantages(r, g), want)
    gs = r.double().std(unbiased=False).item()
    want_global = torch.tensor([-1.0, 0.0, 1.0, -2.0, 2.0]) / (gs + EPS)
    torch.testing.assert_close(group_advantages(r, g, std="global"), want_global)
    torch.testing.assert_close(group_advantages(r, g, std="none"), torch.tensor([-1.0, 0.0, 1.0, -2.0, 2.0]))


@pytest.mark.parametrize("std", MODES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_sums_are_zero(std, seed):
    keys, r = _mixed_batch(seed)
    g = group_ids(keys)
    adv = group_advantages(r, g, std=std, clip=None)
    assert torch.isfinite(adv).all()
    assert _group_sums(adv, g).abs().max() < 1e-5
    singles = torch.bincount(g)[g] == 1
    assert singles.any() and torch.equal(adv[singles], torch.zeros(int(singles.sum())))
    assert (adv[~singles] != 0).any()


@pytest.mark.parametrize("std", MODES)
@pytest.mark.parametrize("zero_variance", ["zero", "keep"])
def test_identical_group_is_exactly_zero(std, zero_variance):
    # 0.1 and 1234.567 are not exact in binary: a naive mean would leave ulp-sized deviations.
    r = torch.tensor([0.1, 0.1, 0.1, 1234.567, 1234.567, 1.0, 2.0, 7.0])
    g = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3])
    adv = group_advantages(r, g, std=std, zero_variance=zero_variance)
    assert torch.equal(adv[:5], torch.zeros(5)) and adv[7] == 0
    assert (adv[5:7] != 0).all()


@pytest.mark.parametrize("std", MODES)
def test_all_identical_batch_gives_zero_not_nan(std):
    r = torch.full((6,), 0.3)
    adv = group_advantages(r, torch.tensor([0, 0, 0, 1, 1, 1]), std=std)
    assert torch.equal(adv, torch.zeros(6))
    assert float(batch_std(r)) == 0.0


def test_global_std_zero_with_spread_raises():
    with pytest.raises(ValueError, match="global_std"):
        group_advantages(torch.tensor([1.0, 2.0]), torch.tensor([0, 0]), std="global", global_std=0.0)
    with pytest.raises(ValueError, match="only used with std='global'"):
        group_advantages(torch.tensor([1.0, 2.0]), torch.tensor([0, 0]), std="group", global_std=1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("std", MODES)
def test_sharding_by_prompt_is_bitwise_identical(std, dtype):
    keys, r = _mixed_batch(seed=3, num_prompts=24)
    r = r.to(dtype) + 1e-9 * torch.arange(len(keys), dtype=dtype)  # use float64's low bits
    whole = group_advantages(r, group_ids(keys), std=std)
    # Three "processes" hold disjoint sets of prompts (whole groups, internal order kept).
    gen = torch.Generator().manual_seed(7)
    owner = torch.randint(0, 3, (24,), generator=gen)
    shards = [[i for i, k in enumerate(keys) if owner[k] == p] for p in (2, 0, 1)]
    # The all-gather pattern: concatenate shards (in any order) and take its std.
    gathered = torch.cat([r[idx] for idx in shards])
    gstd = batch_std(gathered) if std == "global" else None
    assert std != "global" or torch.equal(gstd, batch_std(r))  # gather order does not matter
    out = torch.empty_like(r)
    for idx in shards:
        out[idx] = group_advantages(r[idx], group_ids([keys[i] for i in idx]), std=std, global_std=gstd)
    assert torch.equal(out, whole)
    # Permuting whole groups (prompts in reverse order) also keeps every bit.
    order = sorted(range(len(keys)), key=lambda i: -keys[i])
    permuted = group_advantages(r[order], group_ids([keys[i] for i in order]), std=std)
    assert torch.equal(permuted, whole[order])


def test_group_stats_values():
    r = torch.tensor([1.0, 3.0, 5.0, 5.0, 2.0])
    s = group_stats(r, torch.tensor([0, 0, 1, 1, 2]))
    torch.testing.assert_close(s.mean, torch.tensor([2.0, 5.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(s.std, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    assert s.count.tolist() == [2, 2, 1]
    assert s.zero_variance.tolist() == [False, True, True] and s.num_zero_variance == 2


def test_clip_bounds_outliers():
    r = torch.tensor([0.0, 0.0, 0.0, 100.0])
    g = torch.zeros(4, dtype=torch.long)
    assert group_advantages(r, g, std="none").max() == 5.0
    assert group_advantages(r, g, std="none", clip=None).max() == 75.0


def test_nan_reward_raises_with_indices():
    r = torch.tensor([1.0, float("nan"), 2.0, float("inf")])
    with pytest.raises(ValueError, match=r"indices \[1, 3\]"):
        group_advantages(r, torch.zeros(4, dtype=torch.long))


def test_combine_rewards_hand_numbers():
    g = torch.tensor([0, 0, 1, 1])
    comps = {"a": torch.tensor([1.0, 0.0, 1.0, 1.0]), "b": torch.tensor([0.0, 2.0, 3.0, 1.0])}
    w = {"a": 1.0, "b": 0.5}
    # sum first: totals [1, 1, 2.5, 1.5] -> group 0 has no spread, group 1 is +-0.5 with std 0.5
    k = 0.5 / (0.5 + EPS)
    torch.testing.assert_close(combine_rewards(comps, w, g), torch.tensor([0.0, 0.0, k, -k]))
    # normalise first: a -> [k, -k, 0, 0]; b -> +-1/(1 + eps) in both groups
    kb = 1 / (1 + EPS)
    want = torch.tensor([k - 0.5 * kb, -k + 0.5 * kb, 0.5 * kb, -0.5 * kb])
    torch.testing.assert_close(combine_rewards(comps, w, g, mode="normalize_then_sum"), want)
    # kwargs reach group_advantages
    torch.testing.assert_close(combine_rewards(comps, w, g, std="none"), torch.tensor([0.0, 0.0, 0.5, -0.5]))
    gstd = {"a": 2.0, "b": 4.0}
    got = combine_rewards(comps, w, g, mode="normalize_then_sum", std="global", global_std=gstd)
    want = torch.tensor([0.5 / (2 + EPS) - 0.5 / (4 + EPS), -0.5 / (2 + EPS) + 0.5 / (4 + EPS),
                         0.5 / (4 + EPS), -0.5 / (4 + EPS)])
    torch.testing.assert_close(got, want)


def test_combine_rewards_errors_name_the_key():
    g = torch.tensor([0, 0])
    comps = {"pickscore": torch.tensor([1.0, 2.0]), "ocr": torch.tensor([0.0, 1.0])}
    with pytest.raises(ValueError, match="ocr"):
        combine_rewards(comps, {"pickscore": 1.0}, g)
    with pytest.raises(ValueError, match="hps"):
        combine_rewards(comps, {"pickscore": 1.0, "ocr": 1.0, "hps": 1.0}, g)
    bad = dict(comps, ocr=torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match=r"'ocr'.*\[1\]"):
        combine_rewards(bad, {"pickscore": 1.0, "ocr": 1.0}, g, mode="normalize_then_sum")
    with pytest.raises(ValueError, match="mode"):
        combine_rewards(comps, {"pickscore": 1.0, "ocr": 1.0}, g, mode="average")
    with pytest.raises(ValueError, match="global_std"):
        combine_rewards(comps, {"pickscore": 1.0, "ocr": 1.0}, g, mode="normalize_then_sum",
                        std="global", global_std=1.0)


def test_pairwise_win_rates_hand():
    # judge calls for pairs (0,1), (0,2), (1,2): 0 beats 1, 0 ties 2, 1 beats 2 with prob 1/4
    p = preference_matrix(torch.tensor([0, 0, 1]), torch.tensor([1, 2, 2]), torch.tensor([1.0, 0.5, 0.25]), 3)
    torch.testing.assert_close(p[1, 0], torch.tensor(0.0, dtype=torch.float64))
    win = pairwise_win_rates(p)
    torch.testing.assert_close(win, torch.tensor([0.75, 0.125, 0.625], dtype=torch.float64))
    # batched over groups, and each group's win rates sum to G / 2
    batch = pairwise_win_rates(torch.stack([p, 1 - p.T]))
    assert batch.shape == (2, 3)
    torch.testing.assert_close(batch.sum(-1), torch.full((2,), 1.5, dtype=torch.float64))


def test_pairwise_errors():
    with pytest.raises(ValueError, match=r"missing.*\(1, 2\)"):
        preference_matrix(torch.tensor([0, 0]), torch.tensor([1, 2]), torch.tensor([1.0, 0.5]), 3)
    with pytest.raises(ValueError, match="twice"):
        preference_matrix(torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([1.0, 0.5]), 2)
    with pytest.raises(ValueError, match="complementary"):
        pairwise_win_rates(torch.tensor([[0.5, 0.9], [0.9, 0.5]]))
    with pytest.raises(ValueError, match="G >= 2"):
        pairwise_win_rates(torch.tensor([[0.5]]))


def test_registry():
    r = torch.tensor([0.0, 0.0, 0.0, 100.0, 1.0, 2.0])
    g = torch.tensor([0, 0, 0, 0, 1, 1])
    assert set(ADVANTAGE_ESTIMATORS) >= {"grpo", "flow_grpo", "dr_grpo"}
    torch.testing.assert_close(get_advantage_estimator("grpo")(r, g), group_advantages(r, g, std="group"))
    torch.testing.assert_close(get_advantage_estimator("flow_grpo")(r, g), group_advantages(r, g, std="global"))
    assert get_advantage_estimator("dr_grpo")(r, g)[3] == 75.0  # no std, no clip
    with pytest.raises(ValueError, match="known"):
        get_advantage_estimator("ppo")
