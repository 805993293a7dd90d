"""How much signal is in a recipe's policy gradient? Two measurements on the recipe's own rollouts and rewards.

1. Signal-to-noise: the policy gradient of K independent iterations (fresh rollout noise, the recipe's prompt
   draws, the model held fixed) and the mean cosine between them. Independent estimates of a gradient g with
   noise covariance S agree with cosine about |g|^2 / (|g|^2 + tr S), so a mean cosine near 0 says one
   iteration's update is mostly noise: the recipe needs more samples per update, a smaller learning rate, or
   exploration that the gradient can credit (e.g. shared initial noise within a group).
2. Line search (``--steps``): the reward, sampled with the ODE as evaluation does, after moving the weights by
   -s * d for each s, on fixed seeds so every s is compared on the same noise. ``--direction``: d is the mean
   gradient over rms (a descent step on the loss, an ascent on the reward when the gradient carries signal),
   its sign (what Adam's first steps do), or a random gaussian direction of rms 1 (how fragile the model is
   to a move of that size that carries no signal).

    python scripts/diagnose_gradient.py configs/toy_flowgrpo.yaml --iterations 6
    python scripts/diagnose_gradient.py configs/toy_flowgrpo.yaml --iterations 12 --steps 0,3e-4,1e-3,3e-3,-1e-3 \
        --set data.train_prompts=my_eight_prompts.jsonl

The optimiser never steps: its ``step`` is replaced by a hook that records the accumulated gradient, so the
trainer's own rollout, reward, advantage and loss code is what is measured.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import warnings

import torch

from flowrl.sampling import Constant, Flat, rollout
from flowrl.train.config import load_config
from flowrl.train.trainer import Trainer


def gradients(trainer: Trainer, iterations: int) -> torch.Tensor:
    """(iterations, num_trainable) policy gradients, one per iteration, without updating the model."""
    grads = []
    # the scheduler notices that the optimiser never really steps; that is the point here
    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
    trainer.optimizer.step = lambda *a, **k: grads.append(
        torch.cat([p.grad.detach().flatten().clone() for p in trainer.params]))
    trainer.acc.clip_grad_norm_ = lambda *a, **k: torch.tensor(0.0)  # record the raw gradient
    for it in range(iterations):
        trainer.iteration(it)
    return torch.stack(grads)


def ode_reward(trainer: Trainer, samples_per_prompt: int, seed: int = 10_000) -> dict[str, float]:
    """Mean reward components of ODE samples of the training prompts (all of them, fixed seeds)."""
    c, prompts, meta = trainer.cfg, trainer.train_set.prompts, trainer.train_set.metadata
    with torch.no_grad():
        forest = rollout(trainer.policy, prompts, plan=Flat(samples_per_prompt), kernel=trainer.kernel,
                         schedule=Constant(0.0), num_steps=c.sampling.num_steps,
                         guidance_scale=c.sampling.guidance_scale, height=c.model.height, width=c.model.width,
                         seed=seed, iteration=0, prompt_ids=list(range(len(prompts))),
                         max_batch=c.sampling.max_batch)
        leaves = forest.leaves()
        images = trainer._decode(forest.latents[leaves])
        who = forest.node_prompt[leaves].tolist()
        scores = trainer.reward(images, [prompts[i] for i in who], [meta[i] for i in who],
                                groups=forest.node_prompt[leaves])
    return {k: float(v.mean()) for k, v in scores.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--iterations", type=int, default=6, help="independent gradient estimates (K)")
    ap.add_argument("--steps", default="", help="comma-separated line-search step sizes s (rms of the move)")
    ap.add_argument("--direction", choices=("gradient", "sign", "random"), default="gradient")
    ap.add_argument("--samples-per-prompt", type=int, default=16, help="ODE samples per prompt in the line search")
    args = ap.parse_args(argv)
    if args.iterations < 3:
        ap.error("--iterations must be at least 3 (pairs of gradients, and a jackknife over them)")

    with tempfile.TemporaryDirectory() as out:
        # one optimiser step per iteration, so each recorded gradient is one iteration's whole update
        cfg = load_config(args.config, [f"run.output_dir={out}/run", "eval.every=0", "run.progress=false",
                                        "training.updates_per_epoch=1", "training.inner_epochs=1", *args.set])
        trainer = Trainer(cfg)
        G = gradients(trainer, args.iterations)
        unit = G / G.norm(dim=1, keepdim=True)
        C = unit @ unit.T
        K = len(G)
        off = ~torch.eye(K, dtype=torch.bool)
        # the K(K-1) pairs share their K gradients, so the standard error is a jackknife over iterations
        loo = torch.stack([C[keep][:, keep][off[keep][:, keep]].mean()
                           for keep in (torch.arange(K) != i for i in range(K))])
        se = float(((K - 1) / K * (loo - loo.mean()).pow(2).sum()).sqrt())
        report = {"iterations": K, "cosine_mean": float(C[off].mean()), "cosine_stderr": se,
                  "gradient_norm": float(G.norm(dim=1).mean())}
        print(json.dumps(report), flush=True)
        if args.steps:
            mean = G.mean(0)
            if args.direction == "gradient":
                direction = mean / mean.pow(2).mean().sqrt()
            elif args.direction == "sign":
                direction = mean.sign()
            else:
                direction = torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
            base = torch.nn.utils.parameters_to_vector(trainer.params).detach().clone()
            for s in (float(x) for x in args.steps.split(",")):
                with torch.no_grad():  # the loss gradient: descending it is ascending the reward
                    torch.nn.utils.vector_to_parameters(base - s * direction, trainer.params)
                print(json.dumps({"step": s, **ode_reward(trainer, args.samples_per_prompt)}), flush=True)
            with torch.no_grad():
                torch.nn.utils.vector_to_parameters(base, trainer.params)
        trainer.acc.end_training()


if __name__ == "__main__":
    main()
