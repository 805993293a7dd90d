"""The sampler MDP: kernels, schedules, branch plans, the rollout forest. Usable without the trainer."""
from flowrl.sampling.forest import Forest
from flowrl.sampling.kernels import CPS, KERNELS, DDIMEta, FlowSDE, FlowSDEConst, Grid, Kernel, Transition
from flowrl.sampling.plans import PLANS, Flat, Plan, SplitAt
from flowrl.sampling.policy import Conditioning, Policy
from flowrl.sampling.rollout import rollout, score_edges
from flowrl.sampling.schedules import SCHEDULES, Constant, OneHot, Schedule, Table, Window

__all__ = [
    "CPS", "KERNELS", "PLANS", "SCHEDULES", "Conditioning", "Constant", "DDIMEta", "Flat", "FlowSDE",
    "FlowSDEConst", "Forest", "Grid", "Kernel", "OneHot", "Plan", "Policy", "Schedule", "SplitAt", "Table",
    "Transition", "Window", "rollout", "score_edges",
]
