"""Checkpoints that are either whole or ignored, and what resuming from one may change.

A checkpoint is ``RUN/checkpoints/iter_NNNNNN/``: accelerate's ``save_state`` folder (optimizer, one RNG file per
process, the registered objects: LR scheduler, loop state, EMA, stat tracker) with the trained weights (the
LoRA as a diffusers LoRA file, or the full model). It is written into a hidden sibling ``.tmp-iter_NNNNNN``,
every file is flushed to disk, a marker ``checkpoint.json`` (iteration, world size, the config, the size of
every file) is written last, and only then is the folder renamed into place. A crash at any moment leaves the
earlier checkpoints intact and the new one either complete or invisible. A folder counts as *complete* when its
marker parses and every file it lists exists with the listed size; ``--resume latest`` takes the complete one
with the highest iteration and skips the others, saying why.

Random state. Every draw the loop makes comes from a generator seeded by what is drawn: prompt sampling
(seed, iteration), rollout noise (seed, iteration, prompt, sample, step), the Window schedule's start (seed,
iteration), DanceGRPO's timestep subset and the micro-batch shuffle (seed, iteration, prompt / epoch, process).
None of them needs saved state, and neither does MixGRPO's sliding window, whose path is a function of the
iteration. What does draw from the global python / numpy / torch generators (LoRA's
initialisation, rewards or user code that use them, dropout were a model in train mode) is covered by the
per-process RNG files accelerate writes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from flowrl.train.config import Config, ConfigError, to_dict

MARKER = "checkpoint.json"
FORMAT = 1
PATTERN = re.compile(r"^iter_(\d{6,})$")
LOGS = ("metrics.jsonl", "advantages.jsonl")  # append-only run logs, cut back to the checkpoint on resume

# Config fields that may differ on resume: how long, how often and how loudly the run goes, never what it
# trains. Everything else (model, data, sampling, rewards, advantages, optimisation, seed, precision) alters the
# experiment, so a changed value is refused, naming the field.
RESUMABLE = frozenset({
    "run.output_dir", "run.iterations", "run.save_every", "run.keep_checkpoints", "run.log_samples_every",
    "run.progress", "run.dump_advantages", "run.report_to", "run.collective_timeout", "eval.every",
    "rewards.retries", "rewards.retry_backoff", "rewards.timeout", "training.max_consecutive_skips",
})


@dataclass
class LoopState:
    """What the training loop carries from one iteration to the next; accelerate saves it with every
    checkpoint (``register_for_checkpointing``)."""

    iteration: int = 0                 # the next iteration to run
    consecutive_skips: int = 0         # iterations in a row skipped for non-finite values
    skips: int = 0                     # skipped iterations in the whole run
    log_bytes: dict = field(default_factory=dict)  # length of each of LOGS when the checkpoint was written

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        names = {f.name for f in dataclasses.fields(self)}
        if set(state) != names:
            raise ValueError(f"loop state has fields {sorted(state)}, expected {sorted(names)}")
        for k, v in state.items():
            setattr(self, k, v)


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:06d}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal(folder: Path, info: dict) -> dict:
    """Flush every file of ``folder`` to disk, then write the marker listing them with their sizes."""
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            _fsync(p)
            files[p.relative_to(folder).as_posix()] = p.stat().st_size
    info = {"format": FORMAT, **info, "files": files}
    tmp = folder / f"{MARKER}.tmp"
    with open(tmp, "w") as f:
        json.dump(info, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MARKER)
    _fsync(folder)
    return info


def publish(tmp: Path, final: Path) -> None:
    """Rename the sealed ``tmp`` folder to ``final`` (an existing ``final`` is moved aside first, then deleted)."""
    old = None
    if final.exists():
        old = final.with_name(f".del-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync(final.parent)
    if old is not None:
        shutil.rmtree(old)


def problem(folder: Path) -> str | None:
    """Why ``folder`` is not a complete checkpoint, or None when it is."""
    marker = folder / MARKER
    if not marker.is_file():
        return f"no {MARKER} (the write did not finish)"
    try:
        info = json.loads(marker.read_text())
        files, iteration = info["files"], info["iteration"]
    except (ValueError, KeyError, TypeError):
        return f"{MARKER} is unreadable"
    if info.get("format") != FORMAT:
        return f"{MARKER} has format {info.get('format')!r}, this flowrl writes {FORMAT}"
    m = PATTERN.match(folder.name)
    if m and int(m.group(1)) != iteration:
        return f"{MARKER} says iteration {iteration}, the folder name {int(m.group(1))}"
    for rel, size in files.items():
        p = folder / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != size:
            return f"{rel} has {p.stat().st_size} bytes, {MARKER} says {size}"
    return None


def read_info(folder: Path) -> dict:
    return json.loads((folder / MARKER).read_text())


def scan(root: Path) -> tuple[list[tuple[int, Path]], list[tuple[Path, str]]]:
    """The complete checkpoints under ``root`` by iteration, and the ``iter_*`` folders skipped with the reason."""
    good, bad = [], []
    if root.is_dir():
        for p in root.iterdir():
            m = PATTERN.match(p.name)
            if not (m and p.is_dir()):
                continue
            why = problem(p)
            if why is None:
                good.append((int(m.group(1)), p))
            else:
                bad.append((p, why))
    return sorted(good), sorted(bad)


def latest(run_dir: Path) -> Path | None:
    good, _ = scan(Path(run_dir) / "checkpoints")
    return good[-1][1] if good else None


def resume_note(run_dir: Path, previous: bool = False) -> str:
    """Where a failed run can continue from, for its error line (``previous``: a newer checkpoint just failed)."""
    newest = latest(run_dir)
    if newest is None:
        return "no checkpoint was written yet (run.save_every sets how often one is)"
    what = (f"the previous checkpoint {newest.name} is the newest complete one" if previous
            else f"the newest complete checkpoint is {newest}")
    return f"{what} (continue with --resume latest once the cause is fixed)"


def resolve(spec: str, output_dir: str) -> tuple[Path, list[str]]:
    """The checkpoint folder that ``--resume spec`` names, and notes about folders it skipped.

    ``latest``: the newest complete checkpoint of ``run.output_dir``. A run folder: its newest complete
    checkpoint. A checkpoint folder (``RUN/checkpoints/iter_NNNNNN``): exactly that one, which must be complete.
    """
    path = Path(output_dir if spec == "latest" else spec)
    if PATTERN.match(path.name) and path.parent.name == "checkpoints":
        why = problem(path) if path.is_dir() else "no such folder"
        if why:
            raise ConfigError(f"--resume: {path} is not a complete checkpoint: {why}")
        return path, []
    if not (path / "checkpoints").is_dir():
        if (path / "config.yaml").is_file():
            raise ConfigError(f"--resume: {path} is a run that wrote no checkpoint yet (run.save_every sets how "
                              "often one is written); start it again in a new folder")
        raise ConfigError(f"--resume: {path} holds no checkpoints/ folder (not a flowrl run folder)")
    good, bad = scan(path / "checkpoints")
    notes = [f"skipping {p.name}: {why}" for p, why in bad if not good or _iteration(p) > good[-1][0]]
    if not good:
        detail = "; ".join(notes) or "none written yet"
        raise ConfigError(f"--resume: {path / 'checkpoints'} holds no complete checkpoint ({detail})")
    return good[-1][1], notes


def _iteration(p: Path) -> int:
    return int(PATTERN.match(p.name).group(1))


def prune(root: Path, keep: int) -> list[Path]:
    """Delete complete checkpoints beyond the newest ``keep`` except the best by eval score, and leftovers of
    interrupted writes or deletions. keep = 0 keeps every complete checkpoint. Returns the deleted folders."""
    good, bad = scan(root)
    newest = good[-1][0] if good else -1
    doomed = [p for p in root.iterdir() if p.name.startswith((".tmp-", ".del-"))]
    doomed += [p for p, _ in bad if _iteration(p) < newest]  # incomplete and superseded
    if keep:
        scored = [(read_info(p).get("eval_score"), it, p) for it, p in good]
        scored = [s for s in scored if s[0] is not None]
        best = max(scored, key=lambda s: (s[0], s[1]))[2] if scored else None
        doomed += [p for _, p in good[:-keep] if p != best]
    for p in doomed:
        remove(p)
    return doomed


def remove(folder: Path) -> None:
    """Delete a checkpoint folder, renaming it out of sight first: a crash mid-delete leaves no half folder
    under a real name."""
    if not folder.exists():
        return
    trash = folder if folder.name.startswith(".del-") else folder.with_name(f".del-{folder.name}")
    if trash != folder:
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(folder, trash)
    shutil.rmtree(trash)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_config(saved: dict, current: dict, defaults_of=Config) -> None:
    """Refuse a resume whose config changes a field that alters the experiment; name the first such field.
    ``defaults_of``: the config class whose defaults a key added since the checkpoint may take."""
    old, new = _flatten(saved), _flatten(current)
    defaults = _flatten(to_dict(defaults_of()))
    decays = new.get("training.lr_schedule", "constant") != "constant"
    for key in sorted(set(old) | set(new)):
        if old.get(key, "<absent>") == new.get(key, "<absent>"):
            continue
        if key not in old and key in defaults and new.get(key) == defaults[key]:
            continue  # a key added to flowrl since the checkpoint, at its default: the same experiment
        if key == "run.iterations" and decays:
            raise ConfigError(f"--resume: run.iterations was {old.get(key)!r} in the checkpoint and is "
                              f"{new.get(key)!r} now; training.lr_schedule {new['training.lr_schedule']!r} decays to "
                              "0 at run.iterations, so a new length would bend the schedule already under way")
        if key in RESUMABLE or any(key.startswith(f"{r}.") for r in RESUMABLE):
            continue
        raise ConfigError(f"--resume: {key} was {old.get(key, '<absent>')!r} in the checkpoint and is "
                          f"{new.get(key, '<absent>')!r} now; it changes the experiment, so it must stay (fields "
                          f"that may change on resume: {', '.join(sorted(RESUMABLE))})")


PROMPT_KEYS = ("data.train_prompts", "data.eval_prompts")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_digests(cfg: Config) -> dict:
    """Content hashes of the files that define the experiment beyond the config, which a resume must find
    unchanged: every prompt file the run reads (``data.train_prompts``, ``data.eval_prompts``) and, under
    ``<key>:images``, the input images its rows name (editing sets), hashed together in row order."""
    from flowrl.train.builders import load_prompts, prompt_file  # noqa: PLC0415 (builders imports the samplers)

    out = {}
    for key in PROMPT_KEYS:
        spec = getattr(cfg.data, key.split(".")[1], None)
        if not spec:
            continue
        out[key] = _sha256(prompt_file(spec, key))
        images = [m["image"] for m in load_prompts(spec, key).metadata if "image" in m]
        if images:
            # contents only, in row order: a data folder moved elsewhere is still the same data
            out[f"{key}:images"] = hashlib.sha256(" ".join(_sha256(Path(p)) for p in images).encode()).hexdigest()
    return out


def check_data(saved: dict, cfg: Config, path: Path) -> None:
    """Refuse a resume whose data files changed since the checkpoint at ``path``, naming the key and the file.
    Only keys both sides have are compared: a checkpoint written before a key was hashed (an older flowrl's holds
    data.train_prompts alone) leaves that file unchecked, as unknown."""
    from flowrl.train.builders import prompt_file  # noqa: PLC0415

    now = data_digests(cfg)
    for key in sorted(set(saved) & set(now)):
        if saved[key] != now[key]:
            name = key.split(":")[0]
            where = f"{name} ({prompt_file(getattr(cfg.data, name.split('.')[1]), name)})"
            what = f"an input image named by {where}" if key.endswith(":images") else where
            raise ConfigError(f"--resume: {what} changed since {path.name} was written; a resumed run must read "
                              "the same data (restore it, or start a new run)")


@dataclass
class Resume:
    path: Path        # the checkpoint folder
    info: dict        # its marker
    notes: list[str]  # folders skipped on the way, and why


def prepare_resume(cfg: Config, spec: str) -> Resume:
    """Find the checkpoint ``--resume spec`` names and check that ``cfg`` may continue it; points
    ``cfg.run.output_dir`` at the checkpoint's run folder. Reads only small files: it runs before any model loads."""
    path, notes = resolve(spec, cfg.run.output_dir)
    info = read_info(path)
    cfg.run.output_dir = str(path.parent.parent)  # the run continues in its own folder
    check_config(info["config"], to_dict(cfg), type(cfg))
    check_data(info.get("data", {}), cfg, path)
    if info["iteration"] >= cfg.run.iterations:
        raise ConfigError(f"--resume: {path} is at iteration {info['iteration']} and run.iterations is "
                          f"{cfg.run.iterations}: nothing to do (raise run.iterations to extend the run)")
    return Resume(path, info, notes)


def truncate_log(path: Path, size: int) -> None:
    """Cut an append-only log back to ``size`` bytes (its length when the checkpoint was written)."""
    have = path.stat().st_size if path.exists() else 0
    if have < size:
        raise ConfigError(f"--resume: {path} has {have} bytes but had {size} when the checkpoint was written "
                          "(was it edited or replaced?)")
    if have > size:
        with open(path, "r+b") as f:
            f.truncate(size)
            f.flush()
            os.fsync(f.fileno())
