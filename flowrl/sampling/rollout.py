"""Run a plan against a policy and record the forest; re-score recorded steps under current weights.

One model call per step covers every frontier node of every tree of every prompt (split into ``max_batch``
chunks only if asked). Noise is drawn per node from generators seeded by the node's identity (run seed,
iteration, prompt id, tree, branch path, step), so the forest does not depend on how prompts are batched.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from flowrl.sampling.forest import Forest
from flowrl.sampling.kernels import Kernel, dpm_solver_2m_step, gaussian_log_prob, ode_euler_step
from flowrl.sampling.plans import Plan
from flowrl.sampling.policy import Conditioning, Policy
from flowrl.sampling.schedules import Constant, Schedule
from flowrl.sampling.seeding import derive_seed, randn
from flowrl.sampling.solvers import PostWindow, dpm_solver_pp_step, lam

RECORDABLE = ("mean", "noise")
ODE_SOLVERS = ("euler", "dpm2m")


def _predict(policy: Policy, x, timesteps, cond, prompt_idx, guidance_scale, rows, max_batch):
    if max_batch is None or x.shape[0] <= max_batch:
        return policy.predict(x, timesteps, cond, prompt_idx, guidance_scale, rows=rows)
    return torch.cat([policy.predict(x[i:i + max_batch], timesteps[i:i + max_batch], cond,
                                     prompt_idx[i:i + max_batch], guidance_scale)
                      for i in range(0, x.shape[0], max_batch)])


def child_scale(kind: str, scale: float, peak: float) -> float:
    """The noise scale of a child of ``kind`` at a step whose schedule scale is ``scale`` (``peak``: the largest
    scale of the iteration, used by a plan that forces a step the schedule leaves ODE to be stochastic)."""
    if kind == "ode":
        return 0.0
    if kind == "sde":
        return scale if scale > 0 else peak
    return scale


def check_plan(plan: Plan, scales: Tensor, num_steps: int, iteration: int = 0) -> list[dict]:
    """The plan's children per step, checked against the schedule: siblings only at stochastic steps (else they
    would be identical), a scale for every stochastic child. Raises ValueError naming the step."""
    peak = float(scales.max()) if len(scales) else 0.0
    specs = [plan.expand(k, num_steps, iteration) for k in range(num_steps)]
    for k, spec in enumerate(specs):
        for children in spec.values():
            for c in children:
                s = child_scale(c.kind, float(scales[k]), peak)
                if c.count > 1 and s <= 0:
                    raise ValueError(f"{type(plan).__name__} branches at step {k}, which the schedule makes "
                                     "deterministic: siblings would be identical")
                if c.kind == "sde" and s <= 0:
                    raise ValueError(f"{type(plan).__name__} makes step {k} stochastic, but the schedule gives no "
                                     "noise scale this iteration (use a constant schedule with these plans)")
    return specs


def _children(spec: dict, roles: list[int], keys: list[int], step: int, scales: Tensor, peak: float,
              c: float | None, shape, device):
    """Every frontier node's children, in node order: (parent row, noise scale, role, lineage key) per child,
    and the standard noise of the stochastic ones (stacked, in child order).

    A node whose only child is stochastic continues its own noise stream (chains). Otherwise each stochastic
    child b draws z_b = (z_0 + c n_b) / sqrt(1 + c^2), shared z_0 and private n_b (c None: z_b = n_b), so every
    child is marginally N(0, I); ODE children keep the node's key.
    """
    par, scl, role, ckeys, zs = [], [], [], [], []
    for i, (r, key) in enumerate(zip(roles, keys)):
        kids = [(child_scale(ch.kind, float(scales[step]), peak), ch.role) for ch in spec.get(r, [])
                for _ in range(ch.count)]
        n_sde = sum(s > 0 for s, _ in kids)
        z0 = (randn(shape, derive_seed(key, step, "shared"), device) if c is not None and n_sde > 1 else None)
        b = 0
        for s, child_role in kids:
            par.append(i)
            scl.append(s)
            role.append(child_role)
            if s <= 0:
                ckeys.append(key)
            elif len(kids) == 1:
                zs.append(randn(shape, derive_seed(key, step), device))
                ckeys.append(key)
            else:
                child = derive_seed(key, step, b)
                n_b = randn(shape, child, device)
                zs.append(n_b if z0 is None else (z0 + c * n_b) / math.sqrt(1 + c * c))
                ckeys.append(child)
                b += 1
    return par, scl, role, ckeys, zs


@torch.no_grad()
def rollout(policy: Policy, prompts: list[str], *, plan: Plan, kernel: Kernel, schedule: Schedule | None = None,
            num_steps: int = 10, guidance_scale: float = 1.0, height: int | None = None, width: int | None = None,
            seed: int = 0, iteration: int = 0, prompt_ids: list | None = None, cond: Conditioning | None = None,
            negative_prompt: str | list[str] | None = "", record: tuple[str, ...] = (),
            initial_noise: Tensor | None = None, ode_solver: str = "euler", reduction: str = "mean",
            max_batch: int | None = None, post_window: PostWindow | None = None,
            before_step: Callable[[int], None] | None = None, images: list | None = None) -> Forest:
    """Sample ``plan`` for every prompt with the policy's current weights and return the recorded forest.

    ``schedule`` (default: every step SDE) decides per step whether the kernel is stochastic; ODE stretches use
    ``ode_solver`` ("euler" = the scheduler's own step, "dpm2m" = DPM-Solver++ 2M). ``record`` may hold "mean"
    (needed by RatioNorm and mean-space KL diagnostics) and "noise" (replay). ``initial_noise``
    (num_prompts * trees_per_prompt, *latent_shape) overrides the seeded initial states. ``post_window``
    (MixGRPO-Flash) re-discretises the grid after the last stochastic step and solves the rest with DPM-Solver++:
    the forest's grid is then the spliced one, with fewer steps. ``before_step(k)`` is called before the model
    call of step k (e.g. to switch weights: MixGRPO's hybrid sampling). ``images``: one input image per prompt
    for editing models (``policy.needs_image``).
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
    specs = check_plan(plan, scales, num_steps, iteration)
    if ode_solver == "dpm2m" and not plan.homogeneous:
        raise ValueError(f"ode_solver 'dpm2m' keeps one multistep memory per chain; {type(plan).__name__} mixes "
                         "stochastic and ODE children in one step: use 'euler'")
    tail_from = None  # with post_window: the first step of the re-discretised tail
    if post_window is not None:
        grid, scales, tail_from = _post_window_grid(policy, plan, grid, scales, post_window, ode_solver, height,
                                                    width)
        num_steps = grid.num_steps
        specs = check_plan(plan, scales, num_steps, iteration)
    peak = float(scales.max())
    cond = policy.conditioning(prompts, negative_prompt, images) if cond is None else cond
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
    roles = [plan.root_role] * len(keys)
    n_nodes, n_edges, nfe, memory, rows = len(keys), 0, 0, None, None
    history = ()  # post_window: (data prediction, lambda) of the frontier's latest states, oldest first

    for k in range(num_steps):
        N = x.shape[0]
        pidx = tree_prompt[front_tree].to(device)
        if before_step is not None:
            before_step(k)
        if rows is None and (max_batch is None or N <= max_batch):  # rebuilt only when the frontier changes
            rows = policy.rows(cond, pidx, guidance_scale)
        out = _predict(policy, x, grid.timesteps[k].expand(N), cond, pidx, guidance_scale, rows, max_batch)
        nfe += N
        par, scl, roles, keys, zs = _children(specs[k], roles, keys, k, scales, peak, plan.correlation, shape,
                                              device)
        par_t = torch.tensor(par, dtype=torch.long)
        scale_t = torch.tensor(scl, dtype=torch.float32)
        sde = scale_t > 0
        M = len(par)
        one_to_one = M == N and bool((par_t == torch.arange(N)).all())
        x_next = torch.empty((M, *shape), device=device, dtype=x.dtype)
        mean = torch.empty_like(x_next)
        std = torch.zeros(M, device=device)
        logp = torch.full((M,), float("nan"), device=device)
        z = torch.zeros_like(x_next)
        if bool(sde.any()):
            rows_s = par_t[sde].to(device)
            if bool(sde.all()) and one_to_one:
                xs, outs = x, out
            else:
                xs, outs = x[rows_s], out[rows_s]
            m, sd = kernel.mean_std(xs, outs, grid, torch.full((len(rows_s),), k, device=device),
                                    scale_t[sde].to(device))
            zs = torch.stack(zs)
            xn = torch.addcmul(m, sd.view(-1, *[1] * len(shape)), zs)
            idx = torch.nonzero(sde).flatten().to(device)
            x_next[idx], mean[idx], std[idx], z[idx] = xn, m, sd, zs
            logp[idx] = gaussian_log_prob(xn, m, sd, reduction)
            memory = None  # a multistep ODE solver restarts after a stochastic step
        if not bool(sde.all()):
            rows_o = par_t[~sde].to(device)
            xo, outo = (x, out) if (not bool(sde.any()) and one_to_one) else (x[rows_o], out[rows_o])
            n_o = len(rows_o)
            if grid.family == "ddim":
                xn, _ = kernel.mean_std(xo, outo, grid, torch.full((n_o,), k, device=device),
                                        torch.zeros(n_o, device=device))
            elif tail_from is not None and k >= tail_from:
                xn, m_tail = dpm_solver_pp_step(xo, outo, grid.sigmas[k], grid.sigmas[k + 1], history,
                                                post_window.order, post_window.solver_type,
                                                post_window.max_order(k, num_steps))
            elif ode_solver == "dpm2m":
                xn, memory = dpm_solver_2m_step(xo, outo, grid.sigmas[k], grid.sigmas[k + 1], memory)
            else:
                xn = ode_euler_step(xo, outo, grid.sigmas[k], grid.sigmas[k + 1])
            idx = torch.nonzero(~sde).flatten().to(device)
            x_next[idx], mean[idx] = xn.to(x_next.dtype), xn.to(x_next.dtype)
        if tail_from is not None:  # every step's data prediction joins the history, per child
            restart = post_window.history == "restart" and k < tail_from and bool(sde.any())
            m0 = m_tail if k >= tail_from else x.float() - grid.sigmas[k] * out.float()  # the solver's own
            entry = (m0 if one_to_one else m0[par_t.to(device)], lam(grid.sigmas[k]))
            history = () if restart else tuple(h if one_to_one else (h[0][par_t.to(device)], h[1])
                                               for h in history[-1:]) + (entry,)
        if not one_to_one:
            rows = None
        src = front[par_t]
        dst = torch.arange(n_nodes, n_nodes + M)
        edges["src"].append(src)
        edges["dst"].append(dst)
        edges["step"].append(torch.full((M,), k))
        edges["sde"].append(sde)
        edges["scale"].append(scale_t)
        edges["std"].append(std.cpu())
        edges["logp"].append(logp.cpu())
        if "mean" in record:
            edges["mean"].append(mean)
        if "noise" in record:
            edges["noise"].append(z)
        front_tree = front_tree[par_t]
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
        info={"iteration": iteration, "seed": seed, "noise_scales": scales, "plan": plan, "ode_solver": ode_solver,
              "post_window": post_window, "tail_from": tail_from},
    )


def _post_window_grid(policy: Policy, plan: Plan, grid, scales: Tensor, post: PostWindow, ode_solver: str,
                      height, width):
    """MixGRPO-Flash's grid: the rollout's own up to t_{l+1} (l the last stochastic step), then the tail of
    post.points(S, l) points; the tail's steps are ODE. Returns (grid, scales, first tail step), or the inputs
    and None when the window ends at the last step (nothing to compress)."""
    if grid.family != "flow":
        raise ValueError("post_window re-discretises a flow grid; DDIM models keep the scheduler's")
    if ode_solver != "euler":
        raise ValueError("post_window solves the tail with its own DPM-Solver++ and keeps the Euler step before it: "
                         f"ode_solver must be 'euler', got {ode_solver!r}")
    if plan.owns_noise:
        raise ValueError(f"post_window needs the schedule to decide the stochastic steps; {type(plan).__name__} "
                         "decides them itself")
    sde = torch.nonzero(scales > 0).flatten()
    if len(sde) == 0:
        raise ValueError("post_window: the schedule makes no step stochastic this iteration, so there is no window")
    S, last = len(scales), int(sde[-1])
    if last == S - 1:
        return grid, scales, None
    tail = policy.tail_grid(float(grid.sigmas[last + 1]), post.points(S, last), height, width)
    spliced = grid.splice(last + 1, tail)
    return spliced, torch.cat([scales[:last + 1], torch.zeros(spliced.num_steps - last - 1)]), last + 1


def parent_calls(src: Tensor) -> tuple[Tensor, Tensor | None]:
    """The distinct parent states of ``src`` and each edge's index among them, or (src, None) when no two edges
    share a parent (chains: the batch is left as it is)."""
    parents, inverse = torch.unique(src, return_inverse=True)
    return (src, None) if len(parents) == len(src) else (parents, inverse)


def score_edges(policy: Policy, forest: Forest, edges: Tensor, kernel: Kernel | None = None,
                guidance_scale: float | None = None, detach_uncond: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Re-evaluate stored stochastic steps under the policy's *current* weights: (logp, mean, std) per edge.

    Gradients flow when called with grad enabled; this is the training-time log-prob. With unchanged weights it
    reproduces ``forest.logp_old[edges]`` (importance ratio 1). ``detach_uncond``: under CFG, gradients reach
    the conditional branch only. Siblings (edges from one node) share one model call: the velocity at their
    parent is computed once and each child's log-prob is taken from it (TreeGRPO's "several policy updates per
    forward pass").
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
    parents, inverse = parent_calls(src)
    if inverse is None:
        out = policy.predict(x, forest.grid.timesteps[k], forest.cond, forest.node_prompt[src].to(device),
                             guidance_scale, detach_uncond=detach_uncond)
    else:
        kp = forest.node_step[parents].to(device)  # a state at grid step k is the start of step k
        out = policy.predict(forest.latents[parents], forest.grid.timesteps[kp], forest.cond,
                             forest.node_prompt[parents].to(device), guidance_scale,
                             detach_uncond=detach_uncond)[inverse.to(device)]
    mean, std = kernel.mean_std(x, out, forest.grid, k, forest.noise_scale[edges].to(device))
    return gaussian_log_prob(x_next, mean, std, forest.reduction), mean, std
