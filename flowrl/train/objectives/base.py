"""The objective interface: what a method trains and how (DESIGN: "the loop as a pipeline of named parts").

An objective is registered by the name a recipe uses (``training.objective``). The loop calls, per iteration:
``units`` (the forest and per-sample advantages -> the typed training units), ``prepare`` (per-iteration state
such as a reference velocity, before the first update), ``loss`` for each micro-batch, and ``end_iteration``
after the updates. ``check`` runs at config time, before any model loads, and refuses what the objective cannot
train (a plan, a schedule, a key) naming both sides. ``state`` lists the objects a checkpoint must restore.
"""
from __future__ import annotations

from torch import Tensor

from flowrl.sampling import Forest
from flowrl.train.units import Units


class Objective:
    name = ""
    record: tuple[str, ...] = ()   # what the rollout must record besides log-probs ("mean", "noise")

    @classmethod
    def check(cls, cfg, kernel, schedule_scales: Tensor, plan) -> None:
        """Raise ConfigError for a recipe this objective cannot train."""

    def __init__(self, cfg, policy, views):
        self.cfg, self.policy, self.views = cfg, policy, views

    def units(self, forest: Forest, leaf_adv: Tensor, leaf_group: Tensor, iteration: int,
              leaf_reward: Tensor | None = None) -> Units:
        """``leaf_adv``, ``leaf_group`` and ``leaf_reward`` (the weighted reward, for credits that fuse rewards)
        are per leaf, in ``forest.leaves()`` order."""
        raise NotImplementedError

    def prepare(self, forest: Forest, units: Units, iteration: int) -> None:
        """Per-iteration state computed once before the updates (no gradient)."""

    def loss(self, forest: Forest, units: Units, mb: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-unit losses (len(mb),) of micro-batch ``mb`` (unit ids) and per-unit stats to log."""
        raise NotImplementedError

    def forward_passes(self, forest: Forest, units: Units, mb: Tensor) -> int:
        """Network forward passes with gradient that ``loss`` makes for micro-batch ``mb`` (one per unit)."""
        return len(mb)

    def end_iteration(self, iteration: int) -> dict:
        """After an iteration's applied updates (not after a skipped one); returns entries for the log row."""
        return {}

    def state(self) -> list:
        """Objects with state_dict / load_state_dict that a checkpoint holds."""
        return []
