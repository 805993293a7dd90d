"""Flow-GRPO's per-prompt stat tracker: advantages from each prompt's accumulated reward history.

Feed it the all-gathered batch (every process the same keys and rewards) so all processes get the same
advantages; then slice out the local rows. Flow-GRPO calls ``clear()`` every iteration, which makes it
equal to ``group_advantages`` on the batch; keeping the history (optionally capped by ``max_history``)
gives DDPO's running per-prompt baseline.
"""
from __future__ import annotations

from typing import Any, Hashable, Sequence

import torch
from torch import Tensor

from .advantages import ZERO_VAR_TOL, batch_std, check_finite

_STATE_VERSION = 1


def _to_json(key: Hashable) -> Any:
    return [_to_json(k) for k in key] if isinstance(key, tuple) else key


def _from_json(key: Any) -> Hashable:
    return tuple(_from_json(k) for k in key) if isinstance(key, list) else key


class PerPromptStatTracker:
    """Per-key reward history -> z-scored advantages ``(r - mean_k) / (std + eps)``.

    std: "group" (population std of the key's history) or "global" (population std of the current
    batch, Flow-GRPO's global_std). Keys with history std <= zero_var_tol get A = 0 (and all keys do
    in "global" mode when the batch std is <= zero_var_tol). No clip by default (Flow-GRPO clips in
    the loss step); pass clip=5.0 to match ``group_advantages``. Keys must be str / int / float / bool /
    None or tuples of those, so ``state_dict()`` is JSON-serialisable.
    """

    def __init__(self, std: str = "group", eps: float = 1e-4, clip: float | None = None,
                 max_history: int | None = None, zero_var_tol: float = ZERO_VAR_TOL):
        if std not in ("group", "global"):
            raise ValueError(f"std must be 'group' or 'global', got {std!r}")
        if max_history is not None and max_history < 1:
            raise ValueError(f"max_history must be >= 1 or None, got {max_history}")
        self.config = {"std": std, "eps": eps, "clip": clip, "max_history": max_history,
                       "zero_var_tol": zero_var_tol}
        self.history: dict[Hashable, list[float]] = {}
        self.seen: dict[Hashable, None] = {}  # insertion-ordered set, for a stable state_dict
        self.last_zero_variance = 0

    def update(self, keys: Sequence[Hashable], rewards: Tensor) -> Tensor:
        """Append the rewards to their keys' histories and return advantages (rewards' float dtype)."""
        if rewards.dim() != 1 or len(keys) != rewards.numel():
            raise ValueError(f"need 1-D rewards with one key each, got {len(keys)} keys, "
                             f"rewards shape {tuple(rewards.shape)}")
        check_finite(rewards, "rewards")
        cfg = self.config
        r = rewards.detach().to(torch.float64).cpu()
        rows: dict[Hashable, list[int]] = {}
        for i, k in enumerate(keys):
            rows.setdefault(k, []).append(i)
        for k, idx in rows.items():
            hist = self.history.setdefault(k, [])
            hist.extend(r[idx].tolist())
            if cfg["max_history"] is not None:
                del hist[: max(0, len(hist) - cfg["max_history"])]
            self.seen[k] = None
        gstd = float(batch_std(r)) if cfg["std"] == "global" else None
        adv = torch.zeros_like(r)
        zero_var = 0
        for k, idx in rows.items():
            h = torch.tensor(self.history[k], dtype=torch.float64)
            var, mean = torch.var_mean(h, correction=0)  # population std, like np.std
            s = float(var.sqrt())
            if s <= cfg["zero_var_tol"]:
                zero_var += 1
                continue
            denom = s if gstd is None else gstd
            if denom <= cfg["zero_var_tol"]:
                continue
            adv[idx] = (r[idx] - mean) / (denom + cfg["eps"])
        self.last_zero_variance = zero_var
        if cfg["clip"] is not None:
            adv = adv.clamp(-cfg["clip"], cfg["clip"])
        out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
        return adv.to(device=rewards.device, dtype=out_dtype)

    def stats(self) -> dict[str, float]:
        """num_prompts (keys in history), mean_group_size (history length per key), num_zero_variance
        (keys of the last update with no spread), seen_prompts (distinct keys since construction)."""
        sizes = [len(h) for h in self.history.values()]
        return {
            "num_prompts": len(sizes),
            "mean_group_size": sum(sizes) / len(sizes) if sizes else 0.0,
            "num_zero_variance": self.last_zero_variance,
            "seen_prompts": len(self.seen),
        }

    def clear(self) -> None:
        """Forget the histories (Flow-GRPO: every iteration); ``seen_prompts`` keeps counting."""
        self.history = {}

    def state_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable state; floats are Python floats, so a JSON round trip is exact."""
        return {
            "version": _STATE_VERSION,
            "config": dict(self.config),
            "history": [[_to_json(k), list(h)] for k, h in self.history.items()],
            "seen": [_to_json(k) for k in self.seen],
            "last_zero_variance": self.last_zero_variance,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported stat tracker state version {state.get('version')!r}")
        for name, value in self.config.items():
            if state["config"].get(name) != value:
                saved = state["config"].get(name)
                raise ValueError(f"stat tracker config {name!r} differs: saved {saved!r}, this tracker {value!r}")
        self.history = {_from_json(k): [float(x) for x in h] for k, h in state["history"]}
        self.seen = {_from_json(k): None for k in state["seen"]}
        self.last_zero_variance = int(state["last_zero_variance"])
