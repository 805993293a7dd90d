"""Transition kernels: the stochastic policy of the sampler MDP (docs/algorithms.md §2).

A kernel maps a state ``x`` and the model output at it to a Gaussian ``N(mean, std^2 I)`` over the next state.
Every function here is pure tensor math in float32, whatever the model's dtype, so that a log-prob recomputed
for training matches the one stored at rollout bit for bit.

Conventions: ``x`` has shape (N, ...), per-sample step quantities (``t``, ``t_next``, alphas) have shape (N,)
or are scalars, ``std`` is returned with shape (N,). With noise level 0 every kernel is exactly the
deterministic step of the corresponding diffusers scheduler (Euler for flows, DDIM eta=0 for UNets).

Log-probs are per-element *means* over the latent by default (reduction="mean"); that is the convention under
which the published clip ranges (1e-4 .. 1e-5) were tuned. ``reduction="sum"`` gives the true joint density.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from flowrl.sampling.solvers import dpm_solver_pp_step, lam

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class Transition:
    """One step of the MDP: the next state, the Gaussian it was drawn from and its log-prob.

    ``log_prob`` is None for a deterministic step (std 0): ODE steps carry no likelihood and are never trained.
    """

    next: Tensor
    mean: Tensor
    std: Tensor
    log_prob: Tensor | None


def _per_sample(value, x: Tensor) -> Tensor:
    """A scalar or (N,) quantity as a float32 tensor broadcastable against ``x`` of shape (N, ...)."""
    v = torch.as_tensor(value, dtype=torch.float32, device=x.device)
    if v.ndim == 0:
        v = v.expand(x.shape[0])
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def gaussian_log_prob(x_next: Tensor, mean: Tensor, std: Tensor, reduction: str = "mean") -> Tensor:
    """Log density of ``x_next`` under N(mean, std^2 I), reduced over all but the batch dimension.

    ``std`` is per sample (N,). "mean" averages the per-element log density (the convention of every public
    flow-GRPO implementation); "sum" is the joint log density.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    sq = torch.sub(x_next.float(), mean.float()).square_().flatten(1)
    sq = sq.mean(1) if reduction == "mean" else sq.sum(1)
    n = 1 if reduction == "mean" else x_next[0].numel()
    std = torch.as_tensor(std, dtype=torch.float32, device=sq.device).expand(sq.shape[0])
    # per element: -(x - mu)^2 / (2 s^2) - log s - log sqrt(2 pi), reduced; s is constant within a sample
    return -sq / (2 * std**2) - n * (torch.log(std) + LOG_SQRT_2PI)


def sample_step(mean: Tensor, std: Tensor, *, noise: Tensor | None = None, generator=None,
                prev_sample: Tensor | None = None, reduction: str = "mean") -> Transition:
    """Draw (or take) the next state from N(mean, std^2) and score it.

    ``prev_sample`` given: score that state (re-scoring a stored step). Else ``noise`` given: use it (replay,
    correlated branches). Else draw fresh noise from ``generator``.
    """
    std = std.float()
    if prev_sample is None:
        if noise is None:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
        prev_sample = torch.addcmul(mean, _per_sample(std, mean), noise.float())  # as the rollout computes it
    stochastic = bool((std > 0).all())
    if not stochastic and bool((std > 0).any()):
        raise ValueError("a batch mixes deterministic (std 0) and stochastic samples; step them separately")
    logp = gaussian_log_prob(prev_sample, mean, std, reduction) if stochastic else None
    return Transition(next=prev_sample, mean=mean, std=std, log_prob=logp)


# ---------------------------------------------------------------------------------------------- flow matching
# Rectified flow (diffusers' FlowMatchEulerDiscreteScheduler): x_t = (1 - t) x0 + t eps, v ~ eps - x0, t: 1 -> 0.


def flow_sde_mean_std(x: Tensor, v: Tensor, t, t_next, g) -> tuple[Tensor, Tensor]:
    """Euler-Maruyama step of the reverse SDE with diffusion coefficient ``g`` (per sample).

    mean = x + dt * [v + g^2 / (2 t) * (x + (1 - t) v)], std = g * sqrt(-dt). The extra drift is the score
    correction that keeps the ODE's marginals; g = 0 gives the Euler ODE step exactly.
    """
    x, v = x.float(), v.float()
    t_, tn = _per_sample(t, x), _per_sample(t_next, x)
    g_ = _per_sample(g, x)
    dt = tn - t_
    c = g_**2 / (2 * t_) * dt  # per-sample scalars first, so the latent-sized work is two fused multiply-adds
    mean = torch.addcmul(x * (1 + c), v, dt + c * (1 - t_))
    std = (g_ * torch.sqrt(-dt)).reshape(-1)
    return mean, std


def flow_grpo_sigma(t, t_max, a: float) -> Tensor:
    """Flow-GRPO's diffusion coefficient g = a * sqrt(t / (1 - t)); at t = 1 the denominator uses ``t_max``
    (the first grid point below 1), as the method's reference implementation does, to stay finite."""
    t = torch.as_tensor(t, dtype=torch.float32)
    t_max = torch.as_tensor(t_max, dtype=torch.float32, device=t.device)
    denom = 1 - torch.where(t >= 1, t_max, t)
    return a * torch.sqrt(t / denom)


def flow_sde_step(x, v, t, t_next, *, a: float = 0.7, t_max=None, **kw) -> Transition:
    """Flow-GRPO kernel (noise level ``a``: 0.7 for SD3, 0.9 for FLUX). ``t_max``: see flow_grpo_sigma."""
    t_max = t_max if t_max is not None else t_next
    g = flow_grpo_sigma(torch.as_tensor(t, dtype=torch.float32, device=x.device), t_max, a)
    return sample_step(*flow_sde_mean_std(x, v, t, t_next, g), **kw)


def flow_sde_const_step(x, v, t, t_next, *, eta: float = 0.3, **kw) -> Transition:
    """DanceGRPO kernel: the same reverse SDE with a constant diffusion coefficient g = eta."""
    g = torch.full_like(torch.as_tensor(t, dtype=torch.float32), eta)
    return sample_step(*flow_sde_mean_std(x, v, t, t_next, g), **kw)


def cps_mean_std(x: Tensor, v: Tensor, t, t_next, a) -> tuple[Tensor, Tensor]:
    """Coefficients-preserving sampling: s = t' sin(a pi / 2), mean = (1 - t') x0_hat + sqrt(t'^2 - s^2) eps_hat.

    The next state keeps the exact interpolation coefficients (1 - t') and t' of x0 and noise; a = 0 is Euler.
    """
    x, v = x.float(), v.float()
    t_, tn = _per_sample(t, x), _per_sample(t_next, x)
    x0_hat = x - t_ * v
    eps_hat = x + (1 - t_) * v
    s = tn * torch.sin(_per_sample(a, x) * (math.pi / 2))
    mean = (1 - tn) * x0_hat + torch.sqrt(torch.clamp(tn**2 - s**2, min=0)) * eps_hat
    return mean, s.reshape(-1)


def cps_step(x, v, t, t_next, *, a: float = 0.8, **kw) -> Transition:
    return sample_step(*cps_mean_std(x, v, t, t_next, a), **kw)


def ode_euler_step(x: Tensor, v: Tensor, t, t_next) -> Tensor:
    """x' = x + dt v, in float32 as FlowMatchEulerDiscreteScheduler.step computes it."""
    x = x.float()
    return x + (_per_sample(t_next, x) - _per_sample(t, x)) * v.float()


def dpm_solver_2m_step(x: Tensor, v: Tensor, t, t_next, prev: tuple[Tensor, Tensor] | None = None):
    """DPM-Solver++ 2M (data prediction, midpoint) on the rectified-flow path alpha = 1 - t, sigma = t
    (flowrl.sampling.solvers has the general multistep solver).

    ``prev`` = (x0_hat, lambda) of the previous step of the same chain, or None for a first-order step (the
    solver's warm start, and its last step to t = 0, where it lands on x0_hat). Returns (x_next, memory) where
    memory is the ``prev`` of the next call. Matches diffusers' DPMSolverMultistepScheduler with flow sigmas.
    """
    x_next, x0 = dpm_solver_pp_step(x, v, t, t_next, () if prev is None else (prev,), order=2)
    if bool((torch.as_tensor(t_next) <= 0).all()):
        return x_next, None
    return x_next, (x0, lam(_per_sample(t, x.float())))


# ------------------------------------------------------------------------------------- DDIM (UNet pipelines)


def ddim_mean_std(x: Tensor, out: Tensor, alpha_bar, alpha_bar_prev, eta, prediction_type: str = "epsilon",
                  clip_sample_range: float | None = None) -> tuple[Tensor, Tensor]:
    """DDIM with eta (DDPO): sigma = eta sqrt((1 - ab_prev) / (1 - ab) (1 - ab / ab_prev)),
    mean = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma^2) eps_hat. Follows DDIMScheduler.step's order of
    operations so that eta = 0 reproduces it; ``clip_sample_range`` mirrors its clip_sample option."""
    x, out = x.float(), out.float()
    ab, abp = _per_sample(alpha_bar, x), _per_sample(alpha_bar_prev, x)
    beta = 1 - ab
    if prediction_type == "epsilon":
        x0_hat = (x - beta**0.5 * out) / ab**0.5
        eps_hat = out
    elif prediction_type == "v_prediction":
        x0_hat = ab**0.5 * x - beta**0.5 * out
        eps_hat = ab**0.5 * out + beta**0.5 * x
    elif prediction_type == "sample":
        x0_hat = out
        eps_hat = (x - ab**0.5 * x0_hat) / beta**0.5
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    if clip_sample_range is not None:
        x0_hat = x0_hat.clamp(-clip_sample_range, clip_sample_range)
    variance = ((1 - abp) / beta) * (1 - ab / abp)
    sigma = _per_sample(eta, x) * variance**0.5
    mean = abp**0.5 * x0_hat + (1 - abp - sigma**2) ** 0.5 * eps_hat
    return mean, sigma.reshape(-1)


def ddim_step(x, out, alpha_bar, alpha_bar_prev, *, eta: float = 1.0, prediction_type: str = "epsilon", **kw):
    return sample_step(*ddim_mean_std(x, out, alpha_bar, alpha_bar_prev, eta, prediction_type), **kw)


# --------------------------------------------------------------------------- kernels bound to a sampling grid


@dataclass
class Grid:
    """A pipeline's own sampling grid (from its scheduler, never re-derived by hand).

    ``timesteps`` (S,) is what the model receives at step k. Flow models also carry ``sigmas`` (S + 1,):
    t_0 = 1 > ... > t_S = 0. DDIM models carry ``alphas_cumprod`` and ``alphas_cumprod_prev`` (S,) and the
    scheduler's ``prediction_type`` / ``clip_sample_range``.
    """

    timesteps: Tensor
    sigmas: Tensor | None = None
    alphas_cumprod: Tensor | None = None
    alphas_cumprod_prev: Tensor | None = None
    prediction_type: str = "flow"
    clip_sample_range: float | None = None

    @property
    def family(self) -> str:
        return "flow" if self.sigmas is not None else "ddim"

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def splice(self, k: int, tail: "Grid") -> "Grid":
        """This grid up to its point k, then ``tail`` (a flow grid that starts where this one is at k: its first
        point is replaced by this grid's own, so the chain continues exactly)."""
        if self.family != "flow" or tail.family != "flow":
            raise ValueError("Grid.splice joins flow grids")
        if not 0 <= k < self.num_steps:
            raise ValueError(f"Grid.splice: point {k} is not the start of a step of this {self.num_steps}-step grid")
        dev = self.sigmas.device
        return Grid(timesteps=torch.cat([self.timesteps[:k + 1], tail.timesteps[1:].to(dev, self.timesteps.dtype)]),
                    sigmas=torch.cat([self.sigmas[:k + 1], tail.sigmas[1:].to(dev, self.sigmas.dtype)]),
                    prediction_type=self.prediction_type)

    def to(self, device) -> "Grid":
        move = lambda v: v.to(device) if isinstance(v, Tensor) else v  # noqa: E731
        return Grid(**{k: move(v) for k, v in self.__dict__.items()})


class Kernel:
    """A transition kernel with its parameters, evaluated on a Grid at per-sample step indices ``k`` (N,).

    ``scale`` (N,) multiplies the kernel's noise level; it is how schedules switch steps between SDE and ODE
    (scale 0 is the deterministic step) or calibrate them per step.
    """

    family = "flow"

    def mean_std(self, x: Tensor, out: Tensor, grid: Grid, k: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def check(self, grid: Grid) -> None:
        if grid.family != self.family:
            raise ValueError(f"{type(self).__name__} is a {self.family} kernel but the model samples on a "
                             f"{grid.family} grid (prediction_type={grid.prediction_type!r})")


@dataclass
class FlowSDE(Kernel):
    """Flow-GRPO: g = a sqrt(t / (1 - t)). Defaults a = 0.7 (SD3); use 0.9 for FLUX."""

    a: float = 0.7

    def mean_std(self, x, out, grid, k, scale):
        t, tn = grid.sigmas[k], grid.sigmas[k + 1]
        g = flow_grpo_sigma(t, grid.sigmas[1], self.a) * scale
        return flow_sde_mean_std(x, out, t, tn, g)


@dataclass
class FlowSDEConst(Kernel):
    """DanceGRPO: constant diffusion coefficient g = eta (default 0.3)."""

    eta: float = 0.3

    def mean_std(self, x, out, grid, k, scale):
        return flow_sde_mean_std(x, out, grid.sigmas[k], grid.sigmas[k + 1], self.eta * scale.float())


@dataclass
class CPS(Kernel):
    """Coefficients-preserving sampling, noise angle a (default 0.8); ``scale`` multiplies a."""

    a: float = 0.8

    def mean_std(self, x, out, grid, k, scale):
        return cps_mean_std(x, out, grid.sigmas[k], grid.sigmas[k + 1], self.a * scale.float())


@dataclass
class DDIMEta(Kernel):
    """DDPO's DDIM kernel for epsilon / v-prediction UNets; eta = 1 is DDPM-like, 0 is deterministic DDIM."""

    eta: float = 1.0
    family = "ddim"

    def mean_std(self, x, out, grid, k, scale):
        return ddim_mean_std(x, out, grid.alphas_cumprod[k], grid.alphas_cumprod_prev[k], self.eta * scale.float(),
                             grid.prediction_type, grid.clip_sample_range)


KERNELS = {"flow_sde": FlowSDE, "flow_sde_const": FlowSDEConst, "cps": CPS, "ddim": DDIMEta}
