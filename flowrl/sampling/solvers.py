"""Multistep DPM-Solver++ (data prediction) on the rectified-flow path, and MixGRPO-Flash's compressed tail
(docs/algorithms.md §3).

On x_t = (1 - t) x0 + t eps, alpha = 1 - t, sigma = t and lambda = log(alpha / sigma). A step s0 -> t with
h = lambda_t - lambda_s0 uses the data predictions m_j = x - t v of the chain's latest states (the history):

    first order   x_t = (t / s0) x - alpha_t (e^-h - 1) D0
    second order  + midpoint: - 1/2 alpha_t (e^-h - 1) D1      heun: + alpha_t ((e^-h - 1) / h + 1) D1
    third order   - alpha_t (e^-h - 1) D0 + alpha_t ((e^-h - 1) / h + 1) D1 - alpha_t ((e^-h - 1 + h) / h^2 - 1/2) D2

with D0 = m0, D1 = (m0 - m1) / r0 (second order) and the divided differences of DPM-Solver's third order,
r_i = h_i / h. The order is lowered where the history is shorter, at the last step (to t = 0, where the update is
m0 itself) and, on grids of fewer than 15 steps, to at most 2 at the second-to-last, as diffusers and the MixGRPO
reference do.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SOLVER_TYPES = ("midpoint", "heun")


def _col(v, x: Tensor) -> Tensor:
    v = torch.as_tensor(v, dtype=torch.float32, device=x.device)
    return v.reshape(-1, *[1] * (x.ndim - 1)) if v.ndim else v


def lam(t: Tensor) -> Tensor:
    return torch.log((1 - t) / t)


def dpm_solver_pp_step(x: Tensor, v: Tensor, t, t_next, history: tuple = (), order: int = 2,
                       solver_type: str = "midpoint", max_order: int | None = None) -> tuple[Tensor, Tensor]:
    """One step t -> t_next from state ``x`` with velocity ``v``; ``history`` holds (m, lambda) of the chain's
    earlier states, oldest first. Returns (x_next, m0) where m0 = x - t v joins the history of the next step.
    ``max_order`` caps the order for this step (the lower-order rules at the end of a grid)."""
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type must be one of {SOLVER_TYPES}, got {solver_type!r}")
    x, v = x.float(), v.float()
    t_, tn = _col(t, x), _col(t_next, x)
    m0 = x - t_ * v
    if bool((tn <= 0).all()):  # lambda = inf: the update lands on the data prediction
        return m0, m0
    used = min(order, len(history) + 1, max_order or order)
    lam0, lam_t = lam(t_), lam(tn)
    h = lam_t - lam0
    em = torch.expm1(-h)  # e^-h - 1
    x_next = (tn / t_) * x - (1 - tn) * em * m0
    if used >= 2:
        m1, lam1 = history[-1]
        r0 = (lam0 - _col(lam1, x)) / h
        d1 = (m0 - m1) / r0
        if used >= 3:
            m2, lam2 = history[-2]
            r1 = (_col(lam1, x) - _col(lam2, x)) / h
            d1_1 = (m1 - m2) / r1
            d2 = (d1 - d1_1) / (r0 + r1)
            d1 = d1 + r0 / (r0 + r1) * (d1 - d1_1)
            x_next = x_next + (1 - tn) * (em / h + 1) * d1 - (1 - tn) * ((em + h) / h**2 - 0.5) * d2
        elif solver_type == "midpoint":
            x_next = x_next - 0.5 * (1 - tn) * em * d1
        else:
            x_next = x_next + (1 - tn) * (em / h + 1) * d1
    return x_next, m0


@dataclass(frozen=True)
class PostWindow:
    """MixGRPO-Flash: after the last stochastic step l of an S-step rollout, the rest of the trajectory is
    re-discretised to max(floor((S - l) ratio), 2) points from t_{l+1} to 0, placed by the model's own time shift
    applied to evenly spaced unshifted times, and solved by multistep DPM-Solver++ of ``order``; earlier ODE
    steps stay the scheduler's Euler step. Every step up to l feeds the solver's history with its data
    prediction, as the reference does (``history: window``), or only the steps after the window do
    (``history: restart``: the first solver step is first order). Flash uses ratio 0.4, Flash* 0.2."""

    ratio: float = 0.4
    order: int = 2
    solver_type: str = "midpoint"
    history: str = "window"

    def __post_init__(self):
        if not 0 < self.ratio <= 1:
            raise ValueError(f"post_window.ratio must be in (0, 1], got {self.ratio}")
        if self.order not in (1, 2, 3):
            raise ValueError(f"post_window.order must be 1, 2 or 3, got {self.order}")
        if self.solver_type not in SOLVER_TYPES:
            raise ValueError(f"post_window.solver_type must be one of {SOLVER_TYPES}, got {self.solver_type!r}")
        if self.history not in ("window", "restart"):
            raise ValueError(f"post_window.history must be 'window' or 'restart', got {self.history!r}")

    def points(self, num_steps: int, last_sde: int) -> int:
        """Grid points of the tail, t_{l+1} .. 0 included (the tail has one step fewer). The reference's floor is
        1 point, which would end the trajectory at t_{l+1}; 2 (one step to t = 0) here."""
        return max(int((num_steps - last_sde) * self.ratio), 2)

    def max_order(self, step: int, num_steps: int) -> int:
        """The reference's lower orders near the end: first at the last step, at most second at the one before
        on grids of fewer than 15 steps."""
        if step == num_steps - 1:
            return 1
        if step == num_steps - 2 and num_steps < 15:
            return 2
        return 3
