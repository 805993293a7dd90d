"""An exact test bed for the GRPO family's policy gradient (docs/algorithms.md §10).

On ``GaussianFlowPolicy`` (x0 ~ N(m_p, s0^2 I), the means and log s0 trainable) with the reward
R(x0) = -|x0 - target_p|^2, the sampled chain ends in N(mu_S, V_S I) exactly (``terminal_moments``), so

    J = mean_p E[R_p] = -mean_p (|mu_S,p - target_p|^2 + D V_S)

and its gradient are known in closed form. ``iteration_gradient`` computes one iteration's policy gradient with
the trainer's own parts, in the trainer's order: ``rollout`` on the recipe's kernel, schedule and plan, the
reward, ``scoring.advantages_from_rewards`` (the recipe's estimator), the objective's ``units``, ``prepare`` and
``loss``, ``micro_batches`` and ``aggregation`` with its global denominator, backward. With every step
stochastic, the estimator off std normalisation (``dr_grpo``) and token-mean aggregation, its expectation is

    E[-grad loss] = 1/D * 1/K * (G - 1)/G * grad J

(1/D: log-probs are means over the latent's D elements; 1/K: the loss averages the K trained steps; (G - 1)/G:
the group-mean baseline contains the sample itself). ``scripts/gradient_bed.py`` prints the measured ratio per
kernel, and the fraction of grad J that a partial SDE window recovers.
"""
from __future__ import annotations

import torch
from torch import Tensor

from flowrl.sampling import rollout
from flowrl.sampling.analytic import GaussianFlowPolicy, terminal_moments
from flowrl.train import builders
from flowrl.train.config import Config, build_dataclass
from flowrl.train.objectives import OBJECTIVES
from flowrl.train.scoring import advantages_from_rewards
from flowrl.train.units import aggregation, micro_batches


def bed_config(kernel: dict, schedule: dict | None = None, G: int = 8, prompts: int = 4, num_steps: int = 10,
               estimator: str = "dr_grpo", seed: int = 0, **training) -> Config:
    """A recipe for the bed: one on-policy update per iteration (ratio 1, so clipping never acts), no KL."""
    return build_dataclass(Config, {
        "run": {"seed": seed},
        "sampling": {"num_steps": num_steps, "guidance_scale": 1.0, "kernel": kernel,
                     "schedule": schedule or {"name": "constant"}, "plan": {"name": "flat", "G": G}},
        "data": {"prompts_per_iteration": prompts},
        "advantages": {"estimator": estimator, "clip": None},
        "training": {"objective": "grpo", "updates_per_epoch": 1, "inner_epochs": 1, "micro_batch_size": 4096,
                     **training},
    })


def bed_policy(prompts: int = 4, dim: int = 4, s0: float = 0.5, shift: float = 3.0) -> GaussianFlowPolicy:
    """Data means at 0 on SD3.5's time-shifted grid (shift 3); the targets (``bed_targets``) are away from them."""
    return GaussianFlowPolicy(torch.zeros(prompts, dim), s0=s0, shift=shift)


def bed_targets(prompts: int = 4, dim: int = 4) -> Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(prompts, dim, generator=g)


def quadratic_reward(x0: Tensor, prompt: Tensor, targets: Tensor) -> Tensor:
    """R(x0) = -|x0 - target_p|^2 (summed over the latent)."""
    return -(x0.float() - targets[prompt]).square().flatten(1).sum(1)


def expected_reward(policy: GaussianFlowPolicy, cfg: Config, targets: Tensor, iteration: int = 0) -> Tensor:
    """J in closed form (differentiable): the prompts' mean of E[R] under the recipe's kernel and schedule."""
    kernel = builders.make_kernel(cfg.sampling.kernel)
    scales = builders.make_schedule(cfg.sampling.schedule, cfg.run.seed).noise_scales(cfg.sampling.num_steps,
                                                                                        iteration)
    D = policy.means.shape[1]
    total = 0.0
    for p in range(len(targets)):
        mu, V = terminal_moments(policy, kernel, cfg.sampling.num_steps, scales, p)
        total = total - ((mu - targets[p]).square().sum() + D * V)
    return total / len(targets)


def exact_gradient(policy: GaussianFlowPolicy, cfg: Config, targets: Tensor, iteration: int = 0) -> Tensor:
    """grad J as one flat vector over the policy's parameters (means, then log s0)."""
    params = list(policy.denoiser.parameters())
    grads = torch.autograd.grad(expected_reward(policy, cfg, targets, iteration), params)
    return torch.cat([g.flatten() for g in grads])


def predicted_factor(cfg: Config, dim: int, trained_steps: int) -> float:
    """1/D * 1/K * (G - 1)/G: what the estimator's expectation is of grad J when every step it trains is scored."""
    G = cfg.sampling.plan["G"]
    return 1 / dim / trained_steps * (G - 1) / G


def iteration_gradient(policy: GaussianFlowPolicy, cfg: Config, targets: Tensor, iteration: int,
                       kernel=None) -> Tensor:
    """-grad loss of one iteration (the ascent direction the optimizer would take), flat like exact_gradient.
    ``kernel`` overrides the recipe's (a test's own copy of a kernel)."""
    c, t = cfg, cfg.training
    kernel = kernel or builders.make_kernel(c.sampling.kernel)
    schedule = builders.make_schedule(c.sampling.schedule, c.run.seed)
    objective = OBJECTIVES[t.objective](c, policy, None)
    P = len(targets)
    forest = rollout(policy, [f"prompt {p}" for p in range(P)], plan=builders.make_plan(c.sampling.plan),
                     kernel=kernel, schedule=schedule, num_steps=c.sampling.num_steps, guidance_scale=1.0,
                     seed=c.run.seed, iteration=iteration, negative_prompt=None,
                     reduction=t.log_prob_reduction, record=objective.record)
    leaves = forest.leaves()
    slots = forest.node_prompt[leaves]
    rewards = {"quadratic": quadratic_reward(forest.latents[leaves], slots, targets)}
    adv = advantages_from_rewards(rewards, slots, {"quadratic": 1.0}, c)
    units = objective.units(forest, adv, slots, iteration)
    objective.prepare(forest, units, iteration)
    params = list(policy.denoiser.parameters())
    for p in params:
        p.grad = None
    for batches in micro_batches(units, t.updates_per_epoch, t.micro_batch_size, c.run.seed, iteration, 0, 0):
        weights, denom = aggregation(units, torch.cat(batches), t.aggregation, c.sampling.num_steps)
        start = 0
        for mb in batches:
            loss, _ = objective.loss(forest, units, mb)
            w = weights[start:start + len(mb)]
            start += len(mb)
            ((loss * w.to(loss)).sum() / (denom or 1.0)).backward()
    return -torch.cat([p.grad.flatten() for p in params])


def mean_gradient(policy, cfg, targets, iterations: int, kernel=None) -> tuple[Tensor, Tensor]:
    """Mean and standard error (per coordinate) of ``iteration_gradient`` over independent iterations."""
    g = torch.stack([iteration_gradient(policy, cfg, targets, it, kernel) for it in range(iterations)]).double()
    return g.mean(0), g.std(0) / iterations**0.5


__all__ = ["bed_config", "bed_policy", "bed_targets", "exact_gradient", "expected_reward", "iteration_gradient",
           "mean_gradient", "predicted_factor", "quadratic_reward"]
