"""Rollout shapes (branch plans) and their cost (docs/algorithms.md §4).

A plan says how many trees each prompt gets, whether they share their initial noise, and what every frontier node
makes at each step: ``expand(step, num_steps, iteration)`` maps a node *role* to the children a node of that role
makes, each a ``Children(count, kind, role)``. ``kind`` is "schedule" (stochastic where the noise schedule's scale
is > 0, else ODE), "sde" or "ode". Flat chains and BranchGRPO's trees have one role; TempFlow's trunk-and-branches
has two (the ODE trunk, and the branches it sends off, each finished by ODE). The rollout executes it; the plan
also knows its cost per tree (``cost``: model evaluations, edges, stochastic edges, leaves) by counting its own
rules, which the forest's counters and the papers' figures are tested against.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from flowrl.sampling.seeding import derive_seed

MAIN, TRUNK, BRANCH = 0, 1, 2
KINDS = ("schedule", "sde", "ode")


@dataclass(frozen=True)
class Children:
    count: int
    kind: str = "schedule"
    role: int = MAIN


@dataclass(frozen=True)
class Cost:
    """Per tree, for one iteration: model evaluations (a CFG pair counts once), edges, stochastic edges, leaves,
    and the nodes that make more than one stochastic child (TreeGRPO's "training samples")."""

    nfe: int
    edges: int
    sde_edges: int
    leaves: int
    branching_nodes: int


class Plan:
    trees_per_prompt: int = 1
    shared_root: bool = False
    correlation: float | None = None  # sibling noise correlation parameter c (None: independent siblings)
    homogeneous: bool = True          # every frontier node of a step makes the same kind of children
    owns_noise: bool = False          # the plan, not the schedule, says which steps are stochastic
    root_role: int = MAIN

    def branching(self, step: int, iteration: int = 0) -> int:
        """Children made by every frontier node at ``step`` (single-role plans)."""
        return 1

    def expand(self, step: int, num_steps: int, iteration: int = 0) -> dict[int, list[Children]]:
        return {MAIN: [Children(self.branching(step, iteration))]}

    def split_steps(self, num_steps: int, iteration: int = 0) -> list[int]:
        """Steps at which some node makes several children (they must be stochastic)."""
        return [k for k in range(num_steps)
                if any(c.count > 1 for cs in self.expand(k, num_steps, iteration).values() for c in cs)]

    def cost(self, num_steps: int, iteration: int = 0, scales: torch.Tensor | None = None) -> Cost:
        """Counted from ``expand`` over one tree; ``scales`` (the schedule's) decides "schedule" children."""
        nodes = {self.root_role: 1}
        nfe = edges = sde = branching = 0
        for k in range(num_steps):
            spec, nxt = self.expand(k, num_steps, iteration), {}
            for role, n in nodes.items():
                nfe += n
                stochastic = 0
                for c in spec.get(role, []):
                    edges += n * c.count
                    if c.kind == "sde" or (c.kind == "schedule" and (scales is None or float(scales[k]) > 0)):
                        sde += n * c.count
                        stochastic += c.count
                    nxt[c.role] = nxt.get(c.role, 0) + n * c.count
                branching += n if stochastic > 1 else 0
            nodes = nxt
        return Cost(nfe=nfe, edges=edges, sde_edges=sde, leaves=sum(nodes.values()), branching_nodes=branching)

    # the single-number forms the rest of the code reads
    def nfe(self, num_steps: int, iteration: int = 0) -> int:
        return self.cost(num_steps, iteration).nfe

    def num_edges(self, num_steps: int, iteration: int = 0) -> int:
        return self.cost(num_steps, iteration).edges

    def num_leaves(self, num_steps: int, iteration: int = 0) -> int:
        return self.cost(num_steps, iteration).leaves


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
    ``split_sde`` (BranchGRPO-Mix): split steps are stochastic even where the schedule makes the step ODE, at
    the largest scale the schedule uses that iteration.
    """

    steps: tuple[int, ...] = field(default=(0, 3, 6, 9))
    K: int = 2
    correlation: float | None = None
    trees: int = 1
    split_sde: bool = False

    def __post_init__(self):
        self.steps = tuple(sorted(set(int(s) for s in self.steps)))
        if self.K < 2:
            raise ValueError(f"SplitAt.K must be >= 2, got {self.K}")
        if self.correlation is not None and self.correlation <= 0:
            raise ValueError("SplitAt.correlation must be > 0 (0 makes siblings identical) or None")
        if self.trees < 1:
            raise ValueError(f"SplitAt.trees must be >= 1, got {self.trees}")

    @property
    def trees_per_prompt(self):
        return self.trees

    def branching(self, step, iteration=0):
        return self.K if step in self.steps else 1

    def expand(self, step, num_steps, iteration=0):
        split = step in self.steps
        return {MAIN: [Children(self.K if split else 1, "sde" if split and self.split_sde else "schedule")]}


@dataclass
class WindowTree(Plan):
    """TreeGRPO: ODE from each tree's root to a window start i, k stochastic children per node on each of the w
    window steps, ODE completion of every one of the k^w frontier nodes. Per tree: k^w leaves and
    (k^w - 1) / (k - 1) branching nodes.

    The start is drawn per iteration from the truncated geometric law P(i) ∝ r^i, i = 0 .. S - w - 1
    (``start: geometric``, small r favours early, high-noise windows), or moves by ``shift`` every ``tau``
    iterations (``start: shift``, wrapping past the last start), or is fixed (an int). The draw is seeded by
    (seed, iteration): every process and a resumed run see the same window. The schedule supplies only the
    noise scale (use ``constant``): this plan decides which steps are stochastic.
    """

    w: int = 3
    k: int = 3
    trees: int = 1
    start: str | int = "geometric"
    r: float = 0.5
    shift: int = 1
    tau: int = 1
    correlation: float | None = None
    seed: int = 0
    owns_noise = True

    def __post_init__(self):
        if self.w < 1 or self.k < 2 or self.trees < 1:
            raise ValueError(f"WindowTree needs w >= 1, k >= 2, trees >= 1, got w={self.w}, k={self.k}, "
                             f"trees={self.trees}")
        if isinstance(self.start, str) and self.start not in ("geometric", "shift"):
            raise ValueError(f"WindowTree.start must be 'geometric', 'shift' or a step, got {self.start!r}")
        if isinstance(self.start, int) and self.start < 0:
            raise ValueError(f"WindowTree.start must be >= 0, got {self.start}")
        if not 0 < self.r < 1:
            raise ValueError(f"WindowTree.r must be in (0, 1), got {self.r}")
        if self.shift < 1 or self.tau < 1:
            raise ValueError("WindowTree.shift and WindowTree.tau must be >= 1")
        if self.correlation is not None and self.correlation <= 0:
            raise ValueError("WindowTree.correlation must be > 0 or None")

    @property
    def trees_per_prompt(self):
        return self.trees

    def starts(self, num_steps: int) -> int:
        """Number of admissible starts i = 0 .. S - w - 1 (the window ends before the last step)."""
        n = num_steps - self.w
        if n < 1:
            raise ValueError(f"WindowTree: a {self.w}-step window needs at least {self.w + 1} steps, got {num_steps}")
        return n

    def start_probabilities(self, num_steps: int) -> torch.Tensor:
        i = torch.arange(self.starts(num_steps), dtype=torch.float64)
        return (1 - self.r) * self.r ** i / (1 - self.r ** len(i))

    def window_start(self, num_steps: int, iteration: int) -> int:
        n = self.starts(num_steps)
        if isinstance(self.start, int):
            if self.start >= n:
                raise ValueError(f"WindowTree.start {self.start}: the window must end before step {num_steps - 1}")
            return self.start
        if self.start == "shift":
            return (self.shift * (iteration // self.tau)) % n
        g = torch.Generator().manual_seed(derive_seed(self.seed, "tree_window", iteration))
        return int(torch.multinomial(self.start_probabilities(num_steps), 1, generator=g))

    def expand(self, step, num_steps, iteration=0):
        i = self.window_start(num_steps, iteration)
        inside = i <= step < i + self.w
        return {MAIN: [Children(self.k, "sde") if inside else Children(1, "ode")]}


@dataclass
class TrunkBranches(Plan):
    """TempFlow-GRPO: per seed (tree) an ODE trunk; at each trunk state of ``steps`` (default every step but the
    last), K one-step stochastic children, each finished by ODE to a clean sample (its process reward). The
    trunk ends at its last branching state. Per seed: (last + 1) trunk evaluations + K sum_k (S - 1 - k)
    completion evaluations, K |steps| leaves. ``seeds`` trees per prompt, each its own initial noise. The
    schedule supplies only the noise scale (use ``constant``)."""

    K: int = 6
    seeds: int = 4
    steps: tuple[int, ...] | None = None
    correlation: float | None = None
    homogeneous = False
    owns_noise = True
    root_role = TRUNK

    def __post_init__(self):
        if self.K < 1 or self.seeds < 1:
            raise ValueError(f"TrunkBranches needs K >= 1 and seeds >= 1, got K={self.K}, seeds={self.seeds}")
        if self.steps is not None:
            self.steps = tuple(sorted(set(int(s) for s in self.steps)))
            if not self.steps or self.steps[0] < 0:
                raise ValueError(f"TrunkBranches.steps must be non-negative steps, got {self.steps}")
        if self.correlation is not None and self.correlation <= 0:
            raise ValueError("TrunkBranches.correlation must be > 0 or None")

    @property
    def trees_per_prompt(self):
        return self.seeds

    def branch_steps(self, num_steps: int) -> tuple[int, ...]:
        steps = tuple(range(num_steps - 1)) if self.steps is None else self.steps
        if steps[-1] >= num_steps:
            raise ValueError(f"TrunkBranches.steps {list(steps)}: the grid has steps 0..{num_steps - 1}")
        return steps

    def expand(self, step, num_steps, iteration=0):
        steps = self.branch_steps(num_steps)
        trunk = [Children(1, "ode", TRUNK)] if step < steps[-1] else []
        if step in steps:
            trunk = trunk + [Children(self.K, "sde", BRANCH)]
        return {TRUNK: trunk, BRANCH: [Children(1, "ode", BRANCH)]}

    def split_steps(self, num_steps, iteration=0):
        return list(self.branch_steps(num_steps))

    def evaluations(self, num_steps: int) -> int:
        """The closed form per seed, for the tests."""
        steps = self.branch_steps(num_steps)
        return steps[-1] + 1 + self.K * sum(num_steps - 1 - k for k in steps)


PLANS = {"flat": Flat, "split_at": SplitAt, "window_tree": WindowTree, "trunk_branches": TrunkBranches}
