"""One training loop for every method (DESIGN.md, "One training iteration"), on accelerate.

prompts (whole groups per process) -> rollout (no grad) -> rewards (components kept apart) -> advantages (on
the all-gathered batch: identical however prompts are sharded) -> trainable units in micro-batches -> inner
epochs of log-prob recompute + clipped loss (+ KL to the base) -> backward / accumulation / clipping / step
-> EMA, logging, eval, checkpoints.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

import rewards as rewards_lib
from flowrl.core import clipped_surrogate, combine_rewards, group_ids, kl_gaussian_mean
from flowrl.models import FAMILY_OF_PIPELINE, load_pipeline, policy_from_pipeline
from flowrl.sampling import Constant, Flat, rollout, score_edges
from flowrl.sampling.seeding import derive_seed
from flowrl.train import builders, finetune
from flowrl.train.config import Config, ConfigError, to_dict
from flowrl.train.images import save_grid
from flowrl.train.plots import reward_curve
from flowrl.train.units import broadcast_advantages, select_units, shuffle_units

RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints", "lora", "model")
GRID_IMAGES = 32
BEFORE_AFTER = 8  # eval prompts in the before / after grid
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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


def balance_weights(metadata: list[dict], key: str) -> torch.Tensor:
    """Per-prompt sampling weights that give every value of ``metadata[key]`` the same total weight."""
    values = [m.get(key) for m in metadata]
    if any(v is None for v in values):
        raise ConfigError(f"data.balance_key: some prompts have no metadata field {key!r}")
    counts = {v: values.count(v) for v in set(values)}
    return torch.tensor([1.0 / counts[v] for v in values], dtype=torch.float64)


def advantages_from_rewards(components: dict, slots: torch.Tensor, weights: dict, cfg: Config) -> torch.Tensor:
    """Per-sample advantages of a whole (all-gathered) batch; groups are the prompts' global slots."""
    a = cfg.advantages
    return combine_rewards(components, weights, group_ids(slots.tolist()), mode=cfg.rewards.combine, std=a.std,
                           eps=a.eps, clip=a.clip)


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.run_dir = Path(cfg.run.output_dir)
        check_run_dir(self.run_dir)
        self.family = builders.model_family(cfg.model.path)
        self.train_set = builders.load_prompts(cfg.data.train_prompts)
        self.eval_set = builders.load_prompts(cfg.data.eval_prompts, "data.eval_prompts") if cfg.data.eval_prompts else None
        self.prompt_weights = (balance_weights(self.train_set.metadata, cfg.data.balance_key)
                               if cfg.data.balance_key else None)
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
        if self.acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        self.acc.init_trackers("tb")
        self._build_model()

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
        warm = max(t.warmup_iterations, 0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warm + 1)))
        # the pipeline keeps the plain module for rollouts; training goes through the (DDP-)wrapped twin
        # the scheduler stays unprepared: accelerate would step it once per process, changing warmup with W
        self.model, self.optimizer = self.acc.prepare(denoiser, optimizer)
        self.lr_scheduler = scheduler
        self.ema = EMAModel(self.params, decay=cfg.finetune.ema_decay) if cfg.finetune.ema_decay > 0 else None

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

    def _advantages(self, scores: dict, slots: torch.Tensor):
        """Advantages for the local leaves, computed on the all-gathered batch (so identical for any sharding)."""
        mains = self.reward.main_scores(scores)
        gathered = {k: self.acc.gather(v.to(self.acc.device)).cpu() for k, v in mains.items()}
        all_slots = self.acc.gather(slots.to(self.acc.device)).cpu()
        adv = advantages_from_rewards(gathered, all_slots, self.reward.weights, self.cfg)
        n = len(slots)
        rank = self.acc.process_index
        return adv[rank * n:(rank + 1) * n], gathered, all_slots, adv

    # ------------------------------------------------------------------------------------------ loop
    def train(self):
        c = self.cfg
        bar = tqdm(range(c.run.iterations), desc="flowrl train", disable=not (c.run.progress and self.acc.is_main_process))
        self.rows: list[dict] = []
        self._before = None
        if self.eval_set is not None and self.acc.is_main_process:
            self._before = self._eval_images(list(range(min(BEFORE_AFTER, len(self.eval_set)))))
        for it in bar:
            row = self.iteration(it)
            if c.eval.every and self.eval_set is not None and ((it + 1) % c.eval.every == 0 or it + 1 == c.run.iterations):
                row.update(self.evaluate(it))
            self.rows.append(row)
            if self.acc.is_main_process:
                with open(self.run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
                bar.set_postfix(reward=f"{row['reward/mean']:.4f}", loss=f"{row['loss']:.2e}")
            self.acc.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=it)
            if c.run.save_every and (it + 1) % c.run.save_every == 0 and it + 1 < c.run.iterations:
                self.acc.save_state(str(self.run_dir / "checkpoints" / f"iter_{it + 1:06d}"))
        self.finish()

    def iteration(self, it: int) -> dict:
        c, acc = self.cfg, self.acc
        W, rank = acc.num_processes, acc.process_index
        P = c.data.prompts_per_iteration
        idx = prompt_indices(c.run.seed, it, len(self.train_set), P, self.prompt_weights)
        local = list(range(rank * P // W, (rank + 1) * P // W))  # global slots of this process
        prompts = [self.train_set.prompts[idx[s]] for s in local]
        meta = [self.train_set.metadata[idx[s]] for s in local]

        t0 = time.perf_counter()
        forest = self._rollout(prompts, local, it)
        t_rollout = time.perf_counter() - t0
        leaves = forest.leaves()
        leaf_prompt = forest.node_prompt[leaves]
        slots = torch.tensor([local[p] for p in leaf_prompt])
        with torch.no_grad():
            images = self._decode(forest.latents[leaves])
            # groups: pairwise rewards (Pref-GRPO) compare the samples of one prompt, all on this process
            scores = self.reward(images, [prompts[p] for p in leaf_prompt], [meta[p] for p in leaf_prompt],
                                 groups=slots)
        leaf_adv, gathered, all_slots, all_adv = self._advantages(scores, slots)
        t_reward = time.perf_counter() - t0 - t_rollout
        if c.run.dump_advantages and acc.is_main_process:
            self._dump_advantages(it, gathered, all_slots, all_adv)
        if c.run.log_samples_every and (it + 1) % c.run.log_samples_every == 0 and acc.is_main_process:
            save_grid(images[:GRID_IMAGES], self.run_dir / "samples" / f"train_{it:06d}.png")

        stats = self._optimize(forest, broadcast_advantages(forest, leaf_adv), it)
        t_train = time.perf_counter() - t0 - t_rollout - t_reward

        row = {"iteration": it, "world_size": acc.num_processes}
        for k, v in gathered.items():
            row[f"reward/{k}_mean"], row[f"reward/{k}_std"] = float(v.mean()), float(v.std())
        for k, v in scores.items():  # extras (e.g. geneval/correct): logged, never in the advantage
            if k not in gathered:
                row[f"reward/{k}_mean"] = float(acc.gather(v.to(acc.device)).mean())
        row["reward/mean"] = float(self.reward.weighted_sum(gathered).mean())
        row.update({"adv/mean": float(all_adv.mean()), "adv/std": float(all_adv.std()),
                    "adv/abs_mean": float(all_adv.abs().mean()),
                    "adv/zero_groups": int(sum(float(all_adv[all_slots == s].abs().max()) == 0
                                               for s in all_slots.unique()))})
        row.update(stats)
        row.update({"lr": self.lr_scheduler.get_last_lr()[0], "time/rollout": t_rollout, "time/reward": t_reward,
                    "time/train": t_train,
                    "nfe": int(acc.gather(torch.tensor([forest.forward_passes], device=acc.device)).sum())})
        return row

    def _optimize(self, forest, edge_adv, it):
        c, acc = self.cfg, self.acc
        t = c.training
        units = select_units(forest, t.timestep_fraction, c.run.seed, it)
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
                    for j, mb in enumerate(batches):
                        sync = contextlib.nullcontext() if j == len(batches) - 1 else acc.no_sync(self.model)
                        with sync, acc.autocast():
                            loss, s = self._unit_loss(forest, mb, edge_adv[mb])
                            # global denominator: the sum over micro-batches (and the DDP mean over processes
                            # with equal unit counts) is the mean over every unit of the update
                            acc.backward(loss.sum() / len(update))
                        for k, v in s.items():
                            logs.setdefault(k, []).append(v.detach().float().reshape(-1))
                    grad_norm = acc.clip_grad_norm_(self.params, t.max_grad_norm) if t.max_grad_norm > 0 else None
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    if self.ema is not None:
                        self.ema.step(self.params)
                    logs.setdefault("grad_norm", []).append(
                        torch.tensor([float(grad_norm) if grad_norm is not None else float("nan")]))
        out = {}
        for k, v in logs.items():
            vals = acc.gather(torch.cat(v).to(acc.device)).cpu()
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
        with self._ema_weights(), self.acc.autocast():
            forest = rollout(self.policy, [self.eval_set.prompts[i] for i in indices], plan=Flat(1),
                             kernel=self.kernel, schedule=Constant(0.0),
                             num_steps=c.eval.num_steps or c.sampling.num_steps,
                             guidance_scale=c.sampling.guidance_scale, height=c.model.height, width=c.model.width,
                             seed=c.eval.seed, prompt_ids=indices, negative_prompt=c.sampling.negative_prompt,
                             max_batch=c.sampling.max_batch)
            return self._decode(forest.latents[forest.leaves()])

    @torch.no_grad()
    def evaluate(self, it: int) -> dict:
        """The first eval.num_prompts eval prompts, shared over processes, sampled and scored."""
        acc = self.acc
        n = min(self.cfg.eval.num_prompts, len(self.eval_set))
        mine = list(range(acc.process_index, n, acc.num_processes))
        images = self._eval_images(mine)
        # one sample per prompt, so one group each (a pairwise reward scores 1/2 here: nothing to compare)
        scores = self.reward(images, [self.eval_set.prompts[i] for i in mine],
                             [self.eval_set.metadata[i] for i in mine], groups=torch.arange(len(mine)))
        row = {}
        for k, v in self.reward.main_scores(scores).items():
            row[f"eval/{k}_mean"] = float(acc.gather_for_metrics(v.to(acc.device)).mean())
        if acc.is_main_process:  # a look, not an archive: the first images of the main process
            save_grid(images[:GRID_IMAGES], self.run_dir / "samples" / f"eval_{it:06d}.png")
        return row

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
                after = self._eval_images(list(range(len(self._before))))
                save_grid(torch.cat([self._before, after]), self.run_dir / "samples" / "before_after.png",
                          cols=len(self._before))
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
