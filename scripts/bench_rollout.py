"""Rollout overhead: a Flat rollout of the tiny SD3 vs the same number of bare transformer forwards.

    python scripts/bench_rollout.py [--batch 8] [--steps 10] [--repeats 30]

Both are timed in one run, interleaved, on the same inputs (prompts encoded once outside both timings, CFG on,
so every step is one transformer call on 2 x batch rows). The ratio is what the sampler adds on top of the
network: kernels, per-node seeded noise, log-probs and forest bookkeeping, and CFG batching. Goal: <= 1.03.
A second figure times the rollout with the network stubbed out, the sampler's own cost.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from flowrl.models import policy_from_pipeline  # noqa: E402
from flowrl.models.tiny import tiny_sd3_pipeline  # noqa: E402
from flowrl.sampling import Flat, FlowSDE, rollout  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--guidance", type=float, default=4.5)
    args = ap.parse_args()

    policy = policy_from_pipeline(tiny_sd3_pipeline(seed=0), max_sequence_length=32)
    prompts = ["a red circle above a blue square"]
    cond = policy.encode(prompts)
    grid = policy.grid(args.steps)
    n = 2 * args.batch
    x = torch.randn(n, *policy.latent_shape())
    rows = policy.rows(cond, torch.zeros(args.batch, dtype=torch.long), args.guidance)

    @torch.no_grad()
    def bare():
        for k in range(args.steps):
            policy.denoiser(hidden_states=x, timestep=grid.timesteps[k].expand(n), return_dict=False,
                            encoder_hidden_states=rows["encoder_hidden_states"],
                            pooled_projections=rows["pooled_projections"])

    def sampler():
        rollout(policy, prompts, cond=cond, plan=Flat(args.batch), kernel=FlowSDE(a=0.7), num_steps=args.steps,
                guidance_scale=args.guidance)

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    for fn in (bare, sampler):  # warm-up
        fn()
    # This machine's speed drifts by 10-30% over seconds: time adjacent pairs in alternating order and take
    # the median of the per-pair ratios, which cancels drift that a ratio of two medians would not.
    times = {"bare": [], "rollout": []}
    ratios = []
    for i in range(args.repeats):
        order = (("bare", bare), ("rollout", sampler)) if i % 2 == 0 else (("rollout", sampler), ("bare", bare))
        pair = {name: timed(fn) for name, fn in order}
        for name, t in pair.items():
            times[name].append(t)
        ratios.append(pair["rollout"] / pair["bare"])
    med = {k: statistics.median(v) for k, v in times.items()}

    # The same rollout with the network replaced by a stored output: what the sampler itself costs. Steadier
    # than the direct ratio on a noisy machine, and it says where any excess comes from.
    with torch.no_grad():
        stored = policy.forward(x, grid.timesteps[:1].expand(n), rows, cond.shared, args.guidance)
    policy.forward = lambda *a, **k: stored
    sampler()
    null = statistics.median([timed(sampler) for _ in range(args.repeats)])
    del policy.forward
    print(f"tiny SD3, batch {args.batch}, {args.steps} steps, CFG {args.guidance} ({n} rows per call), "
          f"torch threads {torch.get_num_threads()}")
    print(f"bare transformer forwards: {med['bare'] * 1e3:8.2f} ms (median of {args.repeats})")
    print(f"flat rollout:              {med['rollout'] * 1e3:8.2f} ms")
    print(f"rollout, network stubbed:  {null * 1e3:8.2f} ms  -> (bare + stubbed) / bare = "
          f"{(med['bare'] + null) / med['bare']:.3f}")
    q = statistics.quantiles(ratios, n=4)
    print(f"ratio rollout / bare:      {statistics.median(ratios):.3f}  (median of {len(ratios)} adjacent pairs, "
          f"interquartile {q[0]:.3f}-{q[2]:.3f}; goal <= 1.03)")


if __name__ == "__main__":
    main()
