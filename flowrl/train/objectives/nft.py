"""DiffusionNFT's objective (docs/algorithms.md §6): flow matching on the rollout's clean samples with implicit
positive and negative policies, no log-probs, any sampler.

Units are forward-process draws: each leaf at ``training.nft_timesteps`` points. Per-iteration state: v_old (the
sampling policy's velocity at every draw, recorded before the first update when an iteration makes several, or
when a soft-updated sampling policy lags the trained weights) and the base's velocity for the KL guard. The
soft-updated sampling policy (``training.nft_eta_max``) is this objective's checkpointed state.
"""
from __future__ import annotations

import dataclasses

import torch

from flowrl.core import nft_optimality
from flowrl.train import nft
from flowrl.train.config import ConfigError, TrainingConfig
from flowrl.train.objectives.base import Objective
from flowrl.train.units import Units

# keys of the log-prob objectives that mean nothing here: refused unless left at their defaults
_GRPO_ONLY = ("policy_loss", "kl", "step_weights", "chunks", "chunk_weighted", "keep_extremes", "cfg_detach_uncond",
              "drop_zero_advantage")


class NFT(Objective):
    name = "nft"

    @classmethod
    def check(cls, cfg, kernel, scales, plan):
        t = cfg.training
        defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                    for f in dataclasses.fields(TrainingConfig)}
        for key in _GRPO_ONLY:
            if getattr(t, key) != defaults[key]:
                raise ConfigError(f"training.{key}: a log-prob objective's option; training.objective nft has no "
                                  "log-prob ratio (its KL guard is the squared velocity difference, kl_beta)")
        if not (cfg.advantages.clip or 0) > 0:
            raise ConfigError("advantages.clip: nft maps advantages to optimality probabilities r = clip(A, -C, C) / "
                              "2C + 1/2 and needs a positive C")
        if kernel.family != "flow":
            raise ConfigError("training.objective: nft trains velocities on the rectified-flow forward process; it "
                              "needs a flow model and kernel (SD3, FLUX)")

    def __init__(self, cfg, policy, views):
        super().__init__(cfg, policy, views)
        t = cfg.training
        self.soft = nft.SoftPolicy(views.params, t.nft_eta_max, t.nft_eta_rate) if t.nft_eta_max > 0 else None
        if self.soft is not None:
            views.sampling_policy = self.soft

    def units(self, forest, leaf_adv, leaf_group, iteration, leaf_reward=None):
        t = self.cfg.training
        self.draws = nft.nft_units(forest, t.nft_timesteps, self.cfg.run.seed, iteration)
        K, leaves = self.draws.K, forest.leaves()
        rep = lambda x: x.repeat_interleave(K)  # noqa: E731
        return Units.make(sample=rep(torch.arange(len(leaves))), prompt=self.draws.unit_prompt,
                          group=rep(leaf_group), tree=rep(forest.node_tree[leaves]),
                          edge=torch.full((len(self.draws),), -1), step=self.draws.step, adv=rep(leaf_adv))

    def _v_at(self, forest, mb, guided):
        draw = nft.forward_process(self.draws, mb, forest.grid, self.policy.device)  # x0, noise, t, steps, prompt
        gs = self.cfg.sampling.guidance_scale
        return nft.velocity(self.policy, forest.cond, *draw, gs, guided), draw

    def _every_unit(self, forest, guided, view):
        mbs = torch.split(torch.arange(len(self.draws)), self.cfg.training.micro_batch_size)
        with torch.no_grad(), self.views.autocast(), self.views.use(view):
            return torch.cat([self._v_at(forest, mb, guided)[0] for mb in mbs])

    def prepare(self, forest, units, iteration):
        t = self.cfg.training
        self.r = nft_optimality(units.adv, self.cfg.advantages.clip)
        several = t.inner_epochs * t.updates_per_epoch > 1
        self.v_old = (self._every_unit(forest, t.nft_guided, "sampling")
                      if self.soft is not None or several else None)
        # the base's velocity at a unit's draw is fixed for the iteration: once for all updates, not once per update
        self.v_ref = self._every_unit(forest, True, "reference") if t.kl_beta > 0 and several else None

    def forward_passes(self, forest, units, mb):
        """One velocity per unit (two under nft_guided CFG); the KL's guided velocity adds the other branch."""
        t = self.cfg.training
        guided = self.cfg.sampling.guidance_scale > 1
        per = (2 if t.nft_guided and guided else 1) + (1 if t.kl_beta > 0 and guided and not t.nft_guided else 0)
        return len(mb) * per

    def loss(self, forest, units, mb):
        t, gs = self.cfg.training, self.cfg.sampling.guidance_scale
        v, draw = self._v_at(forest, mb, t.nft_guided)
        x0, noise, tt = draw[:3]
        old = v.detach() if self.v_old is None else self.v_old[mb]
        loss, s = nft.nft_loss(v, old, x0, noise, tt, self.r[mb].to(v.device), t.nft_beta, t.nft_adaptive_weight)
        stats = {"loss": loss.detach(), **s}
        if t.kl_beta > 0:
            # penalty toward the base weights on the velocity the sampler uses (guided under CFG): the
            # conditional one alone would leave the unconditional branch, which LoRA also moves, free to drift
            v_pol = v if t.nft_guided else nft.guide(self.policy, forest.cond, *draw, gs, v)
            if self.v_ref is None:
                with torch.no_grad(), self.views.use("reference"):
                    ref = self._v_at(forest, mb, guided=True)[0]
            else:
                ref = self.v_ref[mb]
            kl = (v_pol - ref).pow(2).reshape(len(mb), -1).mean(1)
            loss = loss + t.kl_beta * kl
            stats["kl"] = kl.detach()
        return loss, stats

    def end_iteration(self, iteration):
        if self.soft is None:
            return {}
        self.soft.update(self.views.params, iteration)
        return {"nft_eta": self.soft.eta(iteration)}

    def state(self):
        return [self.soft] if self.soft is not None else []
