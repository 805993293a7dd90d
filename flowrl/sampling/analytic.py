"""A policy with an exact velocity field: Gaussian data, x0 ~ N(m, s0^2 I) per prompt.

Under x_t = (1 - t) x0 + t eps the marginal is N((1 - t) m, ((1 - t)^2 s0^2 + t^2) I) and the optimal velocity
E[eps - x0 | x_t] is affine in x_t, so every kernel can be checked against closed forms: the ODE carries N(0, I)
to N(m, s0^2 I), and a marginal-preserving SDE must end in the same distribution. Used by the tests and useful to
anyone checking a new kernel or plan without a network.
"""
from __future__ import annotations

import torch
from torch import nn

from flowrl.sampling.kernels import Grid
from flowrl.sampling.policy import Conditioning, Policy


def shifted_sigmas(num_steps: int, shift: float = 3.0) -> torch.Tensor:
    """t_0 = 1 > ... > t_S = 0 with SD3's time shift t -> shift t / (1 + (shift - 1) t)."""
    t = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).float()


class GaussianFlowPolicy(Policy):
    """Exact-velocity policy. ``means`` (P, D): one data mean per prompt index; ``s0`` the data std."""

    family = "flow"

    def __init__(self, means: torch.Tensor, s0: float = 0.5, shift: float = 3.0):
        self.means = means.float()
        self.s0 = float(s0)
        self.shift = shift
        self.denoiser = nn.Linear(1, 1)  # carries device / dtype only
        self.default_height = self.default_width = 0

    def encode(self, prompts, negative_prompt=""):
        return Conditioning(cond={"mean": self.means[: len(prompts)]})

    def grid(self, num_steps, height=None, width=None):
        sigmas = shifted_sigmas(num_steps, self.shift)
        return Grid(timesteps=sigmas[:-1].clone(), sigmas=sigmas)

    def latent_shape(self, height=None, width=None):
        return (self.means.shape[1],)

    def velocity(self, x, t, m):
        t = t.float().view(-1, *[1] * (x.ndim - 1))
        var = (1 - t) ** 2 * self.s0**2 + t**2
        return (t - (1 - t) * self.s0**2) / var * (x - (1 - t) * m) - m

    def forward(self, x, timesteps, cond, shared, guidance_scale):
        return self.velocity(x.float(), timesteps, cond["mean"])

    def decode(self, latents):
        return latents
