"""The run folder: the resolved config, metrics.jsonl, checkpoints (atomic, resumable bit for bit) and the final
outputs (reward curve, LoRA in diffusers format or a full pipeline). checkpoint.py holds the file-level rules."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import yaml
from accelerate.utils import DistributedType

from flowrl.train import checkpoint, finetune
from flowrl.train.checkpoint import LOGS
from flowrl.train.config import ConfigError, to_dict
from flowrl.train.guards import TrainingError
from flowrl.train.model_card import write_model_card
from flowrl.train.plots import reward_curve

RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints", "lora", "model")


def check_run_dir(path: Path) -> None:
    """Refuse to write into a folder that already holds a run (resuming is explicit, never implied)."""
    if path.exists() and any((path / m).exists() for m in RUN_MARKERS):
        raise ConfigError(f"run.output_dir: {path} already holds a run; choose a new folder")


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class RunFolder:
    def __init__(self, cfg, acc, path: Path):
        self.cfg, self.acc, self.path = cfg, acc, path

    def start(self, notes: list[str]) -> None:
        self.digests = None  # the data files' content hashes (checkpoint.data_digests) as the run read them
        if self.acc.is_main_process:
            self.digests = checkpoint.data_digests(self.cfg)
            for note in notes:
                print(f"flowrl: {note}")
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "config.yaml").write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))

    def hold(self, m, checkpointed: list) -> None:
        """Register what a checkpoint restores, in a fixed order (accelerate numbers the files by it). LoRA
        checkpoints hold the adapter as a diffusers LoRA file, not the frozen base; sharded engines (DeepSpeed,
        FSDP) keep accelerate's own model files, which know the shards."""
        self.m = m
        for obj in checkpointed:
            if obj is not None:
                self.acc.register_for_checkpointing(obj)
        if self.cfg.finetune.mode == "lora" and self.acc.distributed_type not in (DistributedType.DEEPSPEED,
                                                                                  DistributedType.FSDP):
            self.acc.register_save_state_pre_hook(self._save_lora_hook)
            self.acc.register_load_state_pre_hook(self._load_lora_hook)

    def _save_lora_hook(self, models, weights, output_dir):
        weights.clear()
        if self.acc.is_main_process:
            finetune.save_lora(self.m.pipe, self.acc.unwrap_model(self.m.model), self.m.family, self.m.lora_config,
                               Path(output_dir))

    def _load_lora_hook(self, models, input_dir):
        models.clear()  # accelerate would look for the full model's weights
        finetune.load_lora(self.acc.unwrap_model(self.m.model), self.m.family, Path(input_dir))

    def append(self, row: dict) -> None:
        if self.acc.is_main_process:
            with open(self.path / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def save_checkpoint(self, state, iteration: int, eval_score: float | None) -> Path:
        """Write ``checkpoints/iter_NNNNNN`` atomically (checkpoint.py), then prune old ones. Collective. A write
        that fails on any process (a full disk, a lost mount) stops the run on every process with TrainingError,
        the partial ``.tmp-`` folder removed and the earlier checkpoints untouched."""
        acc, root = self.acc, self.path / "checkpoints"
        final = root / checkpoint.checkpoint_name(iteration)
        tmp = root / f".tmp-{final.name}"
        error = None
        if acc.is_main_process:
            try:
                state.log_bytes = {}
                for name in LOGS:  # the logs' lengths now: a resume cuts them back to these
                    if (self.path / name).exists():
                        with open(self.path / name, "ab") as f:
                            os.fsync(f.fileno())
                        state.log_bytes[name] = (self.path / name).stat().st_size
                checkpoint.remove(tmp)
                root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                error = e
        self._written(error, final, tmp)  # also the barrier before every process writes its part
        try:
            acc.save_state(str(tmp))
        except OSError as e:
            error = e
        self._written(error, final, tmp)
        if acc.is_main_process:
            try:
                checkpoint.seal(tmp, {"iteration": iteration, "world_size": acc.num_processes,
                                      "eval_score": eval_score, "config": to_dict(self.cfg), "data": self.digests})
                checkpoint.publish(tmp, final)
            except OSError as e:
                error = e
        self._written(error, final, tmp)
        if acc.is_main_process:
            checkpoint.prune(root, self.cfg.run.keep_checkpoints)
        acc.wait_for_everyone()
        return final

    def _written(self, error: OSError | None, final: Path, tmp: Path) -> None:
        """Collective: every process raises TrainingError if writing ``final`` failed on any of them."""
        failed = self.acc.gather(torch.tensor([error is not None], device=self.acc.device)).cpu()
        if not bool(failed.any()):
            return
        if self.acc.is_main_process:
            try:
                checkpoint.remove(tmp)
            except OSError:
                pass  # a .tmp- folder is never resumed from, and the next run's prune removes it
        previous = checkpoint.resume_note(self.path, previous=True)
        if error is None:
            rank = int(torch.nonzero(failed).flatten()[0])
            raise TrainingError(f"checkpoint {final.name} could not be written on process {rank} (its error is "
                                f"above); {previous}")
        cause = os.strerror(error.errno).lower() if error.errno else f"{type(error).__name__}: {error}"
        where = f" ({error.filename})" if error.filename else ""
        raise TrainingError(f"{cause} while writing checkpoint {final.name}{where}: {previous}")

    def load_checkpoint(self, path: Path, saved: dict, state, ema, any_process) -> list[dict]:
        """Restore every registered object from ``path`` and rewind the folder to it; returns the metric rows."""
        acc = self.acc
        acc.load_state(str(path))
        if ema is not None:
            ema.to(acc.device)  # accelerate loads registered objects onto the CPU
        if state.iteration != saved["iteration"]:
            raise ConfigError(f"--resume: {path} holds loop state for iteration {state.iteration}, its marker says "
                              f"{saved['iteration']}")
        problem, rows = None, []
        if acc.is_main_process:
            try:
                rows = self._rewind(state)
            except ConfigError as e:
                problem = e
        if any_process(problem is not None):  # every process fails, none waits for the main one forever
            raise problem or ConfigError("--resume: the main process could not rewind the run folder")
        return rows

    def _rewind(self, state) -> list[dict]:
        """Back to the checkpoint: logs cut to their length then (rows after it are recomputed, never
        duplicated), checkpoints of a later history removed."""
        for name in LOGS:
            path = self.path / name
            if name in state.log_bytes:
                checkpoint.truncate_log(path, state.log_bytes[name])
            elif path.exists():
                path.unlink()
        rows = read_rows(self.path / "metrics.jsonl")
        if [r["iteration"] for r in rows] != list(range(state.iteration)):
            raise ConfigError(f"--resume: {self.path / 'metrics.jsonl'} does not hold one row per iteration "
                              f"0..{state.iteration - 1}")
        for it, path in checkpoint.scan(self.path / "checkpoints")[0]:
            if it > state.iteration:
                print(f"flowrl: removing {path.name}, newer than the checkpoint resumed from")
                checkpoint.remove(path)
        return rows

    def reward_curve(self, rows: list[dict]) -> None:
        if self.acc.is_main_process:
            reward_curve(rows, self.path / "reward_curve.png")

    def save_weights(self, views, rows: list[dict]) -> None:
        """The trained weights (the EMA when kept) as a diffusers LoRA or pipeline folder, with its model card.
        Main process only."""
        with views.use("ema"):
            denoiser = self.acc.unwrap_model(self.m.model)
            kind = "lora" if self.cfg.finetune.mode == "lora" else "model"
            if kind == "lora":
                finetune.save_lora(self.m.pipe, denoiser, self.m.family, self.m.lora_config, self.path / kind)
            else:
                finetune.save_full(self.m.pipe, self.path / kind)
        write_model_card(self.path / kind, to_dict(self.cfg), kind, rows)

    def dump_advantages(self, it, gathered, all_slots, all_adv) -> None:
        with open(self.path / "advantages.jsonl", "a") as f:
            for i in range(len(all_slots)):
                f.write(json.dumps({"iteration": it, "slot": int(all_slots[i]), "index": i,
                                    "rewards": {k: float(v[i]) for k, v in gathered.items()},
                                    "advantage": float(all_adv[i])}) + "\n")
