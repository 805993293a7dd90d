"""The GRPO family's gradient on the exact Gaussian flow bed (flowrl.train.exact_gradient, docs/algorithms.md §10).

Prints, per kernel, the trainer's mean per-iteration gradient as a fraction of the prediction
1/D * 1/K * (G - 1)/G * grad J (1: unbiased), for the data means and for log s0 apart, with standard errors over
iterations; then, per SDE window (ODE elsewhere), the fraction of grad J the window's estimator recovers and the
cosine between the two. ODE steps carry no score, so a window sees the parameters' effect only through the
steps it samples.

    python scripts/gradient_bed.py --iterations 400            # SD3.5's grid (shift 3)
    python scripts/gradient_bed.py --iterations 400 --shift 1  # the shapes world's grid
"""
from __future__ import annotations

import argparse

import torch

from flowrl.train.exact_gradient import (
    bed_config,
    bed_policy,
    bed_targets,
    exact_gradient,
    iteration_gradient,
    predicted_factor,
)

KERNELS = {"flow_sde (a 0.7)": {"name": "flow_sde", "a": 0.7}, "flow_sde_const (eta 0.3)":
           {"name": "flow_sde_const", "eta": 0.3}}
WINDOWS = [(0, 1), (0, 2), (2, 2), (4, 2), (6, 2), (8, 2), (0, 4), (3, 4), (6, 4), (0, 6), (4, 6), (9, 1)]


def fractions(G: torch.Tensor, pred: torch.Tensor) -> dict[str, tuple[float, float]]:
    """Projection of each iteration's gradient on the prediction, over the prediction's squared norm: mean and
    standard error, for every parameter, the means alone and log s0 alone; and the mean gradient's cosine."""
    out = {}
    for name, part in (("all", slice(None)), ("means", slice(0, -1)), ("log_s0", slice(-1, None))):
        g, p = G[:, part], pred[part]
        r = g @ p / (p @ p)
        out[name] = (float(r.mean()), float(r.std() / len(r) ** 0.5))
    m = G.mean(0)
    out["cosine"] = (float(m @ pred / (m.norm() * pred.norm())), 0.0)
    return out


def measure(kernel: dict, schedule: dict | None, iterations: int, dim: int, steps: int, shift: float):
    cfg = bed_config(kernel, schedule, num_steps=steps)
    policy, targets = bed_policy(dim=dim, shift=shift), bed_targets(dim=dim)
    K = schedule["size"] if schedule else steps
    pred = (predicted_factor(cfg, dim, K) * exact_gradient(policy, cfg, targets)).double()
    G = torch.stack([iteration_gradient(policy, cfg, targets, it) for it in range(iterations)]).double()
    return fractions(G, pred)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=400)
    ap.add_argument("--dim", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--shift", type=float, default=3.0, help="the grid's time shift (SD3.5: 3; the shapes world: 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    fmt = lambda v: f"{v[0]:.3f} ± {v[1]:.3f}"  # noqa: E731
    print("| kernel, every step SDE | all parameters | data means | log s0 |")
    print("|---|---|---|---|")
    for name, kernel in KERNELS.items():
        f = measure(kernel, None, args.iterations, args.dim, args.steps, args.shift)
        print(f"| {name} | {fmt(f['all'])} | {fmt(f['means'])} | {fmt(f['log_s0'])} |")
    print()
    print(f"| SDE window (steps of {args.steps}) | kernel | fraction of grad J: all | data means | log s0 | cosine |")
    print("|---|---|---|---|---|---|")
    for start, size in WINDOWS:
        if start + size > args.steps:
            continue
        for name, kernel in KERNELS.items():
            f = measure(kernel, {"name": "window", "size": size, "start": start}, args.iterations, args.dim,
                        args.steps, args.shift)
            print(f"| [{start}, {start + size}) | {name} | {fmt(f['all'])} | {fmt(f['means'])} | "
                  f"{fmt(f['log_s0'])} | {f['cosine'][0]:.3f} |")


if __name__ == "__main__":
    main()
