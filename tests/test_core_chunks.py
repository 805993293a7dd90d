import math

import pytest
import torch

from flowrl.core.chunks import (
    adaptive_chunks,
    chunk_mean,
    chunk_weights,
    fixed_chunks,
    relative_l1_change,
    sample_chunks,
    uniform_chunks,
)
from flowrl.core.losses import chunk_log_ratios, ratio_norm_log_ratio
from flowrl.sampling.kernels import gaussian_log_prob


def _logps(b: int, t: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logp_old = torch.randn(b, t, generator=g, dtype=torch.float64)
    logp = logp_old + 0.1 * torch.randn(b, t, generator=g, dtype=torch.float64)
    return logp, logp_old


def _assert_partition(ids: torch.Tensor, n: int, max_size: int) -> None:
    assert ids.dtype == torch.long and ids.shape == (n,)
    assert int(ids[0]) == 0
    assert set(torch.diff(ids).tolist()) <= {0, 1}  # consecutive ids in step order
    assert int(torch.bincount(ids).max()) <= max_size


# --- chunk ratios -----------------------------------------------------------------------------------------------

def test_one_chunk_per_step_is_the_per_step_ratio_exactly():
    logp, logp_old = _logps(3, 5)
    ids = torch.arange(15).reshape(3, 5)
    assert torch.equal(chunk_log_ratios(logp, logp_old, ids), logp - logp_old)
    assert torch.equal(chunk_mean(logp - logp_old, ids), logp - logp_old)
    assert torch.equal(uniform_chunks(5, 1), torch.arange(5))


def test_one_chunk_per_trajectory_is_the_sequence_geometric_mean():
    b, t = 4, 6
    logp, logp_old = _logps(b, t, seed=1)
    ids = torch.arange(b)[:, None].expand(b, t)  # unique across the batch
    rho = torch.exp(logp - logp_old)
    geo = rho.prod(1) ** (1.0 / t)  # sequence geometric mean of the step ratios, per trajectory
    for log_ratio in (chunk_log_ratios(logp, logp_old, ids), chunk_mean(logp - logp_old, ids)):
        torch.testing.assert_close(torch.exp(log_ratio), geo[:, None].expand(b, t))
    assert len(set(geo.tolist())) == b  # trajectories do not share a chunk
    # same as one uniform chunk of size >= T per trajectory
    same = uniform_chunks(t, t + 3)[None, :] + torch.arange(b)[:, None]
    torch.testing.assert_close(chunk_mean(logp - logp_old, same), torch.log(geo)[:, None].expand(b, t))


def test_chunk_mean_matches_a_loop_and_agrees_with_chunk_log_ratios():
    b, t = 3, 16
    logp, logp_old = _logps(b, t, seed=2)
    k = 4
    ids = fixed_chunks(t, [2, 3, 4, 7])[None, :] + k * torch.arange(b)[:, None]
    got = chunk_mean(logp - logp_old, ids)
    torch.testing.assert_close(got, chunk_log_ratios(logp, logp_old, ids), rtol=0, atol=1e-15)
    want = torch.empty_like(got)
    for c in ids.unique():
        sel = ids == c
        want[sel] = (logp - logp_old)[sel].mean()
    torch.testing.assert_close(got, want)


def test_chunk_mean_masks_units_out_of_the_mean_but_not_out_of_the_value():
    values = torch.tensor([[1.0, 2.0, 10.0, 4.0], [5.0, 6.0, 7.0, 8.0]], requires_grad=True)
    ids = torch.tensor([[0, 0, 0, 1], [2, 2, 3, 3]])
    mask = torch.tensor([[1, 1, 0, 1], [1, 1, 0, 0]])
    out = chunk_mean(values, ids, mask)
    # chunk 0 averages 1 and 2 (10 is masked) and the masked unit still receives 1.5; chunk 3 has no valid unit
    want = torch.tensor([[1.5, 1.5, 1.5, 4.0], [5.5, 5.5, 0.0, 0.0]])
    torch.testing.assert_close(out, want)
    logp_old = torch.zeros(2, 4)
    torch.testing.assert_close(chunk_log_ratios(values.detach(), logp_old, ids, mask), want)
    out.sum().backward()
    # d/dv_i sum(out) = (units in chunk) * w_i / (valid units in chunk): valid units only
    torch.testing.assert_close(values.grad, torch.tensor([[1.5, 1.5, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0]]))


def test_chunk_mean_rejects_bad_shapes_and_ids():
    v = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="chunk_ids"):
        chunk_mean(v, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="mask"):
        chunk_mean(v, torch.zeros(2, 3, dtype=torch.long), torch.ones(3))
    with pytest.raises(ValueError, match="chunk_ids"):
        chunk_mean(v, -torch.ones(2, 3, dtype=torch.long))


# --- fixed and uniform partitions -------------------------------------------------------------------------------

def test_fixed_chunks_gcpo_default_layout_from_the_high_noise_end():
    ids = fixed_chunks(16, [2, 3, 4, 7])
    assert ids.tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3]
    assert ids.dtype == torch.long
    assert torch.bincount(ids).tolist() == [2, 3, 4, 7]


def test_fixed_chunks_errors():
    with pytest.raises(ValueError, match=r"sum\(sizes\)=15 != num_steps=16"):
        fixed_chunks(16, [2, 3, 4, 6])
    with pytest.raises(ValueError, match=r"sum\(sizes\)=17 != num_steps=16"):
        fixed_chunks(16, [2, 3, 4, 8])
    with pytest.raises(ValueError, match="positive"):
        fixed_chunks(16, [0, 5, 4, 7])
    with pytest.raises(ValueError, match="positive"):
        fixed_chunks(0, [])


def test_uniform_chunks_edge_cases():
    assert uniform_chunks(10, 3).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]  # last chunk shorter
    assert uniform_chunks(8, 4).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert torch.equal(uniform_chunks(7, 1), torch.arange(7))  # per-step ratios
    assert uniform_chunks(7, 7).tolist() == [0] * 7  # one chunk: sequence-level ratio
    assert uniform_chunks(7, 100).tolist() == [0] * 7
    assert uniform_chunks(0, 3).numel() == 0
    with pytest.raises(ValueError, match="size"):
        uniform_chunks(8, 0)
    with pytest.raises(ValueError, match="num_steps"):
        uniform_chunks(-1, 2)


# --- relative L1 change ----------------------------------------------------------------------------------------

def test_relative_l1_change_hand_values():
    states = torch.tensor([[[2.0, -2.0]], [[1.0, -1.0]], [[1.0, 0.0]]])  # (n + 1, 1, 2)
    l1 = relative_l1_change(states)
    assert l1.dtype == torch.float32 and l1.shape == (2,)
    torch.testing.assert_close(l1, torch.tensor([2.0 / 4.0, 1.0 / 2.0]))
    torch.testing.assert_close(relative_l1_change(states.to(torch.bfloat16)), l1)
    with pytest.raises(ValueError, match="states"):
        relative_l1_change(torch.ones(1, 4))


# --- adaptive partition ----------------------------------------------------------------------------------------

def test_adaptive_monotone_curve_splits_at_the_midpoint():
    decay = torch.exp(-0.3 * torch.arange(16.0))  # monotone and convex: no sign change at orders 1 and 2
    assert adaptive_chunks(decay, max_size=16).tolist() == [0] * 8 + [1] * 8
    assert torch.bincount(adaptive_chunks(decay, max_size=4)).tolist() == [4, 4, 4, 4]
    rising = torch.linspace(0.0, 1.0, 9)
    assert adaptive_chunks(rising, max_size=9).tolist() == [0] * 4 + [1] * 5  # first half m // 2
    for max_size in (1, 2, 3, 5, 7):
        _assert_partition(adaptive_chunks(decay, max_size), 16, max_size)


def test_adaptive_cuts_at_the_turning_point():
    steps = torch.arange(12.0)
    peak = torch.exp(-((steps - 4) ** 2) / 8)  # rises to step 4, then falls
    assert adaptive_chunks(peak, max_size=12).tolist() == [0] * 5 + [1] * 7  # not the midpoint (6)
    valley = 1.0 - peak
    assert adaptive_chunks(valley, max_size=12).tolist() == [0] * 5 + [1] * 7
    flat_then_peak = torch.tensor([0.3, 0.3, 0.3, 0.5, 0.9, 0.4, 0.2])  # zero differences never cut
    assert adaptive_chunks(flat_then_peak, max_size=7).tolist() == [0] * 5 + [1] * 2


def test_adaptive_recursion_uses_the_next_order_differences():
    v = torch.cat([torch.zeros(1), torch.cumsum(torch.tensor([1.0, 2, 3, 2, 1, 1, 1, 1, 1]), 0)])
    # order 1: all differences > 0 -> midpoint, chunks [0..4] [5..9];
    # order 2 on [0..4]: [1, 1, -1] changes sign before step 3; on [5..9]: [0, 0, 0] -> midpoint
    assert adaptive_chunks(v, max_size=4).tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3, 3]
    assert adaptive_chunks(v, max_size=5).tolist() == [0] * 5 + [1] * 5  # nothing over max_size: no recursion


def test_adaptive_random_curves_respect_max_size_and_are_deterministic():
    g = torch.Generator().manual_seed(3)
    for n in (1, 2, 5, 16, 28):
        curve = torch.rand(n, generator=g)
        for max_size in (1, 2, 4, 6):
            ids = adaptive_chunks(curve, max_size)
            _assert_partition(ids, n, max_size)
            assert torch.equal(ids, adaptive_chunks(curve.clone(), max_size))
    with pytest.raises(ValueError, match="max_size"):
        adaptive_chunks(torch.rand(4), max_size=0)
    with pytest.raises(ValueError, match="l1_rel"):
        adaptive_chunks(torch.rand(2, 4))


# --- weighted chunk sampling -----------------------------------------------------------------------------------

def test_chunk_weights_normalise_mean_l1_per_chunk():
    l1 = torch.tensor([0.5, 0.3, 0.1, 0.1, 0.02, 0.04, 0.2, 0.2])
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    w = chunk_weights(l1, ids)
    means = torch.tensor([0.4, 0.1, 0.03, 0.2])
    torch.testing.assert_close(w, means / means.sum())
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))
    assert torch.argsort(w, descending=True).tolist() == [0, 3, 1, 2]
    # a mean, not a sum: a long chunk of small changes does not outweigh a short one of large changes
    torch.testing.assert_close(chunk_weights(torch.tensor([0.1, 0.1, 0.1, 0.3]), torch.tensor([0, 0, 0, 1])),
                               torch.tensor([0.25, 0.75]))
    decay = torch.exp(-0.2 * torch.arange(16.0))
    w = chunk_weights(decay, fixed_chunks(16, [2, 3, 4, 7]))
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))
    assert bool((torch.diff(w) < 0).all())  # a decaying curve weights the high-noise chunks most
    with pytest.raises(ValueError, match="chunk_ids"):
        chunk_weights(l1, ids[:4])


def test_sample_chunks_distinct_sorted_reproducible():
    for weights in (None, torch.tensor([0.1, 0.4, 0.2, 0.2, 0.05, 0.05])):
        draws = [sample_chunks(6, 3, torch.Generator().manual_seed(s), weights) for s in range(20)]
        for d in draws:
            assert d.dtype == torch.long and d.numel() == 3
            assert torch.equal(d, d.unique())  # distinct and ascending
            assert int(d.min()) >= 0 and int(d.max()) < 6
        again = [sample_chunks(6, 3, torch.Generator().manual_seed(s), weights) for s in range(20)]
        assert all(torch.equal(a, b) for a, b in zip(draws, again))
        assert len({tuple(d.tolist()) for d in draws}) > 1
        assert sample_chunks(6, 6, torch.Generator().manual_seed(0), weights).tolist() == list(range(6))


def test_weighted_sampling_never_picks_a_zero_weight_chunk():
    g = torch.Generator().manual_seed(0)
    weights = torch.tensor([0.5, 0.0, 0.3, 0.2])
    counts = torch.zeros(4)
    for _ in range(300):
        counts[sample_chunks(4, 2, g, weights)] += 1
    assert counts[1] == 0 and bool((counts[[0, 2, 3]] > 0).all())
    heavy = torch.tensor([0.97, 0.01, 0.01, 0.01])
    picks = torch.stack([sample_chunks(4, 1, g, heavy) for _ in range(200)])
    assert (picks == 0).float().mean() > 0.9


def test_sample_chunks_errors():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="keep"):
        sample_chunks(4, 5, g)
    with pytest.raises(ValueError, match="weights"):
        sample_chunks(4, 2, g, torch.ones(3))
    with pytest.raises(ValueError, match="keep=3"):
        sample_chunks(4, 3, g, torch.tensor([1.0, 0.0, 1.0, 0.0]))


# --- RatioNorm (GRPO-Guard) ------------------------------------------------------------------------------------

def _gaussian_step(s: float, delta: torch.Tensor, n: int, seed: int):
    # x' = mu_old + s z from the old kernel; the current kernel's mean is shifted by delta
    g = torch.Generator().manual_seed(seed)
    mean_old = torch.randn(n, delta.numel(), generator=g)
    z = torch.randn(n, delta.numel(), generator=g)
    mean = mean_old + delta
    x = mean_old + s * z
    std = torch.full((n,), s)
    logp = gaussian_log_prob(x, mean, std, "mean")
    logp_old = gaussian_log_prob(x, mean_old, std, "mean")
    return logp, logp_old, mean, mean_old, z


def test_ratio_norm_is_zero_on_policy():
    logp, _, _, mean_old, _ = _gaussian_step(0.1, torch.zeros(16), 8, seed=0)
    out = ratio_norm_log_ratio(logp, logp.clone(), mean_old, mean_old.clone(), 0.1)
    assert torch.equal(out, torch.zeros(8))


def test_ratio_norm_spread_does_not_depend_on_the_step_std():
    d, n = 64, 4096
    delta = 0.01 * torch.randn(d, generator=torch.Generator().manual_seed(7))
    # log rho = mean(z delta) / s - mean(delta^2) / (2 s^2), so RatioNorm's log rho_hat = mean(z delta):
    # std ||delta||_2 / d for every s, while the raw log-ratio's std is ||delta||_2 / (d s).
    closed = float(delta.norm()) / d
    norm_std, raw_std = [], []
    for i, s in enumerate((0.01, 0.1, 1.0)):
        logp, logp_old, mean, mean_old, z = _gaussian_step(s, delta, n, seed=10 + i)
        hat = ratio_norm_log_ratio(logp, logp_old, mean, mean_old, s)
        torch.testing.assert_close(hat, (z * delta).mean(1), rtol=0, atol=2e-6)
        raw = logp - logp_old
        torch.testing.assert_close(raw.mean(), torch.tensor(-delta.pow(2).mean().item() / (2 * s * s)),
                                   rtol=0.1, atol=3 * closed / s / math.sqrt(n))
        norm_std.append(float(hat.std()))
        raw_std.append(float(raw.std()))
    for sd in norm_std:
        assert sd == pytest.approx(closed, rel=0.05)
    assert max(norm_std) / min(norm_std) < 1.05
    for sd, s in zip(raw_std, (0.01, 0.1, 1.0)):
        assert sd * s == pytest.approx(closed, rel=0.05)
    assert raw_std[0] / raw_std[2] == pytest.approx(100, rel=0.1)
