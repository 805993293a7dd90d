"""Kernels against closed forms: reference Gaussian densities, ODE limits, diffusers' own scheduler steps."""
import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from flowrl.sampling import kernels as K
from flowrl.sampling.analytic import GaussianFlowPolicy

torch.manual_seed(0)
X = torch.randn(5, 4, 6, 6)
V = torch.randn(5, 4, 6, 6)
T = torch.tensor([1.0, 0.9, 0.5, 0.2, 0.05])
TN = torch.tensor([0.9, 0.8, 0.4, 0.1, 0.0])


def _reference_logp(x_next, mean, std, reduction):
    d = torch.distributions.Normal(mean.double(), std.double().view(-1, 1, 1, 1).expand_as(mean))
    lp = d.log_prob(x_next.double()).flatten(1)
    return (lp.mean(1) if reduction == "mean" else lp.sum(1)).float()


STEPS = {
    "flow_sde": lambda **kw: K.flow_sde_step(X, V, T, TN, a=0.7, t_max=torch.tensor(0.9), **kw),
    "flow_sde_const": lambda **kw: K.flow_sde_const_step(X, V, T, TN, eta=0.3, **kw),
    "cps": lambda **kw: K.cps_step(X, V, T, TN.clamp(min=0.05), a=0.8, **kw),
    "ddim": lambda **kw: K.ddim_step(X, V, torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9]),
                                     torch.tensor([0.3, 0.5, 0.7, 0.9, 0.99]), eta=1.0, **kw),
}


@pytest.mark.parametrize("name", list(STEPS))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_log_prob_matches_reference_gaussian(name, reduction):
    tr = STEPS[name](generator=torch.Generator().manual_seed(1), reduction=reduction)
    assert tr.std.shape == (5,) and (tr.std > 0).all()
    ref = _reference_logp(tr.next, tr.mean, tr.std, reduction)
    torch.testing.assert_close(tr.log_prob, ref, rtol=1e-5, atol=1e-4 if reduction == "sum" else 1e-5)
    # re-scoring the stored sample reproduces the stored log-prob exactly
    again = STEPS[name](prev_sample=tr.next, reduction=reduction)
    assert torch.equal(again.log_prob, tr.log_prob)


def test_given_noise_is_used():
    z = torch.randn_like(X)
    tr = STEPS["flow_sde"](noise=z)
    torch.testing.assert_close(tr.next, tr.mean + tr.std.view(-1, 1, 1, 1) * z)


def test_flow_sde_mean_is_flow_grpo_closed_form():
    t, tn, a = T[1:4], TN[1:4], 0.7
    g = a * torch.sqrt(t / (1 - t))
    dt = (tn - t).view(-1, 1, 1, 1)
    tt, gg = t.view(-1, 1, 1, 1), g.view(-1, 1, 1, 1)
    x, v = X[1:4], V[1:4]
    ref = x * (1 + gg**2 / (2 * tt) * dt) + v * (1 + gg**2 * (1 - tt) / (2 * tt)) * dt
    mean, std = K.flow_sde_mean_std(x, v, t, tn, g)
    torch.testing.assert_close(mean, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(std, g * torch.sqrt(t - tn))


def test_flow_grpo_sigma_is_finite_at_t_one():
    g = K.flow_grpo_sigma(torch.tensor([1.0, 0.5]), torch.tensor(0.9), 0.7)
    torch.testing.assert_close(g, torch.tensor([0.7 * math.sqrt(1 / 0.1), 0.7]))


def test_zero_noise_is_the_euler_step_of_diffusers():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(6)
    grid = K.Grid(timesteps=sched.timesteps, sigmas=sched.sigmas)
    x, v = X[:1], V[:1]
    for k in range(6):
        sched._step_index = k
        ref = sched.step(v, sched.timesteps[k], x).prev_sample
        kk = torch.tensor([k])
        for kern in (K.FlowSDE(), K.FlowSDEConst(), K.CPS()):
            mean, std = kern.mean_std(x, v, grid, kk, torch.zeros(1))
            assert std.abs().max() == 0
            torch.testing.assert_close(mean, ref, rtol=0, atol=1e-6)
        assert torch.equal(K.ode_euler_step(x, v, grid.sigmas[k], grid.sigmas[k + 1]), ref)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_eta_zero_is_diffusers_ddim(prediction_type):
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    sched.set_timesteps(5)
    for t in sched.timesteps:
        prev_t = t - sched.config.num_train_timesteps // 5
        ab = sched.alphas_cumprod[t]
        abp = sched.alphas_cumprod[prev_t] if prev_t >= 0 else sched.final_alpha_cumprod
        ref = sched.step(V, t, X, eta=0.0).prev_sample
        tr = K.ddim_step(X, V, ab, abp, eta=0.0, prediction_type=prediction_type)
        assert tr.log_prob is None
        torch.testing.assert_close(tr.next, ref, rtol=0, atol=1e-6)
        # and with eta > 0 the std is diffusers' std_dev_t
        var = sched._get_variance(t, prev_t)
        _, std = K.ddim_mean_std(X, V, ab, abp, 0.7, prediction_type)
        torch.testing.assert_close(std, (0.7 * var**0.5).expand(5))


def test_dpm_solver_2m_is_second_order():
    """On the exact Gaussian flow, halving the step size cuts DPM-Solver++ 2M's error ~4x, Euler's ~2x.

    Integrated from t = 0.9 (a deterministic stretch after an SDE window, MixGRPO-Flash's use of it): at t = 1
    the solver's log-SNR is -inf and its first steps degrade to first order."""
    s0, t0 = 0.5, 0.9
    pol = GaussianFlowPolicy(torch.full((1, 1), 1.0), s0=s0, shift=1.0)
    x_T = torch.tensor([[1.3]])
    m = torch.tensor([[1.0]])

    def solve(S, solver):
        sig, x, mem = torch.linspace(t0, 0, S + 1), x_T, None
        for k in range(S):
            v = pol.velocity(x, sig[k:k + 1], m)
            if solver == "euler":
                x = K.ode_euler_step(x, v, sig[k], sig[k + 1])
            else:
                x, mem = K.dpm_solver_2m_step(x, v, sig[k], sig[k + 1], mem)
        return x.double()

    # the ODE maps x_t to m + s0 (x_t - (1 - t) m) / sqrt((1 - t)^2 s0^2 + t^2) for Gaussian data
    exact = 1.0 + s0 * (1.3 - (1 - t0)) / math.sqrt((1 - t0) ** 2 * s0**2 + t0**2)
    with torch.no_grad():  # the policy's data parameters are trainable; nothing here differentiates
        err = {s: [abs(float(solve(n, s)) - exact) for n in (40, 80, 160)] for s in ("euler", "dpm2m")}
    assert err["dpm2m"][0] < err["euler"][0] / 5
    assert 1.6 < err["euler"][1] / err["euler"][2] < 2.4
    assert err["dpm2m"][1] / err["dpm2m"][2] > 3.0
