"""A recipe's per-iteration cost before anything loads (``flowrl plan CONFIG``).

The recipe's own plan, schedule and objective run on a stand-in policy with an exact velocity and no network
(flowrl.sampling.analytic), so the forest's shape, the trained units (selection, pruning, siblings) and the
training forward passes are those the run will have; only the values differ. Per iteration, for the whole
global batch: rollout model evaluations (a CFG pair counts once) and forward passes, edges, stochastic edges,
leaves, trained units and the training forward passes with gradient (each has its backward) over all updates.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from flowrl.models.families import FAMILIES
from flowrl.sampling import rollout
from flowrl.sampling.analytic import GaussianFlowPolicy
from flowrl.train import builders
from flowrl.train.objectives import OBJECTIVES
from flowrl.train.units import micro_batches, window_stats

COLUMNS = ("rollout calls", "forward passes", "edges", "stochastic", "leaves", "trained units", "train forward",
           "SDE window", "grid steps")


def cfg_passes(cfg) -> int:
    """Forward passes per model evaluation: 2 under classifier-free guidance (the families with a
    ``true_cfg_scale`` option, FLUX and Kontext, take guidance as an embedding: 2 only with true CFG)."""
    family = builders.model_family(cfg.model.path)
    true_cfg = "true_cfg_scale" in FAMILIES[family].options if family in FAMILIES else "flux" in cfg.model.path.lower()
    if true_cfg:  # an unknown family is a hub id not cached here: guessed from its name
        return 2 if cfg.model.true_cfg_scale > 1 else 1
    return 2 if cfg.sampling.guidance_scale > 1 else 1


def iteration_costs(cfg, iteration: int) -> dict:
    s, t = cfg.sampling, cfg.training
    P = cfg.data.prompts_per_iteration
    policy = GaussianFlowPolicy(torch.zeros(P, 1))
    plan, kernel = builders.make_plan(s.plan, cfg.run.seed), builders.make_kernel(s.kernel)
    if kernel.family != "flow":  # the stand-in is a flow model; the forest's shape does not depend on the kernel
        kernel = builders.make_kernel({"name": "flow_sde"})
    schedule = builders.make_schedule(s.schedule, cfg.run.seed)
    views = SimpleNamespace(params=list(policy.denoiser.parameters()))  # what an objective's constructor reads
    objective = OBJECTIVES[t.objective](cfg, policy, views)
    forest = rollout(policy, [f"p{i}" for i in range(P)], plan=plan, kernel=kernel, schedule=schedule,
                     num_steps=s.num_steps, guidance_scale=1.0, seed=cfg.run.seed, iteration=iteration,
                     record=objective.record, post_window=builders.make_post_window(s.post_window))
    cfg_factor = cfg_passes(cfg)
    forest.cfg_factor = cfg_factor
    leaves = forest.leaves()
    g = torch.Generator().manual_seed(iteration)
    adv = torch.randn(len(leaves), generator=g)  # counts do not depend on the values
    slots = forest.node_prompt[leaves]
    units = objective.units(forest, adv, slots, iteration, adv)
    passes = 0
    for epoch in range(t.inner_epochs):
        for batches in micro_batches(units, t.updates_per_epoch, t.micro_batch_size, cfg.run.seed, iteration,
                                     epoch, 0, t.rerange):
            passes += sum(objective.forward_passes(forest, units, mb) for mb in batches)
    w = window_stats(forest)
    return dict(zip(COLUMNS, (forest.nfe, forest.nfe * cfg_factor, forest.num_edges, int(forest.sde.sum()),
                              len(leaves), len(units), passes, f"[{w['window/start']}, {w['window/end']})",
                              w["sampling/steps"])))


def report(cfg, iterations: int = 3) -> str:
    s = cfg.sampling
    P = cfg.data.prompts_per_iteration
    plan = builders.make_plan(s.plan, cfg.run.seed)
    params = ", ".join(f"{k} {v}" for k, v in s.plan.items() if k != "name")
    lines = [f"plan {s.plan['name']} ({params}), {s.num_steps} steps, guidance {s.guidance_scale}, {P} prompts per "
             f"iteration, objective {cfg.training.objective}; per iteration, all prompts:",
             "iteration | " + " | ".join(COLUMNS)]
    for it in range(iterations):
        row = iteration_costs(cfg, it)
        lines.append(f"{it} | " + " | ".join(str(row[c]) for c in COLUMNS))
    scales = builders.make_schedule(s.schedule, cfg.run.seed).noise_scales(s.num_steps, 0)
    post = builders.make_post_window(s.post_window)
    if post is not None:  # the count on the spliced grid: the window's steps, then the tail's ODE steps
        last = int(torch.nonzero(scales > 0).flatten()[-1])
        if last < s.num_steps - 1:
            scales = torch.cat([scales[:last + 1], torch.zeros(post.points(s.num_steps, last) - 1)])
    cost = plan.cost(len(scales), 0, scales)
    lines.append(f"per tree at iteration 0 (the plan's own count): {cost.nfe} model evaluations, {cost.edges} "
                 f"edges ({cost.sde_edges} stochastic), {cost.leaves} leaf(s), {cost.branching_nodes} "
                 f"branching node(s); {plan.trees_per_prompt} tree(s) per prompt")
    if s.schedule.get("name") == "sliding":
        lines.append(window_path(builders.make_schedule(s.schedule, cfg.run.seed), s.num_steps, cfg.run.iterations))
    if post is not None:
        lines.append(f"post-window tail (MixGRPO-Flash): ratio {post.ratio}, DPM-Solver++ order {post.order} "
                     f"({post.solver_type}), history {post.history}; grid steps per iteration in the table")
    if cfg.training.drop_zero_advantage:
        lines.append("trained units include those a zero advantage leaves out of the loss (data-dependent)")
    return "\n".join(lines)


def window_path(schedule, num_steps: int, iterations: int) -> str:
    """The sliding window's starts over the run, as runs of iterations."""
    if schedule.strategy == "random":
        last = schedule.bound(num_steps) - schedule.size
        return f"sliding window: size {schedule.size}, start drawn uniformly in 0..{last} each iteration"
    runs, prev = [], None
    for it in range(iterations):
        start = schedule.window_start(num_steps, it)
        if start != prev:
            runs.append([start, it, it])
            prev = start
        else:
            runs[-1][2] = it
    shown = ", ".join(f"{s} ({a}-{b})" for s, a, b in runs[:12]) + (", ..." if len(runs) > 12 else "")
    return (f"sliding window ({schedule.strategy}, size {schedule.size}): start (iterations) over the "
            f"{iterations} iterations: {shown}")
