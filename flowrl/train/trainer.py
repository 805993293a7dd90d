"""One training loop for every method (DESIGN.md, "One training iteration"), on accelerate.

prompts (whole groups per process) -> rollout (no grad) -> rewards (components kept apart) -> advantages (on
the all-gathered batch: identical however prompts are sharded) -> trainable units in micro-batches -> inner
epochs of log-prob recompute + clipped loss (+ KL to the base) -> backward / accumulation / clipping / step
-> EMA, logging, eval, checkpoints.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

import rewards as rewards_lib
from flowrl.core import (
    PerPromptStatTracker,
    clipped_surrogate,
    combine_rewards,
    group_ids,
    kl_gaussian_mean,
)
from flowrl.models import FAMILY_OF_PIPELINE, load_pipeline, policy_from_pipeline
from flowrl.sampling import Constant, Flat, rollout, score_edges
from flowrl.sampling.seeding import derive_seed
from flowrl.train import builders, checkpoint, finetune, guards, nft
from flowrl.train.checkpoint import LOGS, LoopState
from flowrl.train.config import Config, ConfigError, to_dict
from flowrl.train.images import load_grid, save_grid
from flowrl.train.plots import reward_curve
from flowrl.train.units import broadcast_advantages, select_units, shuffle_units

RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints", "lora", "model")
GRID_IMAGES = 32
BEFORE_AFTER = 8  # eval prompts in the before / after grid
LOOK_CELL = 128   # px: grids meant for people (eval, before / after) enlarge smaller images to this
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
logger = logging.getLogger("flowrl")


def spread(n: int, total: int) -> list[int]:
    """n indices evenly spaced over a prompt file of ``total``: prompt files are often grouped by task (GenEval's
    metadata, the shapes world), and the first n prompts would all be of one or two tasks."""
    n = min(n, total)
    return [i * total // n for i in range(n)]


def check_run_dir(path: Path) -> None:
    """Refuse to write into a folder that already holds a run (resuming is explicit, never implied)."""
    if path.exists() and any((path / m).exists() for m in RUN_MARKERS):
        raise ConfigError(f"run.output_dir: {path} already holds a run; choose a new folder")


def prompt_indices(seed: int, iteration: int, total: int, n: int, weights: torch.Tensor | None = None) -> list[int]:
    """The iteration's n global prompt indices, seeded by (seed, iteration) so every process and any resumed run
    agree without shared state: a fresh permutation per iteration, or with ``weights`` a weighted draw without
    replacement (e.g. balanced over GenEval categories)."""
    g = torch.Generator().manual_seed(derive_seed(seed, "prompts", iteration))
    if weights is not None:
        return torch.multinomial(weights, n, replacement=n > total, generator=g).tolist()
    perms = [torch.randperm(total, generator=g) for _ in range(math.ceil(n / total))]
    return torch.cat(perms)[:n].tolist()


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def advantages_from_rewards(components: dict, slots: torch.Tensor, weights: dict, cfg: Config) -> torch.Tensor:
    """Per-sample advantages of a whole (all-gathered) batch; groups are the prompts' global slots."""
    a = cfg.advantages
    return combine_rewards(components, weights, group_ids(slots.tolist()), mode=cfg.rewards.combine, std=a.std,
                           eps=a.eps, clip=a.clip)


class Trainer:
    """``Trainer(cfg).train()`` runs a recipe; ``Trainer(cfg, resume="latest" | RUN_DIR | CHECKPOINT)`` continues
    the same experiment from a checkpoint (checkpoint.py says what may change)."""

    def __init__(self, cfg: Config, resume: str | checkpoint.Resume | None = None):
        self.cfg = cfg
        if isinstance(resume, str):  # checked before anything is built or written
            resume = checkpoint.prepare_resume(cfg, resume)
        self.resume_from = resume.path if resume else None
        saved = resume.info if resume else None
        self.run_dir = Path(cfg.run.output_dir)
        if resume is None:
            check_run_dir(self.run_dir)
        self.family = builders.model_family(cfg.model.path)
        self.train_set = builders.load_prompts(cfg.data.train_prompts)
        self.eval_set = (builders.load_prompts(cfg.data.eval_prompts, "data.eval_prompts")
                         if cfg.data.eval_prompts else None)
        self.prompt_weights = (builders.balance_weights(self.train_set.metadata, cfg.data.balance_key,
                                                        cfg.data.balance_weights) if cfg.data.balance_key else None)
        self.kernel = builders.make_kernel(cfg.sampling.kernel)
        self.schedule = builders.make_schedule(cfg.sampling.schedule, cfg.run.seed)
        self.plan = builders.make_plan(cfg.sampling.plan)
        if not isinstance(self.plan, Flat):
            raise ConfigError("sampling.plan: the trainer's advantage estimator (broadcast) needs a flat plan")
        self.reward = rewards_lib.MultiReward(cfg.rewards.components, cfg.rewards.kwargs)

        # without CUDA, accelerate only forms a (gloo) process group when told it runs on CPU; otherwise each
        # launched process silently trains alone
        self.acc = Accelerator(mixed_precision=cfg.run.mixed_precision, log_with="tensorboard",
                               project_dir=str(self.run_dir), cpu=not torch.cuda.is_available())
        W = self.acc.num_processes
        if cfg.data.prompts_per_iteration % W:
            raise ConfigError(f"data.prompts_per_iteration ({cfg.data.prompts_per_iteration}) must divide by the "
                              f"number of processes ({W}): every process takes whole prompt groups")
        if saved is not None and saved["world_size"] != W:
            raise ConfigError(f"--resume: {self.resume_from} was written by {saved['world_size']} process(es), "
                              f"this run has {W}: each process's random state is in the checkpoint, so the "
                              "number must stay")
        if self.acc.is_main_process:
            for note in resume.notes if resume else []:
                print(f"flowrl: {note}")
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        # a resumed run's TensorBoard hides the events a crash left beyond the checkpoint
        start = saved["iteration"] if saved else 0
        self.acc.init_trackers("tb", init_kwargs={"tensorboard": {"purge_step": start}} if saved else None)
        self.state = LoopState()
        self.rows: list[dict] = []
        self.stopped: tuple[str, Path] | None = None  # (signal, checkpoint) when a stop signal ended train()
        self._build_model()
        if self.resume_from is not None:
            self._load_checkpoint(saved)

    # ------------------------------------------------------------------------------------------ model
    def _build_model(self):
        cfg = self.cfg
        set_seed(cfg.run.seed)  # module initialisers (LoRA's gaussian A) draw from the global generators
        self.pipe = load_pipeline(cfg.model.path, DTYPES[cfg.model.dtype]).to(self.acc.device)
        # a hub id validated online is resolved only now
        self.family = FAMILY_OF_PIPELINE.get(type(self.pipe).__name__, self.family)
        kw = {"max_sequence_length": cfg.model.max_sequence_length} if self.family != "sd" else {}
        if self.family == "flux":
            kw["true_cfg_scale"] = cfg.model.true_cfg_scale
        self.policy = policy_from_pipeline(self.pipe, **kw)
        denoiser = self.policy.denoiser
        if cfg.finetune.mode == "lora":
            self.lora_config = finetune.add_lora(denoiser, self.family, cfg.finetune.lora_rank,
                                                 cfg.finetune.lora_alpha, cfg.finetune.lora_target_modules,
                                                 cfg.finetune.lora_dropout)
            self.reference = None
        else:
            denoiser.float().requires_grad_(True)
            self.reference = finetune.frozen_copy(denoiser) if cfg.training.kl_beta > 0 else None
        if cfg.finetune.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        self.params = finetune.trainable_parameters(denoiser)
        t = cfg.training
        optimizer = torch.optim.AdamW(self.params, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps,
                                      weight_decay=t.weight_decay)
        # the scheduler counts optimizer steps; the config counts iterations
        steps = t.inner_epochs * t.updates_per_epoch
        scheduler = get_scheduler("constant_with_warmup" if t.lr_schedule == "constant" else t.lr_schedule, optimizer,
                                  num_warmup_steps=t.warmup_iterations * steps,
                                  num_training_steps=cfg.run.iterations * steps)
        # the pipeline keeps the plain module for rollouts; training goes through the (DDP-)wrapped twin
        # the scheduler stays unprepared: accelerate would step it once per process, changing warmup with W
        self.model, self.optimizer = self.acc.prepare(denoiser, optimizer)
        self.lr_scheduler = scheduler
        self.ema = EMAModel(self.params, decay=cfg.finetune.ema_decay) if cfg.finetune.ema_decay > 0 else None
        self.sampler = (nft.SoftPolicy(self.params, t.nft_eta_max, t.nft_eta_rate)
                        if t.objective == "nft" and t.nft_eta_max > 0 else None)
        a = cfg.advantages
        self.tracker = PerPromptStatTracker(std=a.std, eps=a.eps, clip=a.clip) if a.per_prompt_tracker else None
        # everything else a checkpoint must restore, in a fixed order (accelerate numbers the files by it)
        for obj in (self.lr_scheduler, self.state, self.ema, self.tracker, self.sampler):
            if obj is not None:
                self.acc.register_for_checkpointing(obj)
        # sharded engines (DeepSpeed, FSDP) keep accelerate's own model files, which know the shards
        if cfg.finetune.mode == "lora" and self.acc.distributed_type not in (DistributedType.DEEPSPEED,
                                                                             DistributedType.FSDP):
            self.acc.register_save_state_pre_hook(self._save_lora_hook)
            self.acc.register_load_state_pre_hook(self._load_lora_hook)

    # ------------------------------------------------------------------------------------------ checkpoints
    def _save_lora_hook(self, models, weights, output_dir):
        """LoRA checkpoints hold the adapter (a diffusers LoRA file, loadable on its own), not the frozen base."""
        weights.clear()
        if self.acc.is_main_process:
            finetune.save_lora(self.pipe, self.acc.unwrap_model(self.model), self.family, self.lora_config,
                               Path(output_dir))

    def _load_lora_hook(self, models, input_dir):
        models.clear()  # accelerate would look for the full model's weights
        finetune.load_lora(self.acc.unwrap_model(self.model), self.family, Path(input_dir))

    def _save_checkpoint(self, iteration: int, eval_score: float | None) -> Path:
        """Write ``checkpoints/iter_NNNNNN`` atomically (checkpoint.py), then prune old ones. Collective."""
        acc, root = self.acc, self.run_dir / "checkpoints"
        final = root / checkpoint.checkpoint_name(iteration)
        tmp = root / f".tmp-{final.name}"
        if acc.is_main_process:
            self.state.log_bytes = {}
            for name in LOGS:  # the logs' lengths now: a resume cuts them back to these
                if (self.run_dir / name).exists():
                    with open(self.run_dir / name, "ab") as f:
                        os.fsync(f.fileno())
                    self.state.log_bytes[name] = (self.run_dir / name).stat().st_size
            checkpoint.remove(tmp)
            root.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            checkpoint.seal(tmp, {"iteration": iteration, "world_size": acc.num_processes, "eval_score": eval_score,
                                  "config": to_dict(self.cfg), "data": checkpoint.data_digests(self.cfg)})
            checkpoint.publish(tmp, final)
            checkpoint.prune(root, self.cfg.run.keep_checkpoints)
        acc.wait_for_everyone()
        return final

    def _load_checkpoint(self, saved: dict):
        acc = self.acc
        acc.load_state(str(self.resume_from))
        if self.ema is not None:
            self.ema.to(acc.device)  # accelerate loads registered objects onto the CPU
        if self.state.iteration != saved["iteration"]:
            raise ConfigError(f"--resume: {self.resume_from} holds loop state for iteration {self.state.iteration}, "
                              f"its marker says {saved['iteration']}")
        problem = None
        if acc.is_main_process:
            try:
                self._rewind_run_folder()
            except ConfigError as e:
                problem = e
        if self._any_process(problem is not None):  # every process fails, none waits for the main one forever
            raise problem or ConfigError("--resume: the main process could not rewind the run folder")

    def _rewind_run_folder(self):
        """Back to the checkpoint: logs cut to their length then (rows after it are recomputed, never
        duplicated), checkpoints of a later history removed."""
        for name in LOGS:
            path = self.run_dir / name
            if name in self.state.log_bytes:
                checkpoint.truncate_log(path, self.state.log_bytes[name])
            elif path.exists():
                path.unlink()
        self.rows = read_rows(self.run_dir / "metrics.jsonl")
        if [r["iteration"] for r in self.rows] != list(range(self.state.iteration)):
            raise ConfigError(f"--resume: {self.run_dir / 'metrics.jsonl'} does not hold one row per iteration "
                              f"0..{self.state.iteration - 1}")
        for it, path in checkpoint.scan(self.run_dir / "checkpoints")[0]:
            if it > self.state.iteration:
                print(f"flowrl: removing {path.name}, newer than the checkpoint resumed from")
                checkpoint.remove(path)

    @contextlib.contextmanager
    def _training_forward(self):
        plain = self.policy.denoiser
        self.policy.denoiser = self.model
        try:
            yield
        finally:
            self.policy.denoiser = plain

    # ------------------------------------------------------------------------------------------ pieces
    def _decode(self, latents):
        step = self.cfg.sampling.max_batch or len(latents)
        return torch.cat([self.policy.decode(latents[i:i + step]) for i in range(0, len(latents), step)])

    def _rollout(self, prompts, prompt_ids, iteration):
        c = self.cfg
        with self.acc.autocast():
            return rollout(self.policy, prompts, plan=self.plan, kernel=self.kernel, schedule=self.schedule,
                           num_steps=c.sampling.num_steps, guidance_scale=c.sampling.guidance_scale,
                           height=c.model.height, width=c.model.width, seed=c.run.seed, iteration=iteration,
                           prompt_ids=prompt_ids, negative_prompt=c.sampling.negative_prompt,
                           ode_solver=c.sampling.ode_solver, reduction=c.training.log_prob_reduction,
                           max_batch=c.sampling.max_batch)

    def _advantages(self, scores: dict, slots: torch.Tensor, idx: list[int]):
        """Advantages for the local leaves, computed on the all-gathered batch (so identical for any sharding).
        With the per-prompt tracker, each prompt's reward history (keyed by its index in the prompt file) sets
        its baseline; every process updates its own identical copy."""
        mains = self.reward.main_scores(scores)
        gathered = {k: self.acc.gather(v.to(self.acc.device)).cpu() for k, v in mains.items()}
        all_slots = self.acc.gather(slots.to(self.acc.device)).cpu()
        if self.tracker is not None:
            w = self.reward.weights
            total = sum(w[n] * gathered[n].to(torch.float64) for n in sorted(gathered))
            adv = self.tracker.update([idx[s] for s in all_slots.tolist()], total).to(torch.float32)
        else:
            adv = advantages_from_rewards(gathered, all_slots, self.reward.weights, self.cfg)
        n = len(slots)
        rank = self.acc.process_index
        return adv[rank * n:(rank + 1) * n], gathered, all_slots, adv

    def _score(self, images, prompts, meta, sample_prompts: list[int], groups: torch.Tensor):
        """Every reward component, retried on errors (guards.score_with_retries). Returns the scores, or None
        and the prompt ids (indices in the prompt file) of non-finite samples on any process. A reward that
        keeps failing ends the run on every process (TrainingError). Collective."""
        r = self.cfg.rewards
        scores, status, bad, failure = {}, 0, [], None
        try:
            for reward in self.reward.rewards.values():
                scores.update(guards.score_with_retries(reward, images, prompts, meta, groups, r.retries,
                                                        r.retry_backoff, r.timeout, self._warn))
        except guards.NonFiniteReward as e:
            status, bad = 1, [sample_prompts[i] for i in e.indices]
            self._warn(str(e))
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

    def _any_process(self, flag: bool) -> bool:
        return bool(self.acc.gather(torch.tensor([int(flag)], device=self.acc.device)).max())

    def _warn(self, message: str):
        who = f"[process {self.acc.process_index}] " if self.acc.num_processes > 1 else ""
        logger.warning(f"flowrl: {who}{message}")

    # ------------------------------------------------------------------------------------------ loop
    def train(self) -> str | None:
        """Iterations from the loop state's to run.iterations, a checkpoint every run.save_every and at the end.
        A stop signal ends the run after the iteration in progress, with a checkpoint: returns its name then."""
        c, acc = self.cfg, self.acc
        start = self.state.iteration
        bar = tqdm(range(start, c.run.iterations), initial=start, total=c.run.iterations, desc="flowrl train",
                   disable=not (c.run.progress and acc.is_main_process))
        self._before = None
        if self.eval_set is not None and acc.is_main_process:
            before = self.run_dir / "samples" / "before.png"
            n = min(BEFORE_AFTER, len(self.eval_set))
            if start == 0:
                self._before = self._eval_images(spread(n, len(self.eval_set)))
                save_grid(self._before, before, cols=n)
            elif before.is_file():
                self._before = load_grid(before, n)
        stop = guards.StopSignal().install()
        try:
            for it in bar:
                row = self.iteration(it)
                if c.eval.every and self.eval_set is not None and ((it + 1) % c.eval.every == 0
                                                                   or it + 1 == c.run.iterations):
                    row.update(self.evaluate(it))
                self.rows.append(row)
                if acc.is_main_process:
                    with open(self.run_dir / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(row) + "\n")
                    if "loss" in row:
                        bar.set_postfix(reward=f"{row['reward/mean']:.4f}", loss=f"{row['loss']:.2e}")
                acc.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=it)
                self.state.iteration = it + 1
                # every process stops at the same one; a signal during the last iteration just lets the run finish
                stopping = self._any_process(stop.received is not None) and it + 1 < c.run.iterations
                failing = self.state.consecutive_skips >= c.training.max_consecutive_skips
                if (stopping or failing or it + 1 == c.run.iterations
                        or (c.run.save_every and (it + 1) % c.run.save_every == 0)):
                    saved = self._save_checkpoint(it + 1, self._eval_score(row))
                if failing:
                    raise guards.TrainingError(
                        f"{self.state.consecutive_skips} iterations in a row skipped for non-finite values (the "
                        f"last: {row['skipped']}, prompt ids {row['skipped_prompts']}); the weights of the last "
                        f"good update are in {saved}")
                if stopping:
                    self.stopped = (stop.received or "a stop signal to another process", saved)
                    acc.wait_for_everyone()
                    if acc.is_main_process:
                        reward_curve(self.rows, self.run_dir / "reward_curve.png")
                    acc.end_training()
                    return self.stopped[0]
        finally:
            stop.uninstall()
        self.finish()
        return None

    def _eval_score(self, row: dict) -> float | None:
        """The reward-weighted eval score of the row's iteration, if it ran an eval (picks the best checkpoint)."""
        keys = {n: f"eval/{n}_mean" for n in self.reward.weights}
        if not all(k in row for k in keys.values()):
            return None
        return sum(w * row[keys[n]] for n, w in self.reward.weights.items())

    def iteration(self, it: int) -> dict:
        c, acc = self.cfg, self.acc
        W, rank = acc.num_processes, acc.process_index
        P = c.data.prompts_per_iteration
        idx = prompt_indices(c.run.seed, it, len(self.train_set), P, self.prompt_weights)
        local = list(range(rank * P // W, (rank + 1) * P // W))  # global slots of this process
        prompts = [self.train_set.prompts[idx[s]] for s in local]
        meta = [self.train_set.metadata[idx[s]] for s in local]
        prompt_ids = [idx[s] for s in local]  # each local prompt's index in the prompt file

        t0 = time.perf_counter()
        with self._sampling_weights():
            forest = self._rollout(prompts, local, it)
        t_rollout = time.perf_counter() - t0
        leaves = forest.leaves()
        leaf_prompt = forest.node_prompt[leaves].tolist()
        slots = torch.tensor([local[p] for p in leaf_prompt])
        with torch.no_grad():
            images = self._decode(forest.latents[leaves])
            # groups: pairwise rewards (Pref-GRPO) compare the samples of one prompt, all on this process
            scores, bad = self._score(images, [prompts[p] for p in leaf_prompt], [meta[p] for p in leaf_prompt],
                                      [prompt_ids[p] for p in leaf_prompt], groups=slots)
        row = {"iteration": it, "world_size": acc.num_processes}
        if scores is None:
            return self._skipped(row, "reward", bad, forest, t0, t_rollout)
        leaf_adv, gathered, all_slots, all_adv = self._advantages(scores, slots, idx)
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
            self._dump_advantages(it, gathered, all_slots, all_adv)
        if c.run.log_samples_every and (it + 1) % c.run.log_samples_every == 0 and acc.is_main_process:
            save_grid(images[:GRID_IMAGES], self.run_dir / "samples" / f"train_{it:06d}.png")

        if c.training.objective == "nft":
            nft_units = nft.nft_units(forest, c.training.nft_timesteps, c.run.seed, it)
            units, unit_prompt = torch.arange(len(nft_units)), nft_units.unit_prompt
            unit_adv = leaf_adv.repeat_interleave(nft_units.K)
            loss_fn = nft.loss_fn(self.policy, forest, nft_units, unit_adv, c, self._reference, self.acc.autocast,
                                  self._sampling_weights if self.sampler is not None else None, self._merged)
        else:  # grpo: the trainable SDE steps, each with its trajectory's advantage
            units = select_units(forest, c.training.timestep_fraction, c.run.seed, it)
            unit_adv, unit_prompt = broadcast_advantages(forest, leaf_adv), forest.node_prompt[forest.src]
            loss_fn = lambda mb: self._unit_loss(forest, mb, unit_adv[mb])  # noqa: E731
        stats, skip = self._optimize(units, unit_prompt, loss_fn, it, prompt_ids)
        t_train = time.perf_counter() - t0 - t_rollout - t_reward

        row.update({"adv/mean": float(all_adv.mean()), "adv/std": float(all_adv.std()),
                    "adv/abs_mean": float(all_adv.abs().mean()),
                    "adv/zero_groups": int(sum(float(all_adv[all_slots == s].abs().max()) == 0
                                               for s in all_slots.unique()))})
        row.update(stats)
        row.update({"time/rollout": t_rollout, "time/reward": t_reward, "time/train": t_train})
        if skip is not None:
            return self._skipped(row, *skip, forest, t0, t_rollout)
        self.state.consecutive_skips = 0
        if self.sampler is not None:  # after the iteration's updates, like the EMA (a skipped one leaves it)
            self.sampler.update(self.params, it)
            row["nft_eta"] = self.sampler.eta(it)
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

    def _optimize(self, units, unit_prompt, loss_fn, it, prompt_ids):
        """Inner epochs x updates of micro-batches of ``units`` (ids; ``unit_prompt[id]`` is the unit's local
        prompt position, ``loss_fn(ids)`` its per-unit losses and stats). An update whose loss (on any process)
        or gradient is non-finite is not applied, and the iteration's remaining updates are dropped: returns the
        stats of the applied updates and None, or ("loss" | "gradient", prompt ids) for the skip."""
        c, acc = self.cfg, self.acc
        t = c.training
        counts = acc.gather(torch.tensor([len(units)], device=acc.device))
        if bool((counts != counts[0]).any()):
            raise RuntimeError(f"processes hold different numbers of training units {counts.tolist()}")
        logs: dict[str, list] = {}
        # the model stays in eval mode: dropout would make the recomputed log-prob differ from the rollout's
        with self._training_forward():
            for epoch in range(t.inner_epochs):
                order = shuffle_units(units, c.run.seed, it, epoch, acc.process_index)
                for update in torch.tensor_split(order, t.updates_per_epoch):
                    batches = list(torch.split(update, t.micro_batch_size))
                    step_logs: dict[str, list] = {}
                    bad_units = []
                    for j, mb in enumerate(batches):
                        sync = contextlib.nullcontext() if j == len(batches) - 1 else acc.no_sync(self.model)
                        with sync, acc.autocast():
                            loss, s = loss_fn(mb)
                            # global denominator: the sum over micro-batches (and the DDP mean over processes
                            # with equal unit counts) is the mean over every unit of the update
                            acc.backward(loss.sum() / len(update))
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
                        ids = sorted(set(gather_object([prompt_ids[int(unit_prompt[u])] for u in bad_units])))
                        return self._reduce_logs(logs), ("loss" if ids else "gradient", ids)
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    if self.ema is not None:
                        self.ema.step(self.params)
                    norm = float(grad_norm) if grad_norm is not None else float("nan")
                    step_logs["grad_norm"] = [torch.tensor([norm])]
                    for k, v in step_logs.items():
                        logs.setdefault(k, []).extend(v)
        return self._reduce_logs(logs), None

    def _reduce_logs(self, logs: dict) -> dict:
        out = {}
        for k, v in logs.items():
            vals = self.acc.gather(torch.cat(v).to(self.acc.device)).cpu()
            out[k] = float(vals.min() if k == "ratio_min" else vals.max() if k == "ratio_max" else vals.mean())
        return out

    def _unit_loss(self, forest, mb, adv):
        t = self.cfg.training
        logp, mean, std = score_edges(self.policy, forest, mb)
        loss, s = clipped_surrogate(logp, forest.logp_old[mb].to(logp.device), adv.to(logp.device),
                                    t.clip_eps_low, t.clip_eps_high)
        stats = {"loss": loss.detach(), "clip_frac": s["clip_frac"], "approx_kl": s["approx_kl"],
                 "ratio_mean": s["ratio_mean"], "ratio_min": s["ratio_min"], "ratio_max": s["ratio_max"]}
        if t.kl_beta > 0:
            with torch.no_grad(), self._reference():
                _, mean_ref, _ = score_edges(self.policy, forest, mb)
            kl = kl_gaussian_mean(mean, mean_ref, std)
            loss = loss + t.kl_beta * kl
            stats["kl"] = kl.detach()
        return loss, stats

    @contextlib.contextmanager
    def _reference(self):
        if self.reference is None:
            with finetune.base_weights(self.acc.unwrap_model(self.model)):
                yield
        else:
            trained, self.policy.denoiser = self.policy.denoiser, self.reference
            try:
                yield
            finally:
                self.policy.denoiser = trained

    # ------------------------------------------------------------------------------------------ eval / output
    @torch.no_grad()
    def _eval_images(self, indices: list[int]) -> torch.Tensor:
        """ODE samples (one per prompt, the eval seed) of the given eval prompts with the current (EMA) weights."""
        c = self.cfg
        with self._ema_weights(), self._merged(), self.acc.autocast():
            guidance = c.sampling.guidance_scale if c.eval.guidance_scale is None else c.eval.guidance_scale
            forest = rollout(self.policy, [self.eval_set.prompts[i] for i in indices], plan=Flat(1),
                             kernel=self.kernel, schedule=Constant(0.0),
                             num_steps=c.eval.num_steps or c.sampling.num_steps, guidance_scale=guidance,
                             height=c.model.height, width=c.model.width, seed=c.eval.seed, prompt_ids=indices,
                             negative_prompt=c.sampling.negative_prompt, max_batch=c.sampling.max_batch)
            return self._decode(forest.latents[forest.leaves()])

    @torch.no_grad()
    def evaluate(self, it: int) -> dict:
        """eval.num_prompts eval prompts spread over the file, shared over processes, sampled and scored."""
        acc = self.acc
        chosen = spread(self.cfg.eval.num_prompts, len(self.eval_set))
        mine = chosen[acc.process_index::acc.num_processes]
        images = self._eval_images(mine)
        # one sample per prompt, so one group each (a pairwise reward scores 1/2 here: nothing to compare)
        scores, bad = self._score(images, [self.eval_set.prompts[i] for i in mine],
                                  [self.eval_set.metadata[i] for i in mine], mine, groups=torch.arange(len(mine)))
        if scores is None:
            self._warn(f"iteration {it}: eval scores are non-finite for eval prompt ids {bad}; no eval row")
            return {}
        row = {}
        for k, v in scores.items():   # main scores pick the best checkpoint; extras (e.g. shapes/correct) are logged
            row[f"eval/{k}_mean"] = float(acc.gather_for_metrics(v.to(acc.device)).mean())
        if acc.is_main_process:  # a look, not an archive: the first images of the main process
            save_grid(images[:GRID_IMAGES], self.run_dir / "samples" / f"eval_{it:06d}.png", min_cell=LOOK_CELL)
        return row

    @contextlib.contextmanager
    def _sampling_weights(self):
        """Rollouts (and NFT's v_old) use the soft-updated sampling policy when there is one, merged into the base
        weights under finetune.merged_sampling."""
        with self.sampler.active(self.params) if self.sampler is not None else contextlib.nullcontext():
            with self._merged():
                yield

    def _merged(self):
        """Gradient-free forwards through the LoRA merged into the base weights (finetune.merged_sampling)."""
        if not self.cfg.finetune.merged_sampling:
            return contextlib.nullcontext()
        return finetune.merged_lora(self.acc.unwrap_model(self.model))

    @contextlib.contextmanager
    def _ema_weights(self):
        if self.ema is None:
            yield
            return
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.ema.restore(self.params)

    def finish(self):
        acc = self.acc
        acc.wait_for_everyone()
        if acc.is_main_process:
            reward_curve(self.rows, self.run_dir / "reward_curve.png")
            if self._before is not None:  # the same prompts and seeds before and after training, one row each
                after = self._eval_images(spread(len(self._before), len(self.eval_set)))
                # a resumed run reads "before" back from its PNG, on the CPU
                save_grid(torch.cat([self._before.cpu(), after.cpu()]), self.run_dir / "samples" / "before_after.png",
                          cols=len(self._before), min_cell=LOOK_CELL)
            with self._ema_weights():
                denoiser = acc.unwrap_model(self.model)
                if self.cfg.finetune.mode == "lora":
                    finetune.save_lora(self.pipe, denoiser, self.family, self.lora_config, self.run_dir / "lora")
                else:
                    finetune.save_full(self.pipe, self.run_dir / "model")
        acc.wait_for_everyone()
        acc.end_training()

    def _dump_advantages(self, it, gathered, all_slots, all_adv):
        with open(self.run_dir / "advantages.jsonl", "a") as f:
            for i in range(len(all_slots)):
                f.write(json.dumps({"iteration": it, "slot": int(all_slots[i]), "index": i,
                                    "rewards": {k: float(v[i]) for k, v in gathered.items()},
                                    "advantage": float(all_adv[i])}) + "\n")
