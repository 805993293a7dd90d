"""Rewards and advantages of one iteration, collectively over processes: every reward component with its retry /
timeout guards, then per-sample advantages from the all-gathered batch (so they do not depend on the sharding)
by the recipe's estimator (flowrl.core.ADVANTAGE_ESTIMATORS) or Flow-GRPO's per-prompt tracker."""
from __future__ import annotations

import torch
from accelerate.utils import gather_object

from flowrl.core import PerPromptStatTracker, combine_rewards, group_ids
from flowrl.train import guards

# the per-prompt tracker's std for each estimator it has a form of
TRACKER_STD = {"grpo": "group", "flow_grpo": "global"}


def advantages_from_rewards(components: dict, slots: torch.Tensor, weights: dict, cfg) -> torch.Tensor:
    """Per-sample advantages of a whole (all-gathered) batch; groups are the prompts' global slots."""
    a = cfg.advantages
    return combine_rewards(components, weights, group_ids(slots.tolist()), mode=cfg.rewards.combine,
                           estimator=a.estimator, eps=a.eps, clip=a.clip)


def eval_score(row: dict, weights: dict) -> float | None:
    """The reward-weighted eval score of a row that ran an eval (picks the best checkpoint), else None."""
    keys = {n: f"eval/{n}_mean" for n in weights}
    if not all(k in row for k in keys.values()):
        return None
    return sum(w * row[keys[n]] for n, w in weights.items())


class Scorer:
    def __init__(self, cfg, acc, reward, warn):
        self.cfg, self.acc, self.reward, self.warn = cfg, acc, reward, warn
        a = cfg.advantages
        self.tracker = (PerPromptStatTracker(std=TRACKER_STD[a.estimator], eps=a.eps, clip=a.clip)
                        if a.per_prompt_tracker else None)

    def score(self, images, prompts, meta, sample_prompts: list[int], groups: torch.Tensor):
        """Every reward component, retried on errors (guards.score_with_retries). Returns the scores, or None
        and the prompt ids (indices in the prompt file) of non-finite samples on any process. A reward that
        keeps failing ends the run on every process (TrainingError). Collective."""
        r = self.cfg.rewards
        scores, status, bad, failure = {}, 0, [], None
        try:
            for reward in self.reward.rewards.values():
                scores.update(guards.score_with_retries(reward, images, prompts, meta, groups, r.retries,
                                                        r.retry_backoff, r.timeout, self.warn))
        except guards.NonFiniteReward as e:
            status, bad = 1, [sample_prompts[i] for i in e.indices]
            self.warn(str(e))
        except guards.TrainingError as e:
            status, failure = 2, e
        statuses = self.acc.gather(torch.tensor([status], device=self.acc.device)).cpu()
        if int(statuses.max()) == 2:
            if failure is not None:
                raise failure
            raise guards.TrainingError(f"a reward failed on process {int(torch.argmax(statuses))} (its error is "
                                       "above)")
        if int(statuses.max()) == 1:
            return None, sorted(set(gather_object(bad)))
        return scores, None

    def advantages(self, scores: dict, slots: torch.Tensor, idx: list[int], groups: torch.Tensor | None = None):
        """Advantages for the local samples, computed on the all-gathered batch (identical for any sharding).
        With the per-prompt tracker, each prompt's reward history (keyed by its index in the prompt file) sets
        its baseline; every process updates its own identical copy. Returns (local advantages, gathered reward
        components, gathered slots, gathered advantages). ``groups`` (default: the slots) are the advantage
        groups' keys (flowrl.train.grouping)."""
        mains = self.reward.main_scores(scores)
        gathered = {k: self.acc.gather(v.to(self.acc.device)).cpu() for k, v in mains.items()}
        all_slots = self.acc.gather(slots.to(self.acc.device)).cpu()
        all_groups = all_slots if groups is None else self.acc.gather(groups.to(self.acc.device)).cpu()
        if self.tracker is not None:
            w = self.reward.weights
            total = sum(w[n] * gathered[n].to(torch.float64) for n in sorted(gathered))
            adv = self.tracker.update([idx[s] for s in all_slots.tolist()], total).to(torch.float32)
        else:
            adv = advantages_from_rewards(gathered, all_groups, self.reward.weights, self.cfg)
        n = len(slots)
        rank = self.acc.process_index
        return adv[rank * n:(rank + 1) * n], gathered, all_slots, adv
