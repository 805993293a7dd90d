"""DiffusionNFT's math beside the objective (docs/algorithms.md §6, ``training.objective: nft``): its draws,
the forward process, the velocities it trains and the soft-updated sampling policy.

NFT needs no trajectory: each clean sample of the rollout (a leaf) is put back on the rectified-flow forward
process ``x_t = (1 - t) x0 + t noise`` at ``K = training.nft_timesteps`` points per iteration, and the
conditional velocity there is trained with ``flowrl.core.nft_loss``. Unit ``u`` is leaf ``u // K``, draw
``u % K``; its step (a point of the sampling grid, so the model sees the timesteps it samples with) and noise
come from streams keyed by (run seed, iteration, prompt id, sample within the prompt, draw), never by batch
position. The sampler can be anything (the ODE is the usual choice); its log-probs are not used.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

from flowrl.core import nft_loss  # noqa: F401 (the objective calls it through this module)
from flowrl.sampling import Forest
from flowrl.sampling.policy import Policy
from flowrl.sampling.seeding import derive_seed, randn


@dataclass
class NFTUnits:
    x0: Tensor            # (L, ...) clean latents of the leaves
    leaf_prompt: Tensor   # (L,) local prompt position of each leaf
    step: Tensor          # (L * K,) grid step of each unit
    seeds: list[int]      # (L * K,) noise seed of each unit
    K: int

    def __len__(self) -> int:
        return len(self.seeds)

    @property
    def unit_prompt(self) -> Tensor:
        return self.leaf_prompt.repeat_interleave(self.K)


def nft_units(forest: Forest, K: int, seed: int, iteration: int) -> NFTUnits:
    leaves = forest.leaves()
    leaf_prompt = forest.node_prompt[leaves]
    S = forest.grid.num_steps
    steps, seeds, seen = [], [], {}
    for p in leaf_prompt.tolist():
        pid = forest.prompt_ids[p]
        i = seen[p] = seen.get(p, -1) + 1  # the sample's rank among its prompt's leaves (leaves are tree-ordered)
        for j in range(K):
            key = derive_seed(seed, iteration, pid, i, j, "nft")
            g = torch.Generator().manual_seed(key)
            steps.append(int(torch.randint(S, (1,), generator=g)))
            seeds.append(key)
    return NFTUnits(forest.latents[leaves], leaf_prompt, torch.tensor(steps), seeds, K)


def forward_process(units: NFTUnits, mb: Tensor, grid, device) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(x0, noise, t, model timesteps, local prompt) of the micro-batch's units, on ``device``."""
    leaf = mb // units.K
    x0 = units.x0[leaf].to(device, torch.float32)
    noise = torch.stack([randn(x0.shape[1:], units.seeds[u], device) for u in mb.tolist()])
    k = units.step[mb].to(device)
    return x0, noise, grid.sigmas[k].float(), grid.timesteps[k], units.leaf_prompt[leaf].to(device)


def _x_t(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    tb = t.reshape(-1, *([1] * (x0.dim() - 1)))
    return (1 - tb) * x0 + tb * noise


def velocity(policy: Policy, cond, x0: Tensor, noise: Tensor, t: Tensor, timesteps: Tensor, prompt_idx: Tensor,
             guidance_scale: float, guided: bool) -> Tensor:
    """The velocity at ``x_t = (1 - t) x0 + t noise``. ``guided``: the classifier-free-guided velocity the sampler
    uses, so the loss sees exactly the policy that samples (two branches per call). Otherwise the conditional
    velocity alone, the paper's CFG-free training (one branch): under a guided sampler a change d of the
    conditional velocity moves the sampling velocity by w * d, so the learning rate acts w times larger."""
    x_t = _x_t(x0, noise, t)
    if guided:
        return policy.predict(x_t, timesteps, cond, prompt_idx, guidance_scale)
    return policy.forward(x_t.to(policy.dtype), timesteps, cond.take(prompt_idx), cond.shared, guidance_scale).float()


def guide(policy: Policy, cond, x0: Tensor, noise: Tensor, t: Tensor, timesteps: Tensor, prompt_idx: Tensor,
          guidance_scale: float, v_cond: Tensor) -> Tensor:
    """The sampler's guided velocity from an already computed conditional one (one more, unconditional, pass)."""
    if not policy.uses_cfg(cond, guidance_scale):
        return v_cond
    x_t = _x_t(x0, noise, t)
    v_u = policy.forward(x_t.to(policy.dtype), timesteps, cond.take(prompt_idx, "uncond"), cond.shared,
                         guidance_scale).float()
    return policy.combine(v_u, v_cond, guidance_scale)


class SoftPolicy:
    """DiffusionNFT's sampling policy theta_old, kept beside the trained weights theta and soft-updated after each
    iteration i: ``theta_old <- eta_i theta_old + (1 - eta_i) theta`` with ``eta_i = min(rate * i, eta_max)``. It
    starts on-policy (eta 0: theta_old = theta) and then lags the trained weights; rollouts and v_old use it.
    ``state_dict`` / ``load_state_dict`` let accelerate checkpoint it."""

    def __init__(self, params: list[Tensor], eta_max: float, rate: float):
        self.params = [p.detach().clone() for p in params]
        self.eta_max, self.rate = eta_max, rate

    def eta(self, iteration: int) -> float:
        return min(self.rate * iteration, self.eta_max)

    @torch.no_grad()
    def update(self, params: list[Tensor], iteration: int) -> None:
        eta = self.eta(iteration)
        for old, p in zip(self.params, params):
            old.mul_(eta).add_(p.detach(), alpha=1 - eta)

    @contextlib.contextmanager
    def active(self, params: list[Tensor]):
        """theta_old in place of ``params`` (the module's own tensors) inside the block, theta restored after."""
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, old in zip(params, self.params):
                p.copy_(old)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, keep in zip(params, saved):
                    p.copy_(keep)

    def state_dict(self) -> dict:
        return {"params": [p.detach().cpu() for p in self.params]}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for old, p in zip(self.params, state["params"]):
                old.copy_(p)
