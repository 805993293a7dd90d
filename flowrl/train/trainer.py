"""One training loop for every method (docs/design.md, "One iteration"), on accelerate.

prompts (whole groups per process) -> rollout (no grad, the sampling weights) -> rewards (components kept apart)
-> advantages (on the all-gathered batch: identical however prompts are sharded) -> the objective's training
units -> inner epochs x updates of micro-batches: the objective's loss, backward, clipping, step -> the
objective's end-of-iteration state, EMA, logging, eval, checkpoints. The loop never names a method: what is
trained and how is the objective's (flowrl.train.objectives), chosen by ``training.objective``.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

import torch
from accelerate.utils import gather_object

import rewards as rewards_lib
from flowrl.sampling import rollout
from flowrl.train import builders, checkpoint, grouping, guards, loop
from flowrl.train.checkpoint import LoopState
from flowrl.train.config import Config
from flowrl.train.evaluation import GRID_IMAGES, Evaluator
from flowrl.train.images import save_grid
from flowrl.train.objectives import OBJECTIVES
from flowrl.train.run_folder import RunFolder, check_run_dir
from flowrl.train.scoring import Scorer
from flowrl.train.setup import build_model
from flowrl.train.units import aggregation, iteration_costs, micro_batches
from flowrl.train.weights import WeightViews

logger = logging.getLogger("flowrl")


class Trainer:
    """``Trainer(cfg).train()`` runs a recipe; ``Trainer(cfg, resume="latest" | RUN_DIR | CHECKPOINT)`` continues
    the same experiment from a checkpoint (checkpoint.py says what may change)."""

    def __init__(self, cfg: Config, resume: str | checkpoint.Resume | None = None):
        self.cfg = c = cfg
        if isinstance(resume, str):  # checked before anything is built or written
            resume = checkpoint.prepare_resume(cfg, resume)
        saved = resume.info if resume else None
        self.resume_from = resume.path if resume else None
        self.run_dir = Path(c.run.output_dir)
        if resume is None:
            check_run_dir(self.run_dir)
        self.train_set, self.eval_set, self.prompt_weights = builders.prompt_sets(c)
        self.reward = rewards_lib.MultiReward(c.rewards.components, c.rewards.kwargs)
        self.acc, self.folder = loop.start(c, resume, RunFolder, self.run_dir)
        acc = self.acc
        self.kernel, self.plan, self.schedule, self.post_window = builders.make_sampler(c, acc.process_index)
        self.state, self.rows, self.stopped = LoopState(), [], None  # stopped: (signal, checkpoint)
        m = build_model(c, acc, builders.model_family(c.model.path))
        self.pipe, self.policy, self.model, self.params = m.pipe, m.policy, m.model, m.params
        self.optimizer, self.lr_scheduler, self.ema = m.optimizer, m.lr_scheduler, m.ema
        self.views = WeightViews(self.policy, self.model, acc.unwrap_model, self.params, ema=m.ema,
                                 reference=m.reference, merged_sampling=c.finetune.merged_sampling,
                                 autocast=acc.autocast)
        self.objective = OBJECTIVES[c.training.objective](c, self.policy, self.views)
        self.scorer = Scorer(c, acc, self.reward, self._warn)
        self.evaluator = Evaluator(c, acc, self.policy, self.kernel, self.views, self.eval_set, self._decode,
                                   self.scorer.score, self._warn, self.run_dir)
        self.folder.hold(m, [self.lr_scheduler, self.state, self.ema, self.scorer.tracker, *self.objective.state()])
        if resume is not None:
            self.rows = self.folder.load_checkpoint(resume.path, saved, self.state, self.ema, self._any_process)

    # ------------------------------------------------------------------------------------------ pieces
    def _decode(self, latents):
        step = self.cfg.sampling.max_batch or len(latents)
        return torch.cat([self.policy.decode(latents[i:i + step]) for i in range(0, len(latents), step)])

    def _rollout(self, prompts, prompt_ids, iteration, meta=None):
        """``meta``: the prompts' rows (editing models read their input images from it)."""
        c = self.cfg
        rows = meta if meta is not None else [{} for _ in prompts]
        images = builders.prompt_images(rows, "data.train_prompts") if self.policy.needs_image else None
        with self.acc.autocast():
            return rollout(self.policy, prompts, plan=self.plan, kernel=self.kernel, schedule=self.schedule,
                           num_steps=c.sampling.num_steps, guidance_scale=c.sampling.guidance_scale,
                           height=c.model.height, width=c.model.width, seed=c.run.seed, iteration=iteration,
                           prompt_ids=prompt_ids, negative_prompt=c.sampling.negative_prompt,
                           ode_solver=c.sampling.ode_solver, reduction=c.training.log_prob_reduction,
                           max_batch=c.sampling.max_batch, record=self.objective.record,
                           post_window=self.post_window, images=images)

    def evaluate(self, it: int) -> dict:
        return self.evaluator.evaluate(it)

    def _any_process(self, flag: bool) -> bool:
        return bool(self.acc.gather(torch.tensor([int(flag)], device=self.acc.device)).max())

    def _warn(self, message: str):
        who = f"[process {self.acc.process_index}] " if self.acc.num_processes > 1 else ""
        logger.warning(f"flowrl: {who}{message}")

    # ------------------------------------------------------------------------------------------ loop
    def train(self) -> str | None:
        """Iterations from the loop state's to run.iterations (flowrl.train.loop): returns the stop signal's name
        when one ended the run early, with a checkpoint, else None."""
        return loop.run(self)

    @property
    def score_weights(self) -> dict:
        return self.reward.weights

    def begin(self, start: int) -> None:
        self.evaluator.begin(start)

    def finish(self) -> None:
        self.evaluator.before_after()
        self.folder.save_weights(self.views, self.rows)

    def iteration(self, it: int) -> dict:
        c, acc = self.cfg, self.acc
        W, rank, P = acc.num_processes, acc.process_index, c.data.prompts_per_iteration
        idx = builders.prompt_indices(c.run.seed, it, len(self.train_set), P, self.prompt_weights)
        local = list(range(rank * P // W, (rank + 1) * P // W))  # global slots of this process
        prompts = [self.train_set.prompts[idx[s]] for s in local]
        meta = [self.train_set.metadata[idx[s]] for s in local]
        prompt_ids = [idx[s] for s in local]  # each local prompt's index in the prompt file

        t0 = time.perf_counter()
        with self.views.use("sampling"):
            forest = self._rollout(prompts, local, it, meta)
        t_rollout = time.perf_counter() - t0
        leaves = forest.leaves()
        leaf_prompt = forest.node_prompt[leaves].tolist()
        slots = torch.tensor([local[p] for p in leaf_prompt])
        with torch.no_grad():
            images = self._decode(forest.latents[leaves])  # groups: a pairwise reward compares a prompt's samples
            scores, bad = self.scorer.score(images, [prompts[p] for p in leaf_prompt], [meta[p] for p in leaf_prompt],
                                            [prompt_ids[p] for p in leaf_prompt], groups=slots)
        row = {"iteration": it, "world_size": W}
        if scores is None:
            return self._skipped(row, "reward", bad, forest, t0, t_rollout)
        groups = grouping.advantage_groups(forest, slots, c.advantages.group)  # the prompt slots, or finer
        leaf_adv, gathered, all_slots, all_adv = self.scorer.advantages(scores, slots, idx, groups)
        t_reward = time.perf_counter() - t0 - t_rollout
        for k, v in gathered.items():
            row[f"reward/{k}_mean"], row[f"reward/{k}_std"] = float(v.mean()), float(v.std())
        for k, v in scores.items():  # extras (e.g. geneval/correct): logged, never in the advantage
            if k not in gathered:
                row[f"reward/{k}_mean"] = float(acc.gather(v.to(acc.device)).mean())
        row["reward/mean"] = float(self.reward.weighted_sum(gathered).mean())
        if not bool(torch.isfinite(all_adv).all()):  # the same verdict on every process: the batch is gathered
            bad = sorted({idx[int(s)] for s in all_slots[~torch.isfinite(all_adv)]})
            return self._skipped(row, "advantage", bad, forest, t0, t_rollout)
        if c.run.dump_advantages and acc.is_main_process:
            self.folder.dump_advantages(it, gathered, all_slots, all_adv)
        if c.run.log_samples_every and (it + 1) % c.run.log_samples_every == 0 and acc.is_main_process:
            save_grid(images[:GRID_IMAGES], self.run_dir / "samples" / f"train_{it:06d}.png")

        units = self.objective.units(forest, leaf_adv, groups, it, self.reward.weighted_sum(scores).cpu())
        self.objective.prepare(forest, units, it)
        stats, skip = self._optimize(forest, units, it, prompt_ids)
        t_train = time.perf_counter() - t0 - t_rollout - t_reward
        row.update({"adv/mean": float(all_adv.mean()), "adv/std": float(all_adv.std()),
                    "adv/abs_mean": float(all_adv.abs().mean()),
                    "adv/zero_groups": int(sum(float(all_adv[all_slots == s].abs().max()) == 0
                                               for s in all_slots.unique()))})
        row.update({**stats, **iteration_costs(self.acc, forest, units, self._train_passes)})
        row.update({"time/rollout": t_rollout, "time/reward": t_reward, "time/train": t_train})
        if skip is not None:
            return self._skipped(row, *skip, forest, t0, t_rollout)
        self.state.consecutive_skips = 0
        row.update(self.objective.end_iteration(it))  # after the updates, like the EMA (a skipped one leaves it)
        row.update({"lr": self.lr_scheduler.get_last_lr()[0], "skips": self.state.skips, "nfe": self._nfe(forest)})
        return row

    def _skipped(self, row, reason: str, prompt_ids: list[int], forest, t0, t_rollout) -> dict:
        """A row for an iteration whose update was skipped (non-finite reward / advantage / loss / gradient): the
        failing optimizer step, and any left in the iteration, never reach the weights, the optimizer, the LR
        schedule or the EMA (with updates_per_epoch or inner_epochs > 1, earlier steps of the iteration stand)."""
        self.state.skips += 1
        self.state.consecutive_skips += 1
        where = f"prompt ids {prompt_ids}" if prompt_ids else "not attributable to a prompt"
        if self.acc.is_main_process:  # a collective decision: said once
            logger.warning(f"flowrl: iteration {row['iteration']}: non-finite {reason} ({where}); update skipped "
                           f"({self.state.consecutive_skips} in a row, the run stops at "
                           f"{self.cfg.training.max_consecutive_skips})")
        row.update({"skipped": reason, "skipped_prompts": prompt_ids, "skips": self.state.skips,
                    "lr": self.lr_scheduler.get_last_lr()[0], "nfe": self._nfe(forest)})
        row.setdefault("time/rollout", t_rollout)
        row.setdefault("time/train", time.perf_counter() - t0 - t_rollout)
        return row

    def _nfe(self, forest) -> int:
        return int(self.acc.gather(torch.tensor([forest.forward_passes], device=self.acc.device)).sum())

    def _optimize(self, forest, units, it, prompt_ids):
        """Inner epochs x updates of micro-batches of the objective's units. An update whose loss (on any process)
        or gradient is non-finite is not applied, and the iteration's remaining updates are dropped: returns the
        stats of the applied updates and None, or ("loss" | "gradient", prompt ids) for the skip."""
        c, acc, t = self.cfg, self.acc, self.cfg.training
        counts = acc.gather(torch.tensor([len(units)], device=acc.device))
        if bool((counts != counts[0]).any()):
            raise RuntimeError(f"processes hold different numbers of training units {counts.tolist()}")
        logs: dict[str, list] = {}
        self._train_passes = 0
        # the model stays in eval mode: dropout would make the recomputed log-prob differ from the rollout's
        with self.views.use("train"):
            for epoch in range(t.inner_epochs):
                for batches in micro_batches(units, t.updates_per_epoch, t.micro_batch_size, c.run.seed, it, epoch,
                                             acc.process_index, t.rerange):
                    update = torch.cat(batches)
                    weights, denom = aggregation(units, update, t.aggregation, self.cfg.sampling.num_steps)
                    # global denominator: the sum over micro-batches and processes (DDP averages equal shares) is
                    # the update's aggregate, whatever the micro-batch size or process count
                    denom = float(acc.gather(torch.tensor([float(denom)], device=acc.device)).sum()) / acc.num_processes
                    denom = denom or 1.0  # every unit of the update left out: a zero loss
                    step_logs: dict[str, list] = {}
                    bad_units, start = [], 0
                    for j, mb in enumerate(batches):
                        sync = contextlib.nullcontext() if j == len(batches) - 1 else acc.no_sync(self.model)
                        w = weights[start:start + len(mb)]
                        start += len(mb)
                        with sync, acc.autocast():
                            loss, s = self.objective.loss(forest, units, mb)
                            self._train_passes += self.objective.forward_passes(forest, units, mb)
                            acc.backward((loss * w.to(loss)).sum() / denom)
                        bad_units += mb[~torch.isfinite(loss.detach().cpu())].tolist()
                        for k, v in s.items():
                            step_logs.setdefault(k, []).append(v.detach().float().reshape(-1))
                    grad_norm = acc.clip_grad_norm_(self.params, t.max_grad_norm) if t.max_grad_norm > 0 else None
                    finite = (bool(torch.isfinite(grad_norm)) if grad_norm is not None
                              else guards.grads_finite(self.params))
                    if self._any_process(bool(bad_units) or not finite):
                        if acc.scaler is not None:  # fp16: clipping unscaled; update() lowers the scale, resets
                            acc.scaler.update()
                        self.optimizer.zero_grad(set_to_none=True)
                        ids = sorted(set(gather_object([prompt_ids[int(units.prompt[u])] for u in bad_units])))
                        return self._reduce_logs(logs), ("loss" if ids else "gradient", ids)
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    if self.ema is not None:
                        self.ema.step(self.params)
                    step_logs["grad_norm"] = [torch.tensor([float(grad_norm) if grad_norm is not None else math.nan])]
                    for k, v in step_logs.items():
                        logs.setdefault(k, []).extend(v)
        return self._reduce_logs(logs), None

    def _reduce_logs(self, logs: dict) -> dict:
        out = {}
        for k, v in logs.items():
            vals = self.acc.gather(torch.cat(v).to(self.acc.device)).cpu()
            out[k] = float(vals.min() if k == "ratio_min" else vals.max() if k == "ratio_max" else vals.mean())
        return out
