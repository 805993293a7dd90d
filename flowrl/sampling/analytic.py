"""A policy with an exact velocity field: Gaussian data, x0 ~ N(m, s0^2 I) per prompt.

Under x_t = (1 - t) x0 + t eps the marginal is N((1 - t) m, ((1 - t)^2 s0^2 + t^2) I) and the optimal velocity
E[eps - x0 | x_t] is affine in x_t, so every kernel can be checked against closed forms: the ODE carries N(0, I)
to N(m, s0^2 I), and a marginal-preserving SDE must end in the same distribution. Used by the tests and useful to
anyone checking a new kernel or plan without a network.

The data parameters (``means`` and ``log s0``) are trainable, as a network's weights are: the velocity depends
on them, so a policy gradient on this policy can be compared with the exact gradient of an expected reward.
Every step of a sampler on it (ODE or SDE, any of flowrl's flow kernels) is affine in the state and the mean,
with isotropic noise, so the sampled chain ends in N(mu_S, V_S I) with ``mu_S`` and ``V_S`` computable exactly
(``terminal_moments``), through autograd.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from flowrl.sampling.kernels import Grid, Kernel
from flowrl.sampling.policy import Conditioning, Policy


def shifted_sigmas(num_steps: int, shift: float = 3.0) -> torch.Tensor:
    """t_0 = 1 > ... > t_S = 0 with SD3's time shift t -> shift t / (1 + (shift - 1) t)."""
    t = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).float()


class GaussianData(nn.Module):
    """The data distribution's parameters, the policy's trainable weights: ``means`` (P, D), one per prompt
    index, and ``log_s0`` (the log of the shared data std)."""

    def __init__(self, means: Tensor, s0: float):
        super().__init__()
        self.means = nn.Parameter(means.detach().float().clone())
        self.log_s0 = nn.Parameter(torch.tensor(math.log(s0)))


class GaussianFlowPolicy(Policy):
    """Exact-velocity policy. ``means`` (P, D): one data mean per prompt index; ``s0`` the data std."""

    family = "flow"

    def __init__(self, means: torch.Tensor, s0: float = 0.5, shift: float = 3.0):
        self.denoiser = GaussianData(means, s0)
        self.shift = shift
        self.default_height = self.default_width = 0

    @property
    def means(self) -> Tensor:
        return self.denoiser.means

    @property
    def s0(self) -> Tensor:
        return self.denoiser.log_s0.exp()

    def encode(self, prompts, negative_prompt=""):
        return Conditioning(cond={"index": torch.arange(len(prompts), device=self.device)})

    def grid(self, num_steps, height=None, width=None):
        sigmas = shifted_sigmas(num_steps, self.shift)
        return Grid(timesteps=sigmas[:-1].clone(), sigmas=sigmas)

    def tail_grid(self, sigma_start, points, height=None, width=None):
        s = self.shift
        u0 = float(sigma_start) / (s - (s - 1) * float(sigma_start))
        u = torch.linspace(u0, 0, points, dtype=torch.float64)
        sigmas = (s * u / (1 + (s - 1) * u)).float()
        return Grid(timesteps=sigmas[:-1].clone(), sigmas=sigmas).to(self.device)

    def latent_shape(self, height=None, width=None):
        return (self.means.shape[1],)

    def velocity(self, x, t, m, s0=None):
        s0 = self.s0 if s0 is None else s0
        t = t.float().view(-1, *[1] * (x.ndim - 1))
        var = (1 - t) ** 2 * s0**2 + t**2
        return (t - (1 - t) * s0**2) / var * (x - (1 - t) * m) - m

    def forward(self, x, timesteps, cond, shared, guidance_scale):
        return self.velocity(x.float(), timesteps, self.means[cond["index"]])

    def decode(self, latents):
        return latents


def terminal_moments(policy: GaussianFlowPolicy, kernel: Kernel, num_steps: int, scales: Tensor,
                     prompt: int = 0) -> tuple[Tensor, Tensor]:
    """(mu_S (D,), V_S): the exact mean and per-coordinate variance of the chain's last state for ``prompt``,
    sampled from x_0 ~ N(0, I) with ``kernel`` at per-step noise ``scales`` (0: the Euler ODE step), on the
    policy's grid. Differentiable in the policy's parameters.

    Each step is x' = a x + b + std z with a a scalar (the kernels are affine in x and the velocity, the
    velocity affine in x), so mu' = a mu + b and V' = a^2 V + std^2; a is read off the kernel at two states.
    """
    grid = policy.sampling_grid(num_steps)
    D = policy.means.shape[1]
    mu, V = torch.zeros(1, D, device=policy.device), torch.ones((), device=policy.device)
    idx = torch.full((1,), prompt, device=policy.device)
    for k in range(num_steps):
        kk = torch.full((1,), k, device=policy.device)
        s = scales[k:k + 1].to(policy.device).float()
        t = grid.timesteps[k:k + 1]
        mean, std = kernel.mean_std(mu, policy.forward(mu, t, {"index": idx}, {}, 1.0), grid, kk, s)
        one = mu + 1.0
        a = (kernel.mean_std(one, policy.forward(one, t, {"index": idx}, {}, 1.0), grid, kk, s)[0] - mean)[0, 0]
        mu, V = mean, a**2 * V + std[0] ** 2
    return mu[0], V


__all__ = ["GaussianData", "GaussianFlowPolicy", "shifted_sigmas", "terminal_moments"]
