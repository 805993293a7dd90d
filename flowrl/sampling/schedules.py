"""Noise schedules: which denoising steps are stochastic, and how much (docs/algorithms.md §3).

A schedule answers ``noise_scales(num_steps, iteration)`` with a float tensor (S,): 0 marks an ODE step (no
log-prob, never trained), s > 0 an SDE step whose kernel noise level is multiplied by s. The answer may depend on
the training iteration (Flow-GRPO-Fast draws its window each iteration; MixGRPO slides it), so schedules take the
iteration explicitly and draw from a generator seeded by (seed, iteration): every process of a run, and a resumed
run, sees the same window.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flowrl.sampling.seeding import derive_seed


class Schedule:
    def noise_scales(self, num_steps: int, iteration: int = 0) -> torch.Tensor:
        raise NotImplementedError

    def sde_steps(self, num_steps: int, iteration: int = 0) -> list[int]:
        return [int(k) for k in torch.nonzero(self.noise_scales(num_steps, iteration) > 0).flatten()]


@dataclass
class Constant(Schedule):
    """Every step stochastic with the same scale (Flow-GRPO, DanceGRPO)."""

    scale: float = 1.0

    def noise_scales(self, num_steps, iteration=0):
        return torch.full((num_steps,), float(self.scale))


@dataclass
class Window(Schedule):
    """SDE on steps [start, start + size), ODE elsewhere.

    ``start`` is an int (fixed window) or a (low, high) pair: a start drawn uniformly in [low, high] each
    iteration, as Flow-GRPO-Fast does. ``seed`` makes the draw reproducible and identical on every process.

    The window's estimator is biased: ODE steps carry no score, so the parameters' effect through them is not in
    the gradient. On the exact Gaussian bed (docs/algorithms.md §10; 10 steps, Flow-GRPO's kernel) a window
    recovers this fraction of the full gradient of its sampler's expected reward, on SD3.5's grid (shift 3) /
    on the unshifted grid: [0, 2) 0.02 / 0.05, [0, 6) 0.12 / 0.40, [4, 6) 0.08 / 0.28, [6, 8) 0.24 / 0.45,
    [8, 10) 0.77 / 0.25, [4, 10) 1.00 / 0.90 (every step 1.02 / 1.00 ± 0.03); the direction stays 0.7-1.0
    aligned with the true one.
    """

    size: int
    start: int | tuple[int, int] = 0
    scale: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"Window.size must be >= 1, got {self.size}")
        if isinstance(self.start, (tuple, list)):
            lo, hi = self.start
            if not 0 <= lo <= hi:
                raise ValueError(f"Window.start range must satisfy 0 <= low <= high, got {self.start}")
        elif self.start < 0:
            raise ValueError(f"Window.start must be >= 0, got {self.start}")

    def window_start(self, iteration: int) -> int:
        if not isinstance(self.start, (tuple, list)):
            return int(self.start)
        lo, hi = self.start
        g = torch.Generator().manual_seed(derive_seed(self.seed, "window", iteration))
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    def noise_scales(self, num_steps, iteration=0):
        start = self.window_start(iteration)
        if start + self.size > num_steps:
            raise ValueError(f"window [{start}, {start + self.size}) does not fit in {num_steps} steps")
        scales = torch.zeros(num_steps)
        scales[start:start + self.size] = float(self.scale)
        return scales


@dataclass
class OneHot(Schedule):
    """A single SDE step, ODE around it (TempFlow-GRPO, G2RPO branches)."""

    step: int
    scale: float = 1.0

    def noise_scales(self, num_steps, iteration=0):
        if not 0 <= self.step < num_steps:
            raise ValueError(f"OneHot.step {self.step} is outside 0..{num_steps - 1}")
        scales = torch.zeros(num_steps)
        scales[self.step] = float(self.scale)
        return scales


@dataclass
class Table(Schedule):
    """An explicit per-step table (calibrated noise, e.g. DenseGRPO's psi), 0 entries are ODE steps."""

    scales: tuple[float, ...]

    def noise_scales(self, num_steps, iteration=0):
        if len(self.scales) != num_steps:
            raise ValueError(f"Table has {len(self.scales)} entries for {num_steps} steps")
        if any(s < 0 for s in self.scales):
            raise ValueError("Table scales must be >= 0")
        return torch.tensor(self.scales, dtype=torch.float32)


SLIDING_STRATEGIES = ("progressive", "random", "decay", "exp_decay")


@dataclass
class Sliding(Schedule):
    """MixGRPO's window that moves with training: SDE on [l, min(l + size, L)), ODE elsewhere, where
    L = num_steps - margin bounds the window (the reference keeps the last two steps out: margin 2).

    ``progressive``: the start begins at ``first`` and, after every tau iterations at one start, moves by
    ``stride`` (None: by ``size``, windows that do not overlap; 0: frozen, MixGRPO-Flash*). A start that passes
    the last one with a non-empty window (L - 1) goes back to ``first`` (``roll_back``) or stays at L - 1.
    ``decay`` and ``exp_decay`` make tau a function of the start l: max(tau_min, int(tau (1 - l / L) +
    tau_min l / L)) and ceil(tau exp(-k max(0, l - threshold))). ``random``: l uniform in 0 .. L - size each
    iteration, seeded by (seed, iteration).

    The state (start, iterations spent at it) is a function of the iteration, replayed from iteration 0, so every
    process and a resumed run see the same path and the checkpoint's iteration is all the state there is. One
    difference from the reference scheduler: it lets the start reach L, where its window is empty and nothing
    trains (for tau iterations, or for ever without roll-back); here the last start is L - 1.
    """

    size: int = 4
    tau: int = 25
    stride: int | None = 1
    strategy: str = "progressive"
    roll_back: bool = True
    first: int = 0
    margin: int = 2
    tau_min: int | None = None
    threshold: int = 13
    k: float = 0.1
    scale: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.strategy not in SLIDING_STRATEGIES:
            raise ValueError(f"Sliding.strategy must be one of {SLIDING_STRATEGIES}, got {self.strategy!r}")
        if self.size < 1 or self.tau < 1:
            raise ValueError(f"Sliding needs size >= 1 and tau >= 1, got size={self.size}, tau={self.tau}")
        if self.stride is not None and self.stride < 0:
            raise ValueError(f"Sliding.stride must be >= 0 or None (move by the window size), got {self.stride}")
        if self.first < 0 or self.margin < 0:
            raise ValueError("Sliding.first and Sliding.margin must be >= 0")
        if self.tau_min is None:
            self.tau_min = max(1, self.tau // 4)  # the reference scheduler's default
        self._memo: dict[int, tuple[list[int], tuple[int, int]]] = {}  # num_steps -> (starts, state at the end)

    def bound(self, num_steps: int) -> int:
        L = num_steps - self.margin
        if L <= self.first or (self.strategy == "random" and L < self.size):
            raise ValueError(f"Sliding: {num_steps} steps leave no room for a window (size {self.size}, first "
                             f"{self.first}, margin {self.margin})")
        return L

    def dwell(self, start: int, L: int) -> int:
        """Iterations spent at ``start`` before the window moves."""
        if self.strategy == "decay":
            return max(self.tau_min, int(self.tau * (1 - start / L) + self.tau_min * start / L))
        if self.strategy == "exp_decay":
            return math.ceil(self.tau * math.exp(-self.k * max(0, start - self.threshold)))
        return self.tau

    def window_start(self, num_steps: int, iteration: int) -> int:
        L = self.bound(num_steps)
        if self.strategy == "random":
            g = torch.Generator().manual_seed(derive_seed(self.seed, "sliding", iteration))
            return int(torch.randint(0, L - self.size + 1, (1,), generator=g))
        path, state = self._memo.get(num_steps, ([self.first], (self.first, 0)))
        while len(path) <= iteration:  # the reference's update after each iteration
            start, spent = state
            spent += 1
            if spent >= self.dwell(start, L):
                start, spent = start + (self.size if self.stride is None else self.stride), 0
            if start > L - 1:
                start, spent = (self.first, 0) if self.roll_back else (L - 1, 0)
            state = (start, spent)
            path.append(start)
        self._memo[num_steps] = (path, state)
        return path[iteration]

    def noise_scales(self, num_steps, iteration=0):
        start = self.window_start(num_steps, iteration)
        scales = torch.zeros(num_steps)
        scales[start:min(start + self.size, self.bound(num_steps))] = float(self.scale)
        return scales


SCHEDULES = {"constant": Constant, "window": Window, "sliding": Sliding, "one_hot": OneHot, "table": Table}
