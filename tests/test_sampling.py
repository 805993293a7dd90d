"""The MDP on an exact Gaussian flow: marginals, branch plans, NFE accounting, seeding."""
import math

import pytest
import torch

from flowrl.sampling import Constant, Flat, FlowSDE, FlowSDEConst, OneHot, SplitAt, Table, Window, rollout
from flowrl.sampling.analytic import GaussianFlowPolicy

M, S0 = 1.0, 0.5
D = 4096  # coordinates are independent under the diagonal Gaussian flow: each one is a sample


def _policy(prompts=1, dim=D):
    return GaussianFlowPolicy(torch.full((prompts, dim), M), s0=S0, shift=1.0)


def _within_3_se(x: torch.Tensor, mean: float, var: float):
    x = x.double().flatten()
    n = x.numel()
    assert n >= 4096
    se_mean = math.sqrt(var / n)
    se_var = var * math.sqrt(2 / (n - 1))
    assert abs(float(x.mean()) - mean) < 3 * se_mean, (float(x.mean()), mean, se_mean)
    assert abs(float(x.var()) - var) < 3 * se_var, (float(x.var()), var, se_var)


@pytest.mark.parametrize("kernel,schedule", [(FlowSDE(a=0.7), Constant(0.0)), (FlowSDE(a=0.7), Constant()),
                                             (FlowSDEConst(eta=0.3), Constant())],
                         ids=["ode", "flow_sde", "flow_sde_const"])
def test_sde_and_ode_end_in_the_data_distribution(kernel, schedule):
    """The ODE carries N(0, I) to N(m, s0^2); a marginal-preserving SDE must end in the same distribution."""
    forest = rollout(_policy(), ["p"], plan=Flat(2), kernel=kernel, schedule=schedule, num_steps=300, seed=11)
    _within_3_se(forest.latents[forest.leaves()], M, S0**2)


def test_correlated_split_children_keep_the_marginal():
    c = 0.5
    plan = SplitAt(steps=(0, 100, 200), K=2, correlation=c, trees=1)
    forest = rollout(_policy(dim=4096), ["p"], plan=plan, kernel=FlowSDE(a=0.7), num_steps=300, seed=5,
                     record=("noise",))
    leaves = forest.leaves()
    assert len(leaves) == 8
    for leaf in (leaves[0], leaves[-1]):  # one child per tree: independent coordinates, exact marginal
        _within_3_se(forest.latents[leaf], M, S0**2)
    # siblings share z_0: their noise at the split step has correlation 1 / (1 + c^2)
    split_edges = torch.nonzero(forest.edge_step == 100).flatten()
    z = forest.noise[split_edges[:2]].flatten(1)
    corr = float(torch.corrcoef(z)[0, 1])
    assert abs(corr - 1 / (1 + c * c)) < 0.05
    # and each child's stored log-prob is its true density: z is standard normal per child
    assert abs(float(z[0].std()) - 1) < 0.05 and abs(float(z[1].std()) - 1) < 0.05


class _Counting(GaussianFlowPolicy):
    calls = 0
    n_rows = 0

    def forward(self, x, timesteps, cond, shared, guidance_scale):
        self.calls += 1
        self.n_rows += x.shape[0]
        return super().forward(x, timesteps, cond, shared, guidance_scale)


def test_split_at_reports_published_counts():
    policy = _Counting(torch.full((3, 4), M), s0=S0)
    plan = SplitAt(steps={0, 3, 6, 9}, K=2)
    forest = rollout(policy, ["a", "b", "c"], plan=plan, kernel=FlowSDE(), num_steps=20)
    assert plan.nfe(20) == 203 and plan.num_edges(20) == 218 and plan.num_leaves(20) == 16
    assert forest.per_tree("nfe").tolist() == [203] * 3
    assert forest.per_tree("edges").tolist() == [218] * 3
    assert forest.per_tree("leaves").tolist() == [16] * 3
    assert forest.nfe == 3 * 203 and policy.n_rows == 3 * 203
    assert policy.calls == 20  # one batched model call per step for every frontier node of every tree
    assert forest.num_edges == 3 * 218 and forest.num_nodes == 3 * 219


def test_flat_counts_and_tree_structure():
    policy = _Counting(torch.full((2, 4), M), s0=S0)
    forest = rollout(policy, ["a", "b"], plan=Flat(G=4), kernel=FlowSDE(), schedule=Window(size=2, start=1),
                     num_steps=6)
    assert forest.nfe == 2 * 4 * Flat(4).nfe(6) == 2 * 4 * 6  # plan counts are per tree
    assert forest.num_trees == 8 and forest.tree_prompt.tolist() == [0] * 4 + [1] * 4
    assert forest.trainable.sum() == 8 * 2 and set(forest.edge_step[forest.trainable].tolist()) == {1, 2}
    assert torch.isnan(forest.logp_old[~forest.sde]).all() and torch.isfinite(forest.logp_old[forest.sde]).all()
    leaf = int(forest.leaves()[5])
    path = forest.path_edges(leaf)
    assert len(path) == 6 and forest.edge_step[path].tolist() == list(range(6))
    assert int(forest.dst[path[-1]]) == leaf


def test_noise_depends_on_identity_not_batch_position():
    """A prompt's samples are the same alone or in a batch, whatever its position: sharding-invariant."""
    policy = _policy(prompts=3, dim=16)
    kw = dict(plan=SplitAt(steps=(1,), K=3), kernel=FlowSDE(), num_steps=4, seed=3, iteration=2)
    full = rollout(policy, ["a", "b", "c"], prompt_ids=[10, 11, 12], **kw)
    alone = rollout(policy, ["b"], prompt_ids=[11], cond=policy.encode(["b"]), **kw)
    f_leaves = full.leaves()[full.node_tree[full.leaves()] == 1]
    assert torch.equal(full.latents[f_leaves], alone.latents[alone.leaves()])
    other_iter = rollout(policy, ["b"], prompt_ids=[11], **{**kw, "iteration": 3})
    assert not torch.equal(other_iter.latents[other_iter.leaves()], alone.latents[alone.leaves()])


def test_shared_initial_noise():
    forest = rollout(_policy(dim=8), ["p"], plan=Flat(3, shared_noise=True), kernel=FlowSDE(), num_steps=3)
    roots = forest.latents[forest.node_step == 0]
    assert torch.equal(roots[0], roots[1]) and torch.equal(roots[0], roots[2])
    leaves = forest.latents[forest.leaves()]
    assert not torch.equal(leaves[0], leaves[1])


def test_window_draw_is_per_iteration_and_reproducible():
    w = Window(size=2, start=(0, 5), seed=1)
    starts = [w.window_start(i) for i in range(50)]
    assert starts == [Window(size=2, start=(0, 5), seed=1).window_start(i) for i in range(50)]
    assert set(starts) == set(range(6))
    assert w.sde_steps(10, iteration=7) == [starts[7], starts[7] + 1]


def test_schedule_errors_are_explicit():
    with pytest.raises(ValueError, match="does not fit"):
        Window(size=4, start=8).noise_scales(10)
    with pytest.raises(ValueError, match="outside"):
        OneHot(step=10).noise_scales(10)
    with pytest.raises(ValueError, match="entries"):
        Table((1.0, 0.0)).noise_scales(3)
    with pytest.raises(ValueError, match="branches at step 3"):
        rollout(_policy(dim=4), ["p"], plan=SplitAt(steps=(3,)), kernel=FlowSDE(), schedule=Window(size=2),
                num_steps=6)


def test_dpm2m_ode_stretch_follows_the_solver():
    """MixGRPO-Flash's deterministic stretch: after the SDE window the rollout runs DPM-Solver++ 2M, restarting
    its multistep memory after the last stochastic step (replayed here by hand from the recorded noise)."""
    from flowrl.sampling.kernels import dpm_solver_2m_step

    policy = _policy(dim=64)
    f = rollout(policy, ["p"], plan=Flat(1), kernel=FlowSDE(), schedule=Window(size=2, start=1), num_steps=8,
                ode_solver="dpm2m", seed=2, record=("mean", "noise"))
    sig, m = f.grid.sigmas, policy.means[:1]
    x, mem = f.latents[0:1], None
    for k in range(8):
        v = policy.velocity(x, sig[k:k + 1], m)
        if k in (1, 2):
            x, mem = f.mean[k:k + 1] + f.std[k] * f.noise[k:k + 1], None
        else:
            x, mem = dpm_solver_2m_step(x, v, sig[k], sig[k + 1], mem)
    assert torch.allclose(x, f.latents[f.leaves()], atol=1e-6)
    # and on the all-deterministic path it is closer to the data distribution than Euler at equal cost
    errs = {}
    for solver in ("euler", "dpm2m"):
        g = rollout(_policy(), ["p"], plan=Flat(1), kernel=FlowSDE(), schedule=Constant(0.0), num_steps=12,
                    ode_solver=solver)
        errs[solver] = abs(float(g.latents[g.leaves()].var()) - S0**2)
    assert errs["dpm2m"] < errs["euler"] / 3
