"""The outer loop both trainers share: iterations from the loop state's to run.iterations, evals on schedule, one
metrics row per iteration, a checkpoint every run.save_every, on a stop signal and at the end, the stop after too
many skipped iterations in a row. A trainer provides ``iteration(it) -> row``, ``evaluate(it) -> dict``,
``begin(start)``, ``finish()`` (main process: final outputs) and ``score_weights`` (the reward weights the best
checkpoint is chosen by), plus cfg, acc, state, rows, folder, eval_set and _any_process."""
from __future__ import annotations

import re
import traceback
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from tqdm.auto import tqdm

from flowrl.train import checkpoint, guards
from flowrl.train.config import ConfigError
from flowrl.train.scoring import eval_score
from flowrl.train.validate import trackers


def start(cfg, resume, folder_cls, run_dir):
    """The accelerator, the run folder (config written, resume notes said) and the trackers, after the checks a
    process count must pass. Both trainers start here. Returns (accelerator, folder)."""
    saved = resume.info if resume else None
    # without CUDA, accelerate only forms a (gloo) process group when told it runs on CPU; otherwise each
    # launched process silently trains alone
    log_with = trackers(cfg.run.report_to)
    # a collective that waits longer than run.collective_timeout for a lost or hung process raises, not hangs
    group = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.run.collective_timeout))
    acc = Accelerator(mixed_precision=cfg.run.mixed_precision, log_with=log_with or None, project_dir=str(run_dir),
                      cpu=not torch.cuda.is_available(), kwargs_handlers=[group])
    W = acc.num_processes
    if cfg.data.prompts_per_iteration % W:
        raise ConfigError(f"data.prompts_per_iteration ({cfg.data.prompts_per_iteration}) must divide by the "
                          f"number of processes ({W}): every process takes whole prompt groups")
    if saved is not None and saved["world_size"] != W:
        raise ConfigError(f"--resume: {resume.path} was written by {saved['world_size']} process(es), this run "
                          f"has {W}: each process's random state is in the checkpoint, so the number must stay")
    folder = folder_cls(cfg, acc, run_dir)
    folder.start(resume.notes if resume else [])
    if log_with:
        # TensorBoard writes to RUN/tb; a resumed run's hides the events a crash left beyond the checkpoint.
        # Hosted trackers name the run after its folder and resume it by that name.
        kwargs = {"wandb": {"name": run_dir.name}, "tensorboard": {"purge_step": saved["iteration"]} if saved else {}}
        acc.init_trackers("tb", init_kwargs=kwargs)
    return acc, folder


def collective_failure(e: BaseException, cfg) -> guards.TrainingError | None:
    """``e`` as one line if it is a collective (all-gather, barrier, DDP all-reduce) that failed because another
    process is gone or did not answer within run.collective_timeout, else None. torch raises these as RuntimeError
    (gloo's "Connection closed by peer", "Timed out waiting ...") from torch.distributed; other errors stay as
    they are. Nothing is written on the way: a checkpoint is sealed only after every process has written its part."""
    dist = torch.distributed
    if isinstance(e, guards.TrainingError) or not (dist.is_available() and dist.is_initialized()):
        return None
    if dist.get_world_size() < 2 or not isinstance(e, RuntimeError):
        return None
    frames = traceback.extract_tb(e.__traceback__)
    from_dist = any("/torch/distributed/" in f.filename.replace("\\", "/") for f in frames)
    if not (isinstance(e, dist.DistError) or from_dist or re.search(r"gloo|nccl|closed by peer", str(e), re.I)):
        return None
    detail = re.sub(r"^\[[^\]]*\]\s*", "", (str(e).strip().splitlines() or [type(e).__name__])[0])
    detail = re.split(r"\.\s", detail)[0][:200]  # its first sentence, without gloo's source location
    return guards.TrainingError(
        f"process {dist.get_rank()} of {dist.get_world_size()}: a collective operation failed ({detail}): another "
        f"process was lost, or did not answer within run.collective_timeout ({cfg.run.collective_timeout:g} s); "
        f"{checkpoint.resume_note(Path(cfg.run.output_dir))}")


def run(t) -> str | None:
    """Train ``t`` to run.iterations. A stop signal ends the run after the iteration in progress, with a
    checkpoint: returns the signal's name then, else None."""
    c, acc = t.cfg, t.acc
    start = t.state.iteration
    bar = tqdm(range(start, c.run.iterations), initial=start, total=c.run.iterations, desc="flowrl train",
               disable=not (c.run.progress and acc.is_main_process))
    t.begin(start)
    stop = guards.StopSignal().install()
    try:
        for it in bar:
            try:
                row = t.iteration(it)
            except guards.TrainingError as e:  # a reward that keeps failing, say: the error says where to go on
                raise guards.TrainingError(f"{e}; {checkpoint.resume_note(t.folder.path)}") from e
            last = it + 1 == c.run.iterations
            if c.eval.every and t.eval_set is not None and ((it + 1) % c.eval.every == 0 or last):
                row.update(t.evaluate(it))
            t.rows.append(row)
            t.folder.append(row)
            if "loss" in row:
                bar.set_postfix(reward=f"{row['reward/mean']:.4f}", loss=f"{row['loss']:.2e}")
            acc.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=it)
            t.state.iteration = it + 1
            # every process stops at the same one; a signal during the last iteration just lets the run finish
            stopping = t._any_process(stop.received is not None) and not last
            failing = t.state.consecutive_skips >= c.training.max_consecutive_skips
            if stopping or failing or last or (c.run.save_every and (it + 1) % c.run.save_every == 0):
                saved = t.folder.save_checkpoint(t.state, it + 1, eval_score(row, t.score_weights))
            if failing:
                raise guards.TrainingError(
                    f"{t.state.consecutive_skips} iterations in a row skipped for non-finite values (the last: "
                    f"{row['skipped']}, prompt ids {row['skipped_prompts']}); the weights of the last good update "
                    f"are in {saved}")
            if stopping:
                t.stopped = (stop.received or "a stop signal to another process", saved)
                acc.wait_for_everyone()
                t.folder.reward_curve(t.rows)
                acc.end_training()
                return t.stopped[0]
    finally:
        stop.uninstall()
    acc.wait_for_everyone()
    if acc.is_main_process:
        t.folder.reward_curve(t.rows)
        t.finish()
    acc.wait_for_everyone()
    acc.end_training()
    return None
