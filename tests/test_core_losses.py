import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from flowrl.core import (
    AGGREGATION_WEIGHTS,
    KL_FORMS,
    POLICY_LOSSES,
    aggregate,
    chunk_log_ratios,
    chunk_ratios,
    clipped_surrogate,
    clipped_surrogate_from_log_ratio,
    kl_estimator,
    kl_gaussian_mean,
    ratio_norm_log_ratio,
)


def test_clipped_surrogate_hand_values_and_gradients():
    eps = 0.2
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0])
    rho = torch.tensor([1.1, 1.5, 0.5, 0.5, 1.5, 0.9])
    logp_old = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.5, -0.7], dtype=torch.float64)
    logp = (logp_old + rho.double().log()).requires_grad_()
    loss, stats = clipped_surrogate(logp, logp_old, adv, eps)
    # A > 0: min objective caps the gain at 1 + eps; A < 0: caps it at 1 - eps.
    want = torch.tensor([-1.1, -1.2, -0.5, 0.8, 1.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(loss, want)
    loss.sum().backward()
    clipped = torch.tensor([False, True, False, True, False, False])
    assert torch.equal(logp.grad[clipped], torch.zeros(2, dtype=torch.float64))
    # d(-A rho)/dlogp = -A rho where the unclipped branch is active
    torch.testing.assert_close(logp.grad[~clipped], (-adv * rho).double()[~clipped])
    torch.testing.assert_close(stats["clip_frac"], torch.tensor(2 / 6, dtype=torch.float64))
    torch.testing.assert_close(stats["approx_kl"], 0.5 * rho.double().log().pow(2).mean())
    torch.testing.assert_close(stats["ratio_min"], torch.tensor(0.5, dtype=torch.float64))
    torch.testing.assert_close(stats["ratio_max"], torch.tensor(1.5, dtype=torch.float64))
    assert not stats["ratio_mean"].requires_grad


def test_asymmetric_clip_and_per_sequence_advantages():
    # DAPO clip-higher: eps_low 0.2, eps_high 0.28; adv (B,) broadcast over tokens (B, T)
    log_ratio = torch.tensor([[math.log(1.25), math.log(1.3)], [math.log(0.75), math.log(0.85)]])
    adv = torch.tensor([1.0, -1.0])
    loss, _ = clipped_surrogate_from_log_ratio(log_ratio, adv, 0.2, 0.28)
    torch.testing.assert_close(loss, torch.tensor([[-1.25, -1.28], [0.8, 0.85]]))
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    _, stats = clipped_surrogate_from_log_ratio(log_ratio, adv, 0.2, 0.28, mask=mask)
    torch.testing.assert_close(stats["clip_frac"], torch.tensor(1 / 3))  # the masked clip doesn't count
    torch.testing.assert_close(stats["ratio_max"], torch.tensor(1.25))
    with pytest.raises(ValueError, match="adv shape"):
        clipped_surrogate_from_log_ratio(log_ratio, torch.ones(3), 0.2)


def test_first_step_ratio_is_one_and_flow_clip():
    logp = torch.randn(8, dtype=torch.float64)
    adv = torch.randn(8, dtype=torch.float64)
    loss, stats = clipped_surrogate(logp, logp.clone(), adv, 1e-4)
    torch.testing.assert_close(loss, -adv)
    assert stats["clip_frac"] == 0 and stats["approx_kl"] == 0


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_kl_gaussian_mean_matches_torch(reduction):
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64)
    mu_ref = mu + 0.3 * torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64)
    std = torch.tensor([0.1, 0.5, 1.0, 2.0], dtype=torch.float64)
    s = std.view(4, 1, 1, 1).expand_as(mu)
    ref = kl_divergence(Normal(mu, s), Normal(mu_ref, s)).flatten(1)
    ref = ref.mean(1) if reduction == "mean" else ref.sum(1)
    torch.testing.assert_close(kl_gaussian_mean(mu, mu_ref, std, reduction), ref)
    # scalar std broadcasts the same way
    torch.testing.assert_close(kl_gaussian_mean(mu, mu_ref, 0.5, reduction),
                               kl_gaussian_mean(mu, mu_ref, torch.full((4,), 0.5, dtype=torch.float64), reduction))
    with pytest.raises(ValueError, match="std"):
        kl_gaussian_mean(mu, mu_ref, torch.ones(3))


def test_kl_estimators_properties_and_monte_carlo():
    p, q = Normal(0.0, 1.0), Normal(0.3, 1.2)
    x = torch.randn(400_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # samples of p
    logp, logp_ref = p.log_prob(x), q.log_prob(x)
    true_kl = float(kl_divergence(p, q))
    k1, k2, k3 = (kl_estimator(logp, logp_ref, k) for k in ("k1", "k2", "k3"))
    assert (k3 >= 0).all() and (k2 >= 0).all() and (k1 < 0).any()
    assert abs(float(k1.mean()) - true_kl) < 3e-3
    assert abs(float(k3.mean()) - true_kl) < 3e-3
    assert abs(float(k2.mean()) - true_kl) < 0.25 * true_kl  # biased, but close for nearby policies
    same = torch.randn(5)
    for kind in ("k1", "k2", "k3"):
        assert torch.equal(kl_estimator(same, same, kind), torch.zeros(5))
    with pytest.raises(ValueError, match="k4"):
        kl_estimator(same, same, "k4")


def test_chunk_ratios():
    logp_old = torch.randn(6, dtype=torch.float64)
    logp = logp_old + torch.tensor([0.1, 0.3, -0.2, 0.05, 0.0, 0.4], dtype=torch.float64)
    # one chunk per unit is the per-unit ratio, exactly
    assert torch.equal(chunk_ratios(logp, logp_old, torch.arange(6)), torch.exp(logp - logp_old))
    got = chunk_ratios(logp, logp_old, torch.tensor([0, 0, 1, 2, 2, 2]))
    want = torch.exp(torch.tensor([0.2, 0.2, -0.2, 0.15, 0.15, 0.15], dtype=torch.float64))
    torch.testing.assert_close(got, want)


def test_sequence_ratio_gspo_with_mask_and_gradient():
    lr = torch.tensor([[0.2, 0.4, 9.0], [0.1, -0.3, 0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    logp = lr.clone().requires_grad_()
    seq = torch.arange(2)[:, None].expand(2, 3)
    out = chunk_log_ratios(logp, torch.zeros(2, 3), seq, mask)
    torch.testing.assert_close(out, torch.tensor([[0.3] * 3, [0.1] * 3]))
    out[0, 0].backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="one shape"):
        chunk_log_ratios(lr, lr, torch.zeros(2, dtype=torch.long))


def test_ratio_norm_log_ratio():
    logp, logp_old = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -2.0])
    mean_old = torch.zeros(2, 4)
    mean = torch.tensor([[0.1, 0.1, 0.1, 0.1], [0.0, 0.0, 0.0, 0.2]])
    s = torch.tensor([0.5, 0.1])
    # mean((mu - mu_old)^2): 0.01 and 0.01; shift = 0.01 / (2 s^2) = 0.02 and 0.5
    want = torch.tensor([0.5 * (0.5 + 0.02), 0.1 * (0.0 + 0.5)])
    torch.testing.assert_close(ratio_norm_log_ratio(logp, logp_old, mean, mean_old, s), want)
    torch.testing.assert_close(ratio_norm_log_ratio(logp, logp_old, mean_old, mean_old, s), s * (logp - logp_old))


def _llm_batch(seed=0, b=12, t=7):
    gen = torch.Generator().manual_seed(seed)
    loss = torch.randn(b, t, generator=gen, dtype=torch.float64)
    lengths = torch.randint(0, t + 1, (b,), generator=gen)
    lengths[3] = 0  # a sequence with no valid token
    mask = (torch.arange(t)[None] < lengths[:, None]).double()
    return loss, mask


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_aggregate_invariant_to_sharding_and_micro_batching(mode):
    loss, mask = _llm_batch()
    norm_len = 7
    whole = aggregate(loss, mask, mode, norm_len=norm_len)
    g_tok, g_seq = mask.sum(), (mask.sum(-1) > 0).sum()
    # 2 processes x uneven micro-batches, each trimmed to its own padded width
    shards = [list(range(0, 12, 2)), list(range(1, 12, 2))]
    parts, local_parts = [], []
    for shard in shards:
        for mb in (shard[:1], shard[1:4], shard[4:]):
            width = int(mask[mb].sum(-1).max().clamp(min=1))
            lo, m = loss[mb, :width], mask[mb, :width]
            parts.append(aggregate(lo, m, mode, global_tokens=g_tok, global_seqs=g_seq, norm_len=norm_len))
            local_parts.append(aggregate(lo, m, mode, norm_len=norm_len))
    torch.testing.assert_close(sum(parts), whole, rtol=1e-12, atol=1e-12)
    # local denominators (what a naive per-micro-batch mean does) give a different gradient scale
    assert not torch.allclose(sum(local_parts), whole)


def test_aggregate_hand_values_and_errors():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert aggregate(loss, mask, "token-mean") == 10 / 4
    assert aggregate(loss, mask, "seq-mean-token-mean") == (2 + 4) / 2
    assert aggregate(loss, mask, "seq-mean-token-sum-norm", norm_len=4) == (6 / 4 + 4 / 4) / 2
    assert aggregate(torch.tensor([1.0, 3.0]), global_tokens=4) == 1.0  # image steps: (N,) units
    assert aggregate(loss, torch.zeros(2, 3), "token-mean") == 0  # empty mask: 0, not NaN
    with pytest.raises(ValueError, match="norm_len"):
        aggregate(loss, mask, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match=r"\(seqs, tokens\)"):
        aggregate(torch.ones(3), None, "seq-mean-token-mean")
    with pytest.raises(ValueError, match="mode"):
        aggregate(loss, mask, "sum")


def _steps(n=6, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    std = torch.rand(n, generator=g) * 0.5 + 0.05
    mean_old = torch.randn(n, d, generator=g)
    mean = mean_old + 0.01 * torch.randn(n, d, generator=g)
    x = mean_old + std[:, None] * torch.randn(n, d, generator=g)
    lp = lambda m: (-(x - m).pow(2) / (2 * std[:, None] ** 2) - std[:, None].log()  # noqa: E731
                    - 0.5 * math.log(2 * math.pi)).mean(1)
    return lp(mean), lp(mean_old), mean, mean_old, std, torch.randn(n, generator=g)


def test_policy_losses_share_one_signature():
    """Every registered policy loss takes the same keyword call; clip is the PPO clip (per step or per chunk),
    ratio_norm is the clip on GRPO-Guard's normalised log-ratio."""
    logp, logp_old, mean, mean_old, std, adv = _steps()
    chunks = torch.tensor([0, 0, 1, 1, 1, 2])
    for chunk_ids in (None, chunks):
        kw = dict(eps_low=1e-3, eps_high=2e-3, chunk_ids=chunk_ids, mean=mean, mean_old=mean_old, std=std,
                  seq_ids=torch.tensor([0, 0, 0, 1, 1, 1]))
        out = {name: fn(logp, logp_old, adv, **kw) for name, fn in POLICY_LOSSES.items()}
        assert set(out) >= {"clip", "ratio_norm"}
        want, _ = clipped_surrogate(logp, logp_old, adv, 1e-3, 2e-3, chunk_ids=chunk_ids)
        torch.testing.assert_close(out["clip"][0], want)
        lr = ratio_norm_log_ratio(logp, logp_old, mean, mean_old, std)
        if chunk_ids is not None:
            lr = chunk_log_ratios(lr, torch.zeros_like(lr), chunk_ids)
        torch.testing.assert_close(out["ratio_norm"][0], clipped_surrogate_from_log_ratio(lr, adv, 1e-3, 2e-3)[0])
    assert POLICY_LOSSES["ratio_norm"].requires == ("mean",) and POLICY_LOSSES["clip"].requires == ()
    with pytest.raises(ValueError, match="mean_old"):
        POLICY_LOSSES["ratio_norm"](logp, logp_old, adv, eps_low=1e-3)


def test_kl_forms_closed_forms():
    """gaussian: the closed-form KL of the two step Gaussians per element; flow_grpo: the same over g^2 = s^2 / h,
    i.e. h times it; k1 / k2 / k3: Schulman's estimators of the unit log-probs."""
    logp, logp_ref, mean, mean_ref, std, _ = _steps(seed=1)
    h = torch.rand(len(std)) * 0.3 + 0.01
    kw = dict(logp=logp, logp_ref=logp_ref, mean=mean, mean_ref=mean_ref, std=std, h=h)
    per_elem = kl_divergence(Normal(mean, std[:, None]), Normal(mean_ref, std[:, None])).mean(1)
    torch.testing.assert_close(KL_FORMS["gaussian"](**kw), per_elem)
    torch.testing.assert_close(KL_FORMS["flow_grpo"](**kw), per_elem * h)
    for kind in ("k1", "k2", "k3"):
        torch.testing.assert_close(KL_FORMS[kind](**kw), kl_estimator(logp, logp_ref, kind))


@pytest.mark.parametrize("mode", sorted(AGGREGATION_WEIGHTS))
def test_aggregation_weights_equal_aggregate(mode):
    """Per-unit weights over an update's flat units reproduce ``aggregate`` on the (seqs, tokens) layout, and
    split over micro-batches they add up to it."""
    lengths = [3, 1, 4, 2]
    loss2d = torch.randn(4, 4, dtype=torch.float64)
    mask = torch.tensor([[1.0] * n + [0.0] * (4 - n) for n in lengths], dtype=torch.float64)
    want = aggregate(loss2d, mask, mode, norm_len=5 if mode.endswith("norm") else None)
    seq = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    flat = torch.cat([loss2d[i, :n] for i, n in enumerate(lengths)])
    w, denom = AGGREGATION_WEIGHTS[mode](seq, 5)
    torch.testing.assert_close((flat * w).sum() / denom, want)
    parts = torch.tensor_split(torch.randperm(len(flat)), 3)
    torch.testing.assert_close(sum((flat[p] * w[p]).sum() / denom for p in parts), want)
