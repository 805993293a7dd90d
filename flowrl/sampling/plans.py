"""Rollout shapes (branch plans) and their forward-pass cost (docs/algorithms.md §4).

A plan says how many trees each prompt gets, whether they share their initial noise, and how many children
every frontier node makes at each step. The rollout executes it; the plan itself also knows its cost in closed
form (``nfe`` / ``num_edges`` / ``num_leaves`` per tree), which the forest's own counters are tested against.
"""
from __future__ import annotations

from dataclasses import dataclass, field


class Plan:
    trees_per_prompt: int = 1
    shared_root: bool = False
    correlation: float | None = None  # sibling noise correlation parameter c (None: independent siblings)

    def branching(self, step: int) -> int:
        """Children made by every frontier node at ``step``."""
        return 1

    def split_steps(self, num_steps: int) -> list[int]:
        return [k for k in range(num_steps) if self.branching(k) > 1]

    # closed-form accounting per tree, one model evaluation per frontier node and step (x2 under CFG)
    def frontier_sizes(self, num_steps: int) -> list[int]:
        sizes, n = [], 1
        for k in range(num_steps):
            sizes.append(n)
            n *= self.branching(k)
        return sizes

    def nfe(self, num_steps: int) -> int:
        return sum(self.frontier_sizes(num_steps))

    def num_edges(self, num_steps: int) -> int:
        return sum(n * self.branching(k) for k, n in enumerate(self.frontier_sizes(num_steps)))

    def num_leaves(self, num_steps: int) -> int:
        sizes = self.frontier_sizes(num_steps)
        return sizes[-1] * self.branching(num_steps - 1)


@dataclass
class Flat(Plan):
    """G independent chains per prompt (Flow-GRPO, DanceGRPO). ``shared_noise``: all G chains start from one
    initial noise per prompt (DanceGRPO's option), so they differ only through SDE noise. NFE = G * S."""

    G: int
    shared_noise: bool = False

    def __post_init__(self):
        if self.G < 1:
            raise ValueError(f"Flat.G must be >= 1, got {self.G}")

    @property
    def trees_per_prompt(self):
        return self.G

    @property
    def shared_root(self):
        return self.shared_noise


@dataclass
class SplitAt(Plan):
    """BranchGRPO: one root per prompt; at each step in ``steps`` every frontier node makes K children.

    Siblings draw z_b = (z_0 + c n_b) / sqrt(1 + c^2) with a shared z_0 and private n_b, so each child keeps the
    exact single-rollout marginal and its stored log-prob is a true density. ``correlation`` = c; None draws
    siblings independently. S = 20, steps {0, 3, 6, 9}, K = 2: 16 leaves, 203 forward passes, 218 edges.
    """

    steps: tuple[int, ...] = field(default=(0, 3, 6, 9))
    K: int = 2
    correlation: float | None = None
    trees: int = 1

    def __post_init__(self):
        self.steps = tuple(sorted(set(int(s) for s in self.steps)))
        if self.K < 2:
            raise ValueError(f"SplitAt.K must be >= 2, got {self.K}")
        if self.correlation is not None and self.correlation <= 0:
            raise ValueError("SplitAt.correlation must be > 0 (0 makes siblings identical) or None")

    @property
    def trees_per_prompt(self):
        return self.trees

    def branching(self, step):
        return self.K if step in self.steps else 1


PLANS = {"flat": Flat, "split_at": SplitAt}
