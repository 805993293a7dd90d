"""The sampler MDP: kernels, schedules, branch plans, the rollout forest. Usable without the trainer."""
from flowrl.sampling.forest import Forest
from flowrl.sampling.kernels import CPS, KERNELS, DDIMEta, FlowSDE, FlowSDEConst, Grid, Kernel, Transition
from flowrl.sampling.plans import PLANS, Children, Cost, Flat, Plan, SplitAt, TrunkBranches, WindowTree
from flowrl.sampling.policy import Conditioning, Policy
from flowrl.sampling.rollout import check_plan, parent_calls, rollout, score_edges
from flowrl.sampling.schedules import SCHEDULES, Constant, OneHot, Schedule, Table, Window

__all__ = [
    "CPS", "KERNELS", "PLANS", "SCHEDULES", "Children", "Conditioning", "Constant", "Cost", "DDIMEta", "Flat",
    "FlowSDE", "FlowSDEConst", "Forest", "Grid", "Kernel", "OneHot", "Plan", "Policy", "Schedule", "SplitAt",
    "Table", "Transition", "TrunkBranches", "Window", "WindowTree", "check_plan", "parent_calls", "rollout",
    "score_edges",
]
