"""The language-model training loop on accelerate, the image loop's shape with text units.

prompts (whole groups per process) -> rollout (transformers generate) -> every process's samples gathered, so the
batch is global -> rewards on the completions (components kept apart) -> DAPO's group filter and refills ->
advantages on the global batch -> each process takes an equal share of whole groups -> old / reference log-probs
where the recipe needs them -> inner epochs x updates of micro-batches (flowrl.llm.update) -> logging, eval,
checkpoints.

Why a second loop and not the image loop with a text branch: the image loop's stages (the rollout forest, decoding,
per-step units with trees, edges, windows and chunks) have no text counterpart, and the text stages (token masks,
generation, the global regrouping dynamic sampling needs) none on the image side. What carries a method is shared:
the registered estimators, policy losses, KL forms and aggregations (flowrl.core), rewards and their guards, the
scorer, prompt sampling, the run folder, checkpoints and exact resume, the stop signal and the skip rules.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import torch
from accelerate.utils import gather_object

import rewards as rewards_lib
from flowrl.core import group_stats
from flowrl.llm import evaluation
from flowrl.llm import rollout as lm_rollout
from flowrl.llm.model import build_lm, format_prompts, preflight
from flowrl.llm.run_folder import LMRunFolder
from flowrl.llm.update import backward_update, batched_logprobs, reduce_stats, sequence_kl
from flowrl.sampling.seeding import derive_seed
from flowrl.train import builders, checkpoint, guards, loop
from flowrl.train.checkpoint import LoopState
from flowrl.train.config import ConfigError
from flowrl.train.run_folder import check_run_dir
from flowrl.train.scoring import Scorer
from flowrl.train.validate import import_reward_modules

logger = logging.getLogger("flowrl")


class LMTrainer:
    """``LMTrainer(cfg).train()`` runs an ``trainer: llm`` recipe; ``resume`` as the image Trainer's."""

    def __init__(self, cfg, resume: str | checkpoint.Resume | None = None):
        self.cfg = c = cfg
        if isinstance(resume, str):
            resume = checkpoint.prepare_resume(cfg, resume)
        saved = resume.info if resume else None
        self.run_dir = Path(c.run.output_dir)
        if resume is None:
            check_run_dir(self.run_dir)
        self.train_set, self.eval_set, self.prompt_weights = builders.prompt_sets(c)
        import_reward_modules(c.rewards.modules)
        self.reward = rewards_lib.MultiReward(c.rewards.components, c.rewards.kwargs)
        self.metric = c.eval.metric or self.reward.names[0]
        if self.metric not in self.reward.names:
            raise ConfigError(f"eval.metric: {self.metric!r} is not one of the reward components {self.reward.names}")
        # tokenizer, context and every prompt's length checked before the run folder or the model exist
        self.tok, context = preflight(c, {"data.train_prompts": self.train_set.prompts,
                                          "data.eval_prompts": self.eval_set.prompts if self.eval_set else None})
        self.acc, self.folder = loop.start(c, resume, LMRunFolder, self.run_dir)
        acc = self.acc
        self.state, self.rows, self.stopped = LoopState(), [], None
        self.m = m = build_lm(c, acc, self.tok, context)
        self.scorer = Scorer(c, acc, self.reward, self._warn)
        self.folder.hold(m, [m.lr_scheduler, self.state, self.scorer.tracker])
        if resume is not None:
            self.rows = self.folder.load_checkpoint(resume.path, saved, self.state, None, self._any_process)

    # ------------------------------------------------------------------------------------------ pieces
    def _any_process(self, flag: bool) -> bool:
        return bool(self.acc.gather(torch.tensor([int(flag)], device=self.acc.device)).max())

    def _warn(self, message: str):
        who = f"[process {self.acc.process_index}] " if self.acc.num_processes > 1 else ""
        logger.warning(f"flowrl: {who}{message}")

    def _policy(self):
        return self.acc.unwrap_model(self.m.model)

    @contextlib.contextmanager
    def _reference(self):
        """The module that computes the reference policy's log-probs: the frozen copy (full fine-tuning), or the
        trained module with its LoRA adapter off."""
        if self.m.reference is not None:
            yield self.m.reference
        else:
            with self._policy().disable_adapter():
                yield self.m.model

    def evaluate(self, it: int) -> dict:
        if self.eval_set is None or not self.acc.is_main_process:
            return {}
        c, n = self.cfg, self.cfg.eval.num_prompts or len(self.eval_set)
        return evaluation.evaluate(self._policy(), self.tok, self.eval_set.prompts[:n], self.eval_set.metadata[:n],
                                   self.reward, self.metric, max_new=c.model.max_completion_tokens,
                                   chat_template=c.model.chat_template, device=self.acc.device,
                                   pass_k=c.eval.pass_k, temperature=c.generation.temperature, seed=c.eval.seed)

    # ------------------------------------------------------------------------------------------ loop
    def train(self) -> str | None:
        """The image trainer's outer loop (flowrl.train.loop) over this trainer's iterations."""
        return loop.run(self)

    @property
    def score_weights(self) -> dict:
        return {self.metric: 1.0}  # the best checkpoint is the most accurate

    def begin(self, start: int) -> None:
        if start == 0 and self.cfg.eval.every and self.eval_set is not None:  # the base, for before / after
            before = self.evaluate(-1)
            if self.acc.is_main_process:
                (self.run_dir / "eval_before.json").write_text(json.dumps(before, indent=1))

    def finish(self) -> None:
        self.folder.save_weights()

    def _draw(self, it: int, draw: int) -> tuple[list[int], lm_rollout.TextBatch, dict | None, list]:
        """One rollout round: the draw's prompts, completions scored where they were sampled, then every process's
        samples and scores gathered (the global batch, in prompt-slot order on every process). Collective."""
        c, acc = self.cfg, self.acc
        W, rank, P = acc.num_processes, acc.process_index, c.data.prompts_per_iteration
        seed = c.run.seed if draw == 0 else derive_seed(c.run.seed, "draw", draw)
        idx = builders.prompt_indices(seed, it, len(self.train_set), P, self.prompt_weights)
        local = list(range(rank * P // W, (rank + 1) * P // W))
        texts = format_prompts(self.tok, [self.train_set.prompts[idx[s]] for s in local], c.model.chat_template)
        batch = lm_rollout.rollout(self._policy(), self.tok, texts, c.generation.G, c.generation,
                                   c.model.max_completion_tokens, seed=c.run.seed, iteration=it, rank=rank, draw=draw,
                                   device=acc.device, offset=local[0])
        pid = [idx[int(s)] for s in batch.prompt]  # each sample's index in the prompt file
        completions = self.tok.batch_decode(batch.completion_ids, skip_special_tokens=True)
        meta = evaluation.with_lengths([self.train_set.metadata[i] for i in pid], batch.lengths.tolist(),
                                       batch.truncated.tolist())
        with torch.no_grad():
            scores, bad = self.scorer.score(completions, [self.train_set.prompts[i] for i in pid], meta, pid,
                                            groups=batch.prompt)
        batch = lm_rollout.concat(gather_object([batch]), self.tok.pad_token_id)  # small: token ids and masks
        pid = sum(gather_object([pid]), [])
        if scores is not None:
            scores = {k: acc.gather(v.to(acc.device)).cpu() for k, v in scores.items()}
        return pid, batch, scores, bad

    def iteration(self, it: int) -> dict:
        c, acc, t = self.cfg, self.acc, self.cfg.training
        W, rank, P, G = acc.num_processes, acc.process_index, c.data.prompts_per_iteration, c.generation.G
        t0 = time.perf_counter()
        row = {"iteration": it, "world_size": W}
        kept_batches, kept_scores, kept_pid, drawn, every = [], [], [], 0, []
        for draw in range(c.data.max_draws if c.data.dynamic_sampling else 1):
            pid, batch, scores, bad = self._draw(it, draw)
            drawn += len(batch) // G
            if scores is None:
                return self._skipped(row, "reward", bad, t0)
            slots = batch.prompt
            keep = torch.ones(len(batch), dtype=torch.bool)
            if c.data.dynamic_sampling:  # DAPO: a group whose rewards all agree carries no signal
                total = self.reward.weighted_sum(scores).double()
                keep = ~group_stats(total, slots).zero_variance[slots]
            idx = torch.nonzero(keep).flatten()
            kept_batches.append(batch.take(idx))
            kept_scores.append({k: v[idx] for k, v in scores.items()})
            every.append(scores)
            kept_pid += [pid[i] for i in idx.tolist()]
            if sum(len(b) for b in kept_batches) >= P * G:
                break
        batch = lm_rollout.concat(kept_batches, self.tok.pad_token_id)
        scores = {k: torch.cat([s[k] for s in kept_scores]) for k in kept_scores[0]}
        groups = (len(batch) // G) // W * W  # whole groups, an equal share per process
        groups = min(groups, P)
        row.update({"groups/drawn": drawn, "groups/kept": len(batch) // G, "groups/trained": groups})
        drawn_scores = {k: torch.cat([s[k] for s in every]) for k in every[0]}  # every sample, kept or not
        for k, v in drawn_scores.items():
            row[f"reward/{k}_mean"] = float(v.mean())
        row["reward/mean"] = float(self.reward.weighted_sum(drawn_scores).mean())
        row["completion/length_mean"] = float(batch.lengths.float().mean())
        row["completion/truncated_frac"] = float(batch.truncated.float().mean())
        t_rollout = time.perf_counter() - t0
        if groups == 0:
            self.state.consecutive_skips = 0
            return {**row, "time/rollout": t_rollout, "lr": self.m.lr_scheduler.get_last_lr()[0]}
        batch = batch.take(torch.arange(groups * G))
        scores = {k: v[:groups * G] for k, v in scores.items()}
        kept_pid = kept_pid[:groups * G]
        share = torch.arange(rank * groups // W * G, (rank + 1) * groups // W * G)
        mine = batch.take(share)
        logp_old = self._old_logprobs(mine)
        if t.kl_in_reward:  # r - beta * sum_t KL_t, on the sampler's tokens, before the advantages
            scores = self._kl_penalised(scores, mine, logp_old, share, len(batch))
        slot = torch.repeat_interleave(torch.arange(groups), G)
        adv, _, _, all_adv = self.scorer.advantages({k: v[share] for k, v in scores.items()}, slot[share],
                                                    kept_pid[::G])  # slot -> prompt id, for the tracker
        if t.mask_truncated:
            mine.completion_mask[mine.truncated] = 0
        stats, skip = self._optimize(mine, adv, logp_old, it, [kept_pid[i] for i in share.tolist()])
        row.update({"adv/mean": float(all_adv.mean()), "adv/std": float(all_adv.std()),
                    "adv/zero_groups": int((all_adv.reshape(groups, G).abs().amax(1) == 0).sum()), **stats,
                    "time/rollout": t_rollout, "time/train": time.perf_counter() - t0 - t_rollout})
        if skip is not None:
            return self._skipped(row, *skip, t0)
        self.state.consecutive_skips = 0
        row.update({"lr": self.m.lr_scheduler.get_last_lr()[0], "skips": self.state.skips})
        return row

    def _old_logprobs(self, mine):
        """The sampling policy's log-probs when the ratio can differ from 1 (several updates per rollout, mismatch
        weights, KL in the reward); None on-policy, where the current ones, detached, are equal."""
        c, t = self.cfg, self.cfg.training
        if t.inner_epochs * t.updates_per_epoch == 1 and c.generation.mismatch is None and not t.kl_in_reward:
            return None
        return batched_logprobs(self.m.model, mine, c.generation.temperature, self.acc.device, t.micro_batch_size)

    def _kl_penalised(self, scores, mine, logp_old, share, n):
        """The first reward component less beta * sum_t KL_t / its weight, so the weighted reward is r - beta KL."""
        t = self.cfg.training
        with self._reference() as reference:
            ref = batched_logprobs(reference, mine, self.cfg.generation.temperature, self.acc.device,
                                   t.micro_batch_size)
        full = torch.zeros(n)
        full[share] = sequence_kl(logp_old, ref, mine.completion_mask, t.kl)
        full = self.acc.reduce(full.to(self.acc.device), "sum").cpu()  # every process's share
        first = self.reward.names[0]
        return {**scores, first: scores[first] - t.kl_beta * full / self.reward.weights[first]}

    def _optimize(self, mine, adv, logp_old, it, prompt_ids):
        c, acc, t = self.cfg, self.acc, self.cfg.training
        logs: dict[str, list] = {}
        seq = torch.arange(len(mine))
        self.m.model.train(False)
        for epoch in range(t.inner_epochs):
            g = torch.Generator().manual_seed(derive_seed(c.run.seed, it, epoch, acc.process_index, "shuffle"))
            order = torch.randperm(len(mine), generator=g)
            for part in torch.tensor_split(order, t.updates_per_epoch):
                step, bad = backward_update(self.m.model, acc, mine.take(part), adv[part],
                                            None if logp_old is None else logp_old[part], seq[part], c,
                                            t.micro_batch_size, self._reference)
                norm = acc.clip_grad_norm_(self.m.params, t.max_grad_norm) if t.max_grad_norm > 0 else None
                finite = bool(torch.isfinite(norm)) if norm is not None else guards.grads_finite(self.m.params)
                if self._any_process(bool(bad) or not finite):
                    self.m.optimizer.zero_grad(set_to_none=True)
                    ids = sorted(set(gather_object([prompt_ids[int(part[i])] for i in bad])))
                    return reduce_stats(self.acc, logs), ("loss" if ids else "gradient", ids)
                self.m.optimizer.step()
                self.m.lr_scheduler.step()
                self.m.optimizer.zero_grad(set_to_none=True)
                step["grad_norm"] = [torch.tensor([float(norm) if norm is not None else float("nan")])]
                for k, v in step.items():
                    logs.setdefault(k, []).extend(v)
        return reduce_stats(self.acc, logs), None

    def _skipped(self, row, reason: str, prompt_ids, t0) -> dict:
        self.state.skips += 1
        self.state.consecutive_skips += 1
        if self.acc.is_main_process:
            logger.warning(f"flowrl: iteration {row['iteration']}: non-finite {reason} (prompt ids {prompt_ids}); "
                           f"update skipped ({self.state.consecutive_skips} in a row)")
        row.update({"skipped": reason, "skipped_prompts": prompt_ids, "skips": self.state.skips,
                    "lr": self.m.lr_scheduler.get_last_lr()[0], "time/train": time.perf_counter() - t0})
        return row
