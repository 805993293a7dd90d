"""The GRPO family's policy gradient against the exact gradient of the expected reward (flowrl.train.exact_gradient).

On the Gaussian flow bed the trainer's own rollout, advantage, unit and loss code gives one iteration's gradient;
its mean over independent iterations must equal 1/D * 1/K * (G - 1)/G * grad J. Copies of the Flow-GRPO kernel
broken on purpose (a sign error, a missing drift term, a wrong std in the log-prob) must fail the same check.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import pytest
import torch

from flowrl.sampling.kernels import Kernel, flow_grpo_sigma, flow_sde_mean_std
from flowrl.train.exact_gradient import (
    bed_config,
    bed_policy,
    bed_targets,
    exact_gradient,
    iteration_gradient,
    mean_gradient,
    predicted_factor,
)

ITERATIONS = 400
DIM = 4
rollout_module = importlib.import_module("flowrl.sampling.rollout")


def _ratio(cfg, kernel=None, trained_steps=10):
    """The mean gradient projected on the predicted one, as a ratio (1: unbiased), its standard error and the
    per-coordinate z-scores against the prediction."""
    policy, targets = bed_policy(dim=DIM), bed_targets(dim=DIM)
    pred = (predicted_factor(cfg, DIM, trained_steps) * exact_gradient(policy, cfg, targets)).double()
    g = torch.stack([iteration_gradient(policy, cfg, targets, it, kernel) for it in range(ITERATIONS)]).double()
    r = g @ pred / (pred @ pred)
    z = (g.mean(0) - pred) / (g.std(0) / ITERATIONS**0.5)
    return float(r.mean()), float(r.std() / ITERATIONS**0.5), z


@pytest.mark.parametrize("kernel", [{"name": "flow_sde", "a": 0.7}, {"name": "flow_sde_const", "eta": 0.3}],
                         ids=["flow_sde", "flow_sde_const"])
def test_policy_gradient_is_unbiased_with_every_step_stochastic(kernel, one_thread):
    ratio, se, z = _ratio(bed_config(kernel))
    assert abs(ratio - 1) < 3 * se, (ratio, se)
    assert se < 0.05  # the check has power: a 15% bias would fail it
    assert float(z.abs().max()) < 3.5, z  # each of the 17 coordinates (4 prompts x 4 means, log s0)


@dataclass
class _CopyFlowSDE(Kernel):
    """The test's own copy of Flow-GRPO's kernel, with one bug switched on."""

    a: float = 0.7
    bug: str = ""

    def mean_std(self, x, v, grid, k, scale):
        t, tn = grid.sigmas[k], grid.sigmas[k + 1]
        g = (flow_grpo_sigma(t, grid.sigmas[1], self.a) * scale).view(-1, *[1] * (x.ndim - 1))
        tt, dt = t.view_as(g), (tn - t).view_as(g)
        drift = g**2 / (2 * tt) * (x + (1 - tt) * v)  # the score correction that keeps the marginals
        if self.bug == "sign":
            drift = -drift
        elif self.bug == "missing drift":
            drift = torch.zeros_like(drift)
        return x + dt * (v + drift), (g * torch.sqrt(-dt)).reshape(-1)


def test_the_copy_is_the_kernel():
    policy = bed_policy(dim=DIM)
    grid = policy.sampling_grid(10)
    x, v = torch.randn(3, DIM), torch.randn(3, DIM)
    k, s = torch.tensor([0, 4, 9]), torch.ones(3)
    g = flow_grpo_sigma(grid.sigmas[k], grid.sigmas[1], 0.7)
    want = flow_sde_mean_std(x, v, grid.sigmas[k], grid.sigmas[k + 1], g)
    got = _CopyFlowSDE().mean_std(x, v, grid, k, s)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("bug", ["sign", "missing drift", "std in the log-prob"])
def test_each_bug_breaks_the_check(bug, one_thread, monkeypatch):
    """A sign error in the drift correction, the drift correction dropped, and a log-prob that uses 1.25 x the
    sampling std: each moves the mean gradient many standard errors off the prediction."""
    kernel = _CopyFlowSDE(bug="" if bug == "std in the log-prob" else bug)
    if bug == "std in the log-prob":
        right = rollout_module.gaussian_log_prob
        monkeypatch.setattr(rollout_module, "gaussian_log_prob",
                            lambda x, mean, std, reduction="mean": right(x, mean, 1.25 * std, reduction))
    ratio, se, z = _ratio(bed_config({"name": "flow_sde", "a": 0.7}), kernel)
    assert abs(ratio - 1) > 6 * se or float(z.abs().max()) > 8, (ratio, se, z)


def test_the_unbroken_copy_passes(one_thread):
    ratio, se, _ = _ratio(bed_config({"name": "flow_sde", "a": 0.7}), _CopyFlowSDE())
    assert abs(ratio - 1) < 3 * se


def test_the_constant_factors_are_the_estimators():
    """The prediction's factors belong to the estimator: (G - 1)/G from the group mean, 1/D from the mean
    reduction (a sum reduction has no 1/D)."""
    policy, targets = bed_policy(dim=DIM), bed_targets(dim=DIM)
    for G, reduction, factor in ((2, "mean", 0.5 / DIM), (8, "sum", 7 / 8)):
        cfg = bed_config({"name": "flow_sde_const", "eta": 0.3}, G=G, log_prob_reduction=reduction)
        pred = factor / 10 * exact_gradient(policy, cfg, targets).double()
        mean, se = mean_gradient(policy, cfg, targets, 200)
        r = float(mean @ pred / (pred @ pred))
        assert abs(r - 1) < 0.2, (G, reduction, r)


def test_a_partial_window_recovers_part_of_the_gradient(one_thread):
    """ODE steps carry no score: the window's estimator misses the parameters' effect through them. The late
    window carries most of grad J on this bed, the early one little (docs/algorithms.md §10 has the table)."""
    policy, targets = bed_policy(dim=DIM), bed_targets(dim=DIM)
    fractions = {}
    for start in (0, 8):
        cfg = bed_config({"name": "flow_sde", "a": 0.7}, {"name": "window", "size": 2, "start": start})
        pred = (predicted_factor(cfg, DIM, 2) * exact_gradient(policy, cfg, targets)).double()
        mean, _ = mean_gradient(policy, cfg, targets, 200)
        fractions[start] = float(mean @ pred / (pred @ pred))
    assert fractions[0] < 0.1 and 0.5 < fractions[8] < 0.95, fractions
