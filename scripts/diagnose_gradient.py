"""How much signal is in a recipe's policy gradient? Measurements on the recipe's own rollouts and rewards.

1. Signal-to-noise: the policy gradient of K independent iterations (fresh rollout noise, the recipe's prompt
   draws, the model held fixed) and the mean cosine between them. Independent estimates of a gradient g with
   noise covariance S agree with cosine about |g|^2 / (|g|^2 + tr S), so a mean cosine near 0 says one
   iteration's update is mostly noise: the recipe needs more samples per update, a smaller learning rate, or
   exploration that the gradient can credit (e.g. shared initial noise within a group). The report also gives
   |g|^2 (the mean dot product of independent pairs, unbiased) and tr S (their spread), so snr = |g| / sqrt(tr S)
   is one update's signal-to-noise, and ``samples_for_snr_1`` the samples per update at which it would reach 1
   (two independent updates then agree at cosine 0.5) if the noise falls as 1 / samples.
   ``--samples 64,256,1024`` repeats it at several samples per update (prompts per iteration = samples / G),
   ``--per-step`` splits the gradient by trajectory step (the units of one step at a time, same rollouts),
   ``--category TAG`` keeps the training prompts whose metadata "tag" is TAG.
2. Line search (``--steps``): the reward, sampled with the ODE as evaluation does, after moving the weights by
   -s * d for each s, on fixed seeds so every s is compared on the same noise. ``--direction``: d is the mean
   gradient over rms (a descent step on the loss, an ascent on the reward when the gradient carries signal),
   its sign (what Adam's first steps do), or a random gaussian direction of rms 1 (how fragile the model is
   to a move of that size that carries no signal).

    python scripts/diagnose_gradient.py configs/toy_flowgrpo.yaml --iterations 6
    python scripts/diagnose_gradient.py configs/toy_flowgrpo.yaml --iterations 8 --samples 64,256,1024 --per-step
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
from pathlib import Path

import torch

from flowrl.sampling import Constant, Flat, rollout
from flowrl.train.config import load_config
from flowrl.train.trainer import Trainer


def gradients(trainer: Trainer, iterations: int, step: int | None = None) -> torch.Tensor:
    """(iterations, num_trainable) policy gradients, one per iteration, without updating the model; with
    ``step``, only the training units of that trajectory step (the same rollouts and advantages)."""
    grads = []
    # the scheduler notices that the optimiser never really steps; that is the point here
    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
    trainer.optimizer.step = lambda *a, **k: grads.append(
        torch.cat([p.grad.detach().flatten().clone() for p in trainer.params]))
    trainer.acc.clip_grad_norm_ = lambda *a, **k: torch.tensor(0.0)  # record the raw gradient
    objective = trainer.objective
    if step is not None:
        units = type(objective).units
        objective.units = lambda *a: (lambda u: u.take(torch.nonzero(u.step == step).flatten()))(
            units(objective, *a))
    try:
        for it in range(iterations):
            trainer.iteration(it)
    finally:
        objective.__dict__.pop("units", None)
    return torch.stack(grads)


def agreement(G: torch.Tensor) -> dict:
    """Statistics of K independent gradient estimates (rows of G): mean pairwise cosine, |E g|^2 (the mean dot
    product of distinct pairs: unbiased), tr Cov (their spread), snr = |E g| / sqrt(tr Cov); standard errors by
    a jackknife over the K estimates (their K(K-1) pairs are not independent)."""
    G = G.double()
    K = len(G)
    off = ~torch.eye(K, dtype=torch.bool)
    unit = G / G.norm(dim=1, keepdim=True)

    def stats(rows):
        g = G[rows]
        k = len(g)
        total = g.sum(0)
        signal = float((total @ total - (g * g).sum()) / (k * (k - 1)))
        noise = float((g - g.mean(0)).pow(2).sum() / (k - 1))
        cos = float((unit[rows] @ unit[rows].T)[off[rows][:, rows]].mean())
        return cos, signal, noise

    full = stats(torch.arange(K))
    loo = torch.tensor([stats(torch.arange(K) != i) for i in range(K)])
    se = ((K - 1) / K * (loo - loo.mean(0)).pow(2).sum(0)).sqrt().tolist()
    cos, signal, noise = full
    return {"iterations": K, "cosine_mean": cos, "cosine_stderr": se[0], "signal_sq": signal,
            "signal_sq_stderr": se[1], "noise_sq": noise, "snr": max(signal, 0.0) ** 0.5 / noise ** 0.5,
            "gradient_norm": float(G.norm(dim=1).mean())}


def category_prompts(path: str, tag: str, out: Path) -> str:
    """A copy of the prompt file holding only the prompts tagged ``tag``."""
    rows = [line for line in Path(path).read_text().splitlines() if line.strip() and json.loads(line).get("tag") == tag]
    if not rows:
        raise SystemExit(f"--category: no prompt in {path} has tag {tag!r}")
    out.write_text("\n".join(rows) + "\n")
    return str(out)


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
    ap.add_argument("--samples", default="", help="comma-separated samples per update (prompts x G) to measure at")
    ap.add_argument("--per-step", action="store_true", help="also the gradient of each trajectory step alone")
    ap.add_argument("--category", default="", help="only the training prompts whose metadata tag is this")
    args = ap.parse_args(argv)
    if args.iterations < 3:
        ap.error("--iterations must be at least 3 (pairs of gradients, and a jackknife over them)")

    samples = [int(x) for x in args.samples.split(",")] if args.samples else [None]
    with tempfile.TemporaryDirectory() as out:
        extra = list(args.set)
        if args.category:
            base_cfg = load_config(args.config, [f"run.output_dir={out}/probe", *args.set])
            extra.append("data.train_prompts=" + category_prompts(base_cfg.data.train_prompts, args.category,
                                                                  Path(out) / "category.jsonl"))
            extra += ["data.balance_key=null", "data.balance_weights={}"]  # one category: nothing to balance
        for i, n in enumerate(samples):
            # one optimiser step per iteration, so each recorded gradient is one iteration's whole update
            sets = [f"run.output_dir={out}/run_{n}", "eval.every=0", "run.progress=false",
                    "training.updates_per_epoch=1", "training.inner_epochs=1", *extra]
            if n is not None:
                group = load_config(args.config, sets).sampling.plan["G"]
                if n % group:
                    ap.error(f"--samples: {n} is not a multiple of the group size G = {group}")
                sets.append(f"data.prompts_per_iteration={n // group}")
            cfg = load_config(args.config, sets)
            trainer = Trainer(cfg)
            G = gradients(trainer, args.iterations)
            n = cfg.data.prompts_per_iteration * cfg.sampling.plan["G"]
            report = {"samples": n, **agreement(G)}
            if report["signal_sq"] > 0:
                report["samples_for_snr_1"] = n * report["noise_sq"] / report["signal_sq"]
            print(json.dumps(report), flush=True)
            if args.per_step:
                steps = {tuple(trainer.schedule.sde_steps(cfg.sampling.num_steps, it)) for it in range(args.iterations)}
                if len(steps) > 1:
                    ap.error("--per-step needs a schedule whose SDE steps are the same every iteration")
                for k in next(iter(steps)):
                    print(json.dumps({"samples": n, "step": k, **agreement(gradients(trainer, args.iterations, k))}),
                          flush=True)
            if i + 1 < len(samples):  # the last trainer stays for the line search
                trainer.acc.end_training()
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
