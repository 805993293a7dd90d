"""Run a plan against a policy and record the forest; re-score recorded steps under current weights.

One model call per step covers every frontier node of every tree of every prompt (split into ``max_batch``
chunks only if asked). Noise is drawn per node from generators seeded by the node's identity (run seed,
iteration, prompt id, tree, branch path, step), so the forest does not depend on how prompts are batched.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from flowrl.sampling.forest import Forest
from flowrl.sampling.kernels import Kernel, dpm_solver_2m_step, gaussian_log_prob, ode_euler_step
from flowrl.sampling.plans import Plan
from flowrl.sampling.policy import Conditioning, Policy
from flowrl.sampling.schedules import Constant, Schedule
from flowrl.sampling.seeding import derive_seed, randn

RECORDABLE = ("mean", "noise")
ODE_SOLVERS = ("euler", "dpm2m")


def _predict(policy: Policy, x, timesteps, cond, prompt_idx, guidance_scale, rows, max_batch):
    if max_batch is None or x.shape[0] <= max_batch:
        return policy.predict(x, timesteps, cond, prompt_idx, guidance_scale, rows=rows)
    return torch.cat([policy.predict(x[i:i + max_batch], timesteps[i:i + max_batch], cond,
                                     prompt_idx[i:i + max_batch], guidance_scale)
                      for i in range(0, x.shape[0], max_batch)])


def _branch_noise(keys: list[int], step: int, K: int, c: float | None, shape, device) -> tuple[Tensor, list[int]]:
    """Standard noise for the K children of each frontier node, and the children's lineage keys.

    K = 1 continues the node's own stream. K > 1: z_b = (z_0 + c n_b) / sqrt(1 + c^2), shared z_0, private n_b,
    so every child is marginally N(0, I) (c None: independent children).
    """
    zs, child_keys = [], []
    for key in keys:
        if K == 1:
            zs.append(randn(shape, derive_seed(key, step), device))
            child_keys.append(key)
            continue
        z0 = randn(shape, derive_seed(key, step, "shared"), device) if c is not None else None
        for b in range(K):
            child = derive_seed(key, step, b)
            n_b = randn(shape, child, device)
            zs.append(n_b if c is None else (z0 + c * n_b) / math.sqrt(1 + c * c))
            child_keys.append(child)
    return torch.stack(zs), child_keys


@torch.no_grad()
def rollout(policy: Policy, prompts: list[str], *, plan: Plan, kernel: Kernel, schedule: Schedule | None = None,
            num_steps: int = 10, guidance_scale: float = 1.0, height: int | None = None, width: int | None = None,
            seed: int = 0, iteration: int = 0, prompt_ids: list | None = None, cond: Conditioning | None = None,
            negative_prompt: str | list[str] | None = "", record: tuple[str, ...] = (),
            initial_noise: Tensor | None = None, ode_solver: str = "euler", reduction: str = "mean",
            max_batch: int | None = None) -> Forest:
    """Sample ``plan`` for every prompt with the policy's current weights and return the recorded forest.

    ``schedule`` (default: every step SDE) decides per step whether the kernel is stochastic; ODE stretches use
    ``ode_solver`` ("euler" = the scheduler's own step, "dpm2m" = DPM-Solver++ 2M). ``record`` may hold "mean"
    (needed by RatioNorm and mean-space KL diagnostics) and "noise" (replay). ``initial_noise``
    (num_prompts * trees_per_prompt, *latent_shape) overrides the seeded initial states.
    """
    schedule = schedule or Constant()
    bad = set(record) - set(RECORDABLE)
    if bad:
        raise ValueError(f"record: unknown field(s) {sorted(bad)}; allowed {RECORDABLE}")
    if ode_solver not in ODE_SOLVERS:
        raise ValueError(f"ode_solver must be one of {ODE_SOLVERS}, got {ode_solver!r}")
    prompt_ids = list(range(len(prompts))) if prompt_ids is None else list(prompt_ids)
    if len(prompt_ids) != len(prompts):
        raise ValueError(f"{len(prompt_ids)} prompt_ids for {len(prompts)} prompts")
    device = policy.device
    grid = policy.sampling_grid(num_steps, height, width)
    kernel.check(grid)
    if ode_solver == "dpm2m" and grid.family != "flow":
        raise ValueError("ode_solver 'dpm2m' needs a flow model; DDIM models step deterministically with eta = 0")
    scales = schedule.noise_scales(num_steps, iteration)
    for k in plan.split_steps(num_steps):
        if scales[k] <= 0:
            raise ValueError(f"{type(plan).__name__} branches at step {k}, which the schedule makes deterministic: "
                             "siblings would be identical")
    cond = policy.encode(prompts, negative_prompt) if cond is None else cond
    shape = policy.latent_shape(height, width)

    # roots: trees_per_prompt per prompt, seeded by (seed, iteration, prompt id, tree)
    T = plan.trees_per_prompt
    tree_prompt = torch.arange(len(prompts)).repeat_interleave(T)
    keys = [derive_seed(seed, iteration, prompt_ids[p], j) for p in range(len(prompts)) for j in range(T)]
    if initial_noise is not None:
        if tuple(initial_noise.shape) != (len(keys), *shape):
            raise ValueError(f"initial_noise has shape {tuple(initial_noise.shape)}, expected {(len(keys), *shape)}")
        x = initial_noise.to(device, torch.float32)
    else:
        x = torch.stack([randn(shape, derive_seed(seed, iteration, prompt_ids[p], 0 if plan.shared_root else j,
                                                  "root"), device) for p in range(len(prompts)) for j in range(T)])

    nodes = {"latents": [x], "step": [torch.zeros(len(keys), dtype=torch.long)], "tree": [torch.arange(len(keys))],
             "parent": [torch.full((len(keys),), -1, dtype=torch.long)]}
    edges = {n: [] for n in ("src", "dst", "step", "sde", "scale", "std", "logp", "mean", "noise")}
    front = torch.arange(len(keys))           # node ids of the frontier
    front_tree = torch.arange(len(keys))
    n_nodes, n_edges, nfe, memory, rows = len(keys), 0, 0, None, None

    for k in range(num_steps):
        N = x.shape[0]
        pidx = tree_prompt[front_tree].to(device)
        if rows is None and (max_batch is None or N <= max_batch):  # rebuilt only when the frontier branches
            rows = policy.rows(cond, pidx, guidance_scale)
        out = _predict(policy, x, grid.timesteps[k].expand(N), cond, pidx, guidance_scale, rows, max_batch)
        nfe += N
        K, s = plan.branching(k), float(scales[k])
        if s > 0:
            kvec = torch.full((N,), k, device=device)
            mean, std = kernel.mean_std(x, out, grid, kvec, torch.full((N,), s, device=device))
            z, keys = _branch_noise(keys, k, K, plan.correlation, shape, device)
            if K > 1:
                mean, std = mean.repeat_interleave(K, 0), std.repeat_interleave(K)
            x_next = torch.addcmul(mean, std.view(-1, *[1] * len(shape)), z)
            logp = gaussian_log_prob(x_next, mean, std, reduction)
            memory = None  # a multistep ODE solver restarts after a stochastic step
            rows = rows if K == 1 else None
        else:
            if grid.family == "ddim":
                x_next, _ = kernel.mean_std(x, out, grid, torch.full((N,), k, device=device),
                                            torch.zeros(N, device=device))
            elif ode_solver == "dpm2m":
                x_next, memory = dpm_solver_2m_step(x, out, grid.sigmas[k], grid.sigmas[k + 1], memory)
            else:
                x_next = ode_euler_step(x, out, grid.sigmas[k], grid.sigmas[k + 1])
            mean, z = x_next, torch.zeros_like(x_next)
            std, logp = torch.zeros(N, device=device), torch.full((N,), float("nan"), device=device)
        M = x_next.shape[0]
        src = front.repeat_interleave(K)
        dst = torch.arange(n_nodes, n_nodes + M)
        edges["src"].append(src)
        edges["dst"].append(dst)
        edges["step"].append(torch.full((M,), k))
        edges["sde"].append(torch.full((M,), s > 0))
        edges["scale"].append(torch.full((M,), s))
        edges["std"].append(std.cpu())
        edges["logp"].append(logp.cpu())
        if "mean" in record:
            edges["mean"].append(mean)
        if "noise" in record:
            edges["noise"].append(z)
        front_tree = front_tree.repeat_interleave(K)
        nodes["latents"].append(x_next)
        nodes["step"].append(torch.full((M,), k + 1))
        nodes["tree"].append(front_tree)
        nodes["parent"].append(torch.arange(n_edges, n_edges + M))
        front, x, n_nodes, n_edges = dst, x_next, n_nodes + M, n_edges + M

    node_tree = torch.cat(nodes["tree"])
    sde = torch.cat(edges["sde"])
    return Forest(
        latents=torch.cat(nodes["latents"]), node_step=torch.cat(nodes["step"]), node_tree=node_tree,
        node_prompt=tree_prompt[node_tree], parent_edge=torch.cat(nodes["parent"]),
        src=torch.cat(edges["src"]), dst=torch.cat(edges["dst"]), edge_step=torch.cat(edges["step"]), sde=sde,
        trainable=sde.clone(), noise_scale=torch.cat(edges["scale"]), std=torch.cat(edges["std"]),
        logp_old=torch.cat(edges["logp"]),
        mean=torch.cat(edges["mean"]) if "mean" in record else None,
        noise=torch.cat(edges["noise"]) if "noise" in record else None,
        tree_prompt=tree_prompt, prompts=list(prompts), prompt_ids=prompt_ids, nfe=nfe,
        cfg_factor=policy.cfg_factor(cond, guidance_scale), grid=grid, kernel=kernel, cond=cond,
        guidance_scale=guidance_scale, reduction=reduction,
        info={"iteration": iteration, "seed": seed, "noise_scales": scales, "plan": plan, "ode_solver": ode_solver},
    )


def score_edges(policy: Policy, forest: Forest, edges: Tensor, kernel: Kernel | None = None,
                guidance_scale: float | None = None, detach_uncond: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Re-evaluate stored stochastic steps under the policy's *current* weights: (logp, mean, std) per edge.

    Gradients flow when called with grad enabled; this is the training-time log-prob. With unchanged weights it
    reproduces ``forest.logp_old[edges]`` (importance ratio 1). ``detach_uncond``: under CFG, gradients reach
    the conditional branch only.
    """
    edges = torch.as_tensor(edges, dtype=torch.long)
    if not bool(forest.sde[edges].all()):
        raise ValueError("score_edges got ODE edges: deterministic steps have no log-prob")
    kernel = kernel or forest.kernel
    guidance_scale = forest.guidance_scale if guidance_scale is None else guidance_scale
    device = policy.device
    src, dst = forest.src[edges], forest.dst[edges]
    k = forest.edge_step[edges].to(device)
    x, x_next = forest.latents[src], forest.latents[dst]
    out = policy.predict(x, forest.grid.timesteps[k], forest.cond, forest.node_prompt[src].to(device), guidance_scale,
                         detach_uncond=detach_uncond)
    mean, std = kernel.mean_std(x, out, forest.grid, k, forest.noise_scale[edges].to(device))
    return gaussian_log_prob(x_next, mean, std, forest.reduction), mean, std
