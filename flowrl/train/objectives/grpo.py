"""The GRPO family's objective: a registered policy loss on the stored SDE steps' exact log-probs (Flow-GRPO,
DanceGRPO, GRPO-Guard, Chunk-GRPO / GCPO and the window variants; docs/algorithms.md §6).

Units are the trainable edges of the forest, each with its trajectory's credited advantage. Options, each a
recipe key: a fraction of steps (or of chunks) per trajectory, chunk-level ratios (micro-batches keep a chunk
whole), the k/2 best and k/2 worst samples of a group, step weights, zero-advantage samples left out of the loss,
the unconditional branch detached in the CFG re-score, and a KL form toward the base weights.
"""
from __future__ import annotations

import math

import torch

from flowrl.core import KL_FORMS, POLICY_LOSSES, kl_estimator
from flowrl.core.chunks import (
    adaptive_chunks,
    chunk_weights,
    fixed_chunks,
    sample_chunks,
    step_l1_change,
    uniform_chunks,
)
from flowrl.sampling import Flat, Forest, parent_calls, score_edges
from flowrl.sampling.kernels import gaussian_log_prob
from flowrl.train import builders, grouping, pruning
from flowrl.train.config import ConfigError
from flowrl.train.credit import CREDIT, credit_spec, edge_advantages
from flowrl.train.objectives.base import Objective
from flowrl.train.units import Units, select_steps, tree_generator

CHUNKINGS = {"fixed": ("sizes",), "uniform": ("size",), "adaptive": ("max_size",)}
STEP_WEIGHTS = ("uniform", "inverse_dt", "noise_aware")


class GRPO(Objective):
    name = "grpo"

    @classmethod
    def check(cls, cfg, kernel, scales, plan):
        t, a = cfg.training, cfg.advantages
        if not bool((scales > 0).any()):
            raise ConfigError("sampling.schedule: no stochastic step, nothing to train")
        name, _ = credit_spec(a.credit)
        credit = CREDIT[name]
        if not isinstance(plan, credit.plans):
            raise ConfigError(f"sampling.plan: {cfg.sampling.plan['name']} cannot be trained by training.objective "
                              f"grpo with advantages.credit {name} (it credits "
                              f"{' / '.join(p.__name__ for p in credit.plans)} plans"
                              + (": an edge shared by several leaves has no single trajectory advantage)"
                                 if name == "broadcast" else ")"))
        problem = grouping.check(a.group, plan)
        if problem:
            raise ConfigError(problem)
        if not isinstance(plan, Flat) and (t.chunks is not None or t.keep_extremes):
            raise ConfigError(f"training.{'chunks' if t.chunks is not None else 'keep_extremes'}: works on a flat "
                              f"plan's trajectories; {cfg.sampling.plan['name']} makes trees")
        if t.prune is not None:
            pruning.check(t.prune, plan.split_steps(cfg.sampling.num_steps))
        if t.policy_loss not in POLICY_LOSSES:
            raise ConfigError(f"training.policy_loss: {t.policy_loss!r} is not one of {sorted(POLICY_LOSSES)}")
        if POLICY_LOSSES[t.policy_loss].sequence_level:  # micro-batches cut trajectories apart
            raise ConfigError(f"training.policy_loss: {t.policy_loss} needs whole sequences per micro-batch, which "
                              "image steps are not; for one ratio per trajectory (GSPO's) use training.chunks: "
                              "{name: uniform, size: <sampling.num_steps>} with policy_loss clip")
        if t.kl is not None and t.kl not in KL_FORMS:
            raise ConfigError(f"training.kl: {t.kl!r} is not one of {sorted(KL_FORMS)}")
        if t.step_weights not in STEP_WEIGHTS:
            raise ConfigError(f"training.step_weights: {t.step_weights!r} is not one of {list(STEP_WEIGHTS)}")
        if t.step_weights == "inverse_dt" and kernel.family != "flow":
            raise ConfigError("training.step_weights: inverse_dt needs a flow model's sampling grid")
        if t.kl == "flow_grpo" and kernel.family != "flow":
            raise ConfigError("training.kl: flow_grpo scales by the step length h_k of a flow model's grid")
        if t.keep_extremes < 0 or t.keep_extremes % 2:
            raise ConfigError(f"training.keep_extremes: an even number of samples (k/2 best, k/2 worst) or 0, got "
                              f"{t.keep_extremes}")
        if t.keep_extremes and t.keep_extremes > getattr(plan, "G", t.keep_extremes):
            raise ConfigError(f"training.keep_extremes: {t.keep_extremes} is more than the group size G = {plan.G}")
        if t.chunks is not None:
            chunking(t.chunks, int((scales > 0).sum()))
        elif t.chunk_weighted:
            raise ConfigError("training.chunk_weighted: needs training.chunks")
        if cfg.finetune.merged_sampling:
            # the ratio compares the rollout's log-probs with the update's unmerged forward: the two must be the
            # same computation, and merged weights round differently (visibly so in bf16)
            raise ConfigError("finetune.merged_sampling: needs training.objective nft (GRPO's ratio needs the "
                              "rollout's log-probs from the same unmerged forward as the update)")
        if t.nft_eta_max > 0:
            raise ConfigError("training.nft_eta_max: a soft-updated sampling policy is DiffusionNFT's (objective: "
                              "nft); grpo's log-prob ratios need rollouts from the weights of the iteration's start")

    def __init__(self, cfg, policy, views):
        super().__init__(cfg, policy, views)
        t = cfg.training
        self.policy_loss = POLICY_LOSSES[t.policy_loss]
        self.record = tuple(self.policy_loss.requires)
        self.kl = KL_FORMS[t.kl or "gaussian"] if t.kl_beta > 0 else None
        plan = builders.make_plan(cfg.sampling.plan)
        self.prune = pruning.check(t.prune, plan.split_steps(cfg.sampling.num_steps)) if t.prune else None

    # ------------------------------------------------------------------------------------------ units
    def units(self, forest: Forest, leaf_adv, leaf_group, iteration, leaf_reward=None):
        c, t = self.cfg, self.cfg.training
        edge_adv = edge_advantages(c.advantages.credit, forest, leaf_adv, leaf_reward)
        leaves = forest.leaves()
        sample_of_tree = torch.full((forest.num_trees,), -1, dtype=torch.long)
        for i, tree in reversed(list(enumerate(forest.node_tree[leaves].tolist()))):
            sample_of_tree[tree] = i  # a tree's first leaf (a chain has one)
        edges = forest.trainable_edges()
        if t.keep_extremes:
            chosen = extremes(leaf_adv, leaf_group, t.keep_extremes)
            edges = edges[chosen[sample_of_tree[forest.node_tree[forest.src[edges]]]]]
        edges = pruning.prune(forest, edges, edge_adv, self.prune, iteration, c.run.iterations)
        chunk, block = None, None
        if t.chunks is None:
            edges = select_steps(forest, edges, t.timestep_fraction, c.run.seed, iteration)
            _, siblings = parent_calls(forest.src[edges])
            block = siblings  # edges from one node stay in one micro-batch: one model call for all of them
        else:
            edges, chunk = self._chunks(forest, edges, iteration)
            block = chunk
        tree = forest.node_tree[forest.src[edges]]
        sample = sample_of_tree[tree]
        adv = edge_adv[edges]
        keep = (adv != 0).float() if t.drop_zero_advantage else None
        return Units.make(sample=sample, prompt=forest.node_prompt[forest.src[edges]], group=leaf_group[sample],
                          tree=tree, edge=edges, step=forest.edge_step[edges], adv=adv, chunk=chunk,
                          weight=self._step_weights(forest, edges, tree), keep=keep, block=block)

    def _chunks(self, forest, edges, iteration):
        """Each trajectory's trained steps cut into chunks; ceil(fraction * K) of its K chunks drawn per tree
        (uniformly, or weighted by their mean relative L1 change). Returns the kept edges and global chunk ids."""
        t = self.cfg.training
        tree_of_edge = forest.node_tree[forest.src[edges]]
        kept, ids, next_id = [], [], 0
        for tree in torch.unique(tree_of_edge).tolist():
            own = edges[tree_of_edge == tree]  # ascending: step order along the chain
            l1 = step_l1_change(forest.latents[forest.src[own]], forest.latents[forest.dst[own]])
            local = chunking(t.chunks, len(own), l1)
            K = int(local.max()) + 1
            n = max(1, math.ceil(t.timestep_fraction * K))
            gen = tree_generator(forest, tree, self.cfg.run.seed, iteration)
            pick = sample_chunks(K, n, gen, chunk_weights(l1, local) if t.chunk_weighted else None)
            mask = torch.isin(local, pick)
            kept.append(own[mask])
            ids.append(local[mask] + next_id)
            next_id += K
        return torch.cat(kept), torch.cat(ids)

    def _step_weights(self, forest, edges, tree):
        w = self.cfg.training.step_weights
        if w == "uniform":
            return None
        if w == "inverse_dt":  # GRPO-Guard's gradient reweighting, 1 / h_k as the reference applies it
            k = forest.edge_step[edges]
            return 1.0 / (forest.grid.sigmas[k] - forest.grid.sigmas[k + 1]).float().cpu()
        s = forest.std[edges].float()  # noise_aware (TempFlow): proportional to s_k, mean 1 per trajectory
        mean = torch.zeros(forest.num_trees).index_add(0, tree, s) / torch.bincount(tree, minlength=forest.num_trees
                                                                                     ).clamp(min=1)
        return s / mean[tree]

    # ------------------------------------------------------------------------------------------ loss
    def forward_passes(self, forest, units, mb):
        """One call per distinct parent state (siblings share it), both CFG branches re-scored."""
        return len(torch.unique(forest.src[units.edge[mb]])) * forest.cfg_factor

    def loss(self, forest, units, mb):
        t = self.cfg.training
        e = units.edge[mb]
        logp, mean, std = score_edges(self.policy, forest, e, detach_uncond=t.cfg_detach_uncond)
        extra = {}
        if "mean" in self.record:
            extra = {"mean": mean, "mean_old": forest.mean[e].to(mean.device), "std": std}
        loss, s = self.policy_loss(logp, forest.logp_old[e].to(logp.device), units.adv[mb].to(logp.device),
                                   eps_low=t.clip_eps_low, eps_high=t.clip_eps_high,
                                   chunk_ids=units.chunk[mb].to(logp.device) if t.chunks is not None else None,
                                   **extra)
        stats = {"loss": loss.detach(), "clip_frac": s["clip_frac"], "approx_kl": s["approx_kl"],
                 "ratio_mean": s["ratio_mean"], "ratio_min": s["ratio_min"], "ratio_max": s["ratio_max"]}
        if t.step_weights != "uniform":
            loss = loss * units.weight[mb].to(loss)
        if self.kl is not None:
            with torch.no_grad(), self.views.use("reference"):
                _, mean_ref, _ = score_edges(self.policy, forest, e)
            k = forest.edge_step[e]
            h = (forest.grid.sigmas[k] - forest.grid.sigmas[k + 1]).to(std) if forest.grid.sigmas is not None else None
            logp_ref = gaussian_log_prob(forest.latents[forest.dst[e]].to(std.device), mean_ref, std, forest.reduction)
            kl = self.kl(logp=logp, logp_ref=logp_ref, mean=mean, mean_ref=mean_ref, std=std, h=h)
            loss = loss + t.kl_beta * kl
            stats["kl"] = kl.detach()
        if t.kl_old_beta > 0:  # MixGRPO's "KL": to the rollout's policy, from the log-probs already at hand
            kl_old = kl_estimator(logp, forest.logp_old[e].to(logp.device), "k2")
            loss = loss + t.kl_old_beta * kl_old
            stats["kl_old"] = kl_old.detach()
        return loss, stats


def extremes(adv, group, k: int):
    """(L,) bool: per group the k/2 samples with the highest and the k/2 with the lowest advantage (DanceGRPO's
    best-of-N selection; ties broken by sample order)."""
    keep = torch.zeros(len(adv), dtype=torch.bool)
    for g in torch.unique(group).tolist():
        own = torch.nonzero(group == g).flatten()
        order = own[torch.sort(adv[own], stable=True).indices]
        keep[order[:k // 2]] = True
        keep[order[len(order) - k // 2:]] = True
    return keep


def chunking(spec: dict, n: int, l1=None):
    """Chunk index of each of a trajectory's ``n`` trained steps from a ``training.chunks`` spec; with ``l1`` None
    only checks the spec (config time)."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in CHUNKINGS:
        raise ConfigError(f"training.chunks.name: {name!r} is not one of {sorted(CHUNKINGS)}")
    unknown, missing = set(spec) - set(CHUNKINGS[name]), set(CHUNKINGS[name]) - set(spec)
    if unknown or (missing and name != "adaptive"):  # adaptive's max_size has a default
        raise ConfigError(f"training.chunks: {name} takes {list(CHUNKINGS[name])}, got {sorted(spec)}")
    try:
        if name == "fixed":
            return fixed_chunks(n, spec["sizes"])
        if name == "uniform":
            return uniform_chunks(n, spec["size"])
        if l1 is None:
            return adaptive_chunks(torch.linspace(1, 0, n), **spec)
        return adaptive_chunks(l1, **spec)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"training.chunks: {e} (the schedule trains {n} steps per trajectory)") from None
