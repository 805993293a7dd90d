"""Config sections -> objects: sampler pieces, prompt sets, model family. Shared by validation and the trainer,
so a config that validates is one that builds."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from flowrl.models import FAMILIES, FAMILY_OF_PIPELINE, resolve_model_path
from flowrl.sampling import KERNELS, PLANS, SCHEDULES
from flowrl.sampling.seeding import derive_seed
from flowrl.sampling.solvers import PostWindow
from flowrl.train.config import ConfigError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _from_registry(spec: dict, registry: dict, key: str):
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in registry:
        raise ConfigError(f"{key}.name: {name!r} is not one of {sorted(registry)}")
    if isinstance(spec.get("start"), list):
        spec["start"] = tuple(spec["start"])
    return _construct(registry[name], spec, key, f" for {name}")


def _construct(cls, spec: dict, key: str, what: str = ""):
    """``cls(**spec)``, with an unknown parameter or a bad value reported as one ConfigError naming ``key``."""
    fields = {f.name for f in dataclasses.fields(cls)}
    for param in spec:
        if param not in fields:
            raise ConfigError(f"unknown config key {key}.{param}{what} (its parameters: {sorted(fields)})")
    try:
        return cls(**spec)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key}: {e}") from None


def make_kernel(spec: dict):
    return _from_registry(spec, KERNELS, "sampling.kernel")


def make_schedule(spec: dict, seed: int = 0, rank: int = 0):
    """A window's draws are seeded by the run seed: one start per iteration for every process, or with
    ``draw: batch`` one per process's batch (flow_grpo draws per sampling batch, each GPU its own)."""
    spec = dict(spec)
    if spec.get("name") == "sliding":
        spec.setdefault("seed", seed)
    if spec.get("name") == "window":
        draw = spec.pop("draw", "iteration")
        if draw not in ("iteration", "batch"):
            raise ConfigError(f"sampling.schedule.draw: {draw!r} is not one of ['iteration', 'batch']")
        if draw == "batch":
            seed = derive_seed(seed, "rank", rank)
        spec.setdefault("seed", seed)
    return _from_registry(spec, SCHEDULES, "sampling.schedule")


def make_post_window(spec: dict | None):
    """MixGRPO-Flash's tail (sampling.post_window), or None."""
    return None if spec is None else _construct(PostWindow, dict(spec), "sampling.post_window")


def make_sampler(cfg, rank: int = 0):
    """(kernel, plan, schedule, post_window) of a recipe, for process ``rank``."""
    s = cfg.sampling
    return (make_kernel(s.kernel), make_plan(s.plan, cfg.run.seed), make_schedule(s.schedule, cfg.run.seed, rank),
            make_post_window(s.post_window))


def make_plan(spec: dict, seed: int = 0):
    """A plan that draws per iteration (TreeGRPO's window start) is seeded by the run seed unless it names one."""
    spec = dict(spec)
    if spec.get("name") in PLANS and "seed" in {f.name for f in dataclasses.fields(PLANS[spec["name"]])}:
        spec.setdefault("seed", seed)
    return _from_registry(spec, PLANS, "sampling.plan")


def model_family(path: str) -> str:
    """The family name (flowrl.models.FAMILIES), from ``tiny:<family>`` or the folder's model_index.json;
    checked before loading.

    A hub id is accepted as is when the hub is reachable, and must be in the local cache when HF_HUB_OFFLINE is
    set (otherwise loading would fail minutes later)."""
    path = resolve_model_path(path)
    if path.startswith("tiny:"):
        family = path.split(":", 1)[1]
        if family not in FAMILIES:  # every family has a tiny builder (flowrl.models.tiny)
            raise ConfigError(f"model.path: unknown tiny family {family!r} ({', '.join(FAMILIES)})")
        return family
    index = Path(path) / "model_index.json"
    if not index.is_file():
        if Path(path).exists() or not HUB_ID.match(path):
            raise ConfigError(f"model.path: {path} is not a diffusers pipeline folder (no model_index.json)")
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path, "model_index.json")
        if not isinstance(cached, str):
            if os.environ.get("HF_HUB_OFFLINE"):
                raise ConfigError(f"model.path: {path} is not a local folder and not in the hub cache "
                                  "(HF_HUB_OFFLINE is set)")
            return "unknown"  # resolved at load time
        index = Path(cached)
    cls = json.loads(index.read_text()).get("_class_name", "")
    if cls not in FAMILY_OF_PIPELINE:
        raise ConfigError(f"model.path: {path} holds a {cls or 'unknown'} pipeline; supported: "
                          f"{sorted(FAMILY_OF_PIPELINE)}")
    return FAMILY_OF_PIPELINE[cls]


@dataclass
class PromptSet:
    prompts: list[str]
    metadata: list[dict]

    def __len__(self):
        return len(self.prompts)


SHIPPED = "prompts:"  # prompts:<name> names a prompt set shipped in flowrl/data/prompts (as toy:shapes the base)
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "data" / "prompts"


def shipped_prompts() -> list[str]:
    return sorted(p.stem for p in SHIPPED_DIR.iterdir() if p.suffix in (".txt", ".jsonl"))


def prompt_file(path: str, key: str = "data.train_prompts") -> Path:
    """The file a prompt-set name or path points to: ``prompts:<name>`` (a shipped set, see
    flowrl/data/prompts/PROVENANCE.md), else a path."""
    if not path:
        raise ConfigError(f"{key}: no prompt file given")
    if path.startswith(SHIPPED):
        name = path[len(SHIPPED):]
        hits = [SHIPPED_DIR / f"{name}{ext}" for ext in ("", ".jsonl", ".txt")]
        hits = [h for h in hits if h.is_file() and h.suffix in (".txt", ".jsonl")]
        if not hits:
            raise ConfigError(f"{key}: no shipped prompt set {name!r}; shipped: {', '.join(shipped_prompts())}")
        return hits[0]
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{key}: prompt file not found: {path}")
    return p


def load_prompts(path: str, key: str = "data.train_prompts") -> PromptSet:
    """A .txt file (one prompt a line, blank lines skipped) or .jsonl ({"prompt": ..., other keys: metadata}),
    by path or shipped name (``prompts:toy_heldout``). An ``image`` key (editing prompts: the input image) is a
    path relative to the file's folder, resolved and checked here."""
    p = prompt_file(path, key)
    prompts, metadata = [], []
    if p.suffix == ".jsonl":
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{key}: {path}:{i} is not valid JSON: {e.msg}") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ConfigError(f"{key}: {path}:{i} has no string field 'prompt'")
            if "image" in row:
                row["image"] = _input_image(row["image"], p.parent, f"{key}: {path}:{i}")
            prompts.append(row.pop("prompt"))
            metadata.append(row)
    elif p.suffix == ".txt":
        prompts = [line.strip() for line in p.read_text().splitlines() if line.strip()]
        metadata = [{} for _ in prompts]
    else:
        raise ConfigError(f"{key}: {path} must be a .txt or .jsonl file")
    if not prompts:
        raise ConfigError(f"{key}: {path} holds no prompts")
    return PromptSet(prompts, metadata)


def _input_image(value, folder: Path, where: str) -> str:
    """An editing row's input image: a path relative to the prompt file's folder (or absolute), checked now."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: 'image' must be a path to an image file, got {value!r}")
    path = Path(value) if Path(value).is_absolute() else folder / value
    if not path.is_file():
        raise ConfigError(f"{where}: input image not found: {path}")
    return str(path.resolve())


def prompt_images(metadata: list[dict], where: str = "prompts") -> list:
    """The input images (RGB PIL) of editing prompts, one per row, from their 'image' field."""
    from PIL import Image, UnidentifiedImageError

    missing = [i for i, m in enumerate(metadata) if "image" not in m]
    if missing:
        raise ConfigError(f"{where}: an editing model needs an 'image' field on every prompt row; rows "
                          f"{missing[:5]} have none")
    images = []
    for m in metadata:
        try:
            with Image.open(m["image"]) as im:
                images.append(im.convert("RGB"))
        except (OSError, UnidentifiedImageError) as e:
            raise ConfigError(f"{where}: cannot read input image {m['image']}: {e}") from None
    return images


def balance_weights(metadata: list[dict], key: str, shares: dict | None = None) -> torch.Tensor:
    """Per-prompt sampling weights that give every value of ``metadata[key]`` the same total weight, or the total
    ``shares[value]`` (default 1) relative to the others."""
    values = [m.get(key) for m in metadata]
    if any(v is None for v in values):
        raise ConfigError(f"data.balance_key: some prompts have no metadata field {key!r}")
    counts = {v: values.count(v) for v in set(values)}
    shares = shares or {}
    for name, share in shares.items():
        if name not in counts:
            raise ConfigError(f"data.balance_weights.{name}: no training prompt has {key} {name!r} "
                              f"(values: {sorted(map(str, counts))})")
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not math.isfinite(share) or share <= 0:
            raise ConfigError(f"data.balance_weights.{name}: must be a positive number, got {share!r}")
    return torch.tensor([shares.get(v, 1.0) / counts[v] for v in values], dtype=torch.float64)


def prompt_indices(seed: int, iteration: int, total: int, n: int, weights: torch.Tensor | None = None) -> list[int]:
    """The iteration's n global prompt indices, seeded by (seed, iteration) so every process and any resumed run
    agree without shared state: a fresh permutation per iteration, or with ``weights`` a weighted draw without
    replacement (e.g. balanced over GenEval categories)."""
    g = torch.Generator().manual_seed(derive_seed(seed, "prompts", iteration))
    if weights is not None:
        return torch.multinomial(weights, n, replacement=n > total, generator=g).tolist()
    perms = [torch.randperm(total, generator=g) for _ in range(math.ceil(n / total))]
    return torch.cat(perms)[:n].tolist()


def prompt_sets(cfg):
    """A run's training prompts, eval prompts (or None) and balanced sampling weights (or None): both trainers'."""
    d = cfg.data
    train = load_prompts(d.train_prompts)
    evals = load_prompts(d.eval_prompts, "data.eval_prompts") if d.eval_prompts else None
    weights = balance_weights(train.metadata, d.balance_key, d.balance_weights) if d.balance_key else None
    return train, evals, weights
