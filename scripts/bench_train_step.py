"""Training micro-batch overhead: log-prob recompute + clipped loss + backward vs a bare forward + backward.

    python scripts/bench_train_step.py [--units 8] [--repeats 30] [--lora | --full]

Tiny SD3 (64x64, CFG 4.5, LoRA rank 32 by default): one micro-batch of stored SDE steps through the trainer's own
path, the GRPO objective's loss (``score_edges``: CFG stack, kernel mean, Gaussian log-prob; the clipped surrogate)
and the loop's aggregation, then backward, against the same
transformer's forward + backward on the same stacked inputs. Both are timed in one run as adjacent pairs in
alternating order; the median per-pair ratio is printed. Goal: <= 1.10.
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
from flowrl.train.config import Config  # noqa: E402
from flowrl.train.finetune import add_lora  # noqa: E402
from flowrl.train.objectives import GRPO  # noqa: E402
from flowrl.train.units import aggregation  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--units", type=int, default=8, help="stored steps per micro-batch")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    args = ap.parse_args()

    pipe = tiny_sd3_pipeline(seed=0)
    policy = policy_from_pipeline(pipe, max_sequence_length=32)
    den = policy.denoiser
    if args.full:
        den.requires_grad_(True)
    else:
        add_lora(den, "sd3", rank=32, alpha=64, targets=None)
    params = [p for p in den.parameters() if p.requires_grad]
    forest = rollout(policy, ["a red circle above a blue square"], plan=Flat(args.units), kernel=FlowSDE(a=0.7),
                     num_steps=10, guidance_scale=4.5)
    # the trainer's own path: the GRPO objective's units and loss, the loop's aggregation
    objective = GRPO(Config(), policy, views=None)
    units = objective.units(forest, torch.randn(args.units), torch.zeros(args.units, dtype=torch.long), 0)
    ids = torch.randperm(len(units), generator=torch.Generator().manual_seed(0))[: args.units]
    mb = units.edge[ids]
    weights, denom = aggregation(units, ids, "token-mean")

    # the bare twin: the transformer on exactly the rows score_edges feeds it
    x = forest.latents[forest.src[mb]]
    t = forest.grid.timesteps[forest.edge_step[mb]]
    rows = policy.rows(forest.cond, forest.node_prompt[forest.src[mb]], forest.guidance_scale)
    x2, t2 = torch.cat([x, x]), torch.cat([t, t])

    def bare():
        out = den(hidden_states=x2, timestep=t2, encoder_hidden_states=rows["encoder_hidden_states"],
                  pooled_projections=rows["pooled_projections"], return_dict=False)[0]
        out.float().mean().backward()

    def step():
        loss, _ = objective.loss(forest, units, ids)
        ((loss * weights.to(loss)).sum() / denom).backward()

    def timed(fn):
        for p in params:
            p.grad = None
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    for fn in (bare, step, bare, step):  # warm-up
        timed(fn)
    ratios, times = [], {"bare": [], "step": []}
    for i in range(args.repeats):
        order = (("bare", bare), ("step", step)) if i % 2 == 0 else (("step", step), ("bare", bare))
        pair = {name: timed(fn) for name, fn in order}
        for k, v in pair.items():
            times[k].append(v)
        ratios.append(pair["step"] / pair["bare"])
    q = statistics.quantiles(ratios, n=4)
    mode = "full fine-tune" if args.full else "LoRA r32"
    print(f"tiny SD3 64x64, {mode}, micro-batch of {args.units} stored steps, CFG ({2 * args.units} rows)")
    print(f"bare forward + backward: {statistics.median(times['bare']) * 1e3:8.2f} ms")
    print(f"training micro-batch:    {statistics.median(times['step']) * 1e3:8.2f} ms")
    print(f"ratio step / bare:       {statistics.median(ratios):.3f}  (median of {len(ratios)} adjacent pairs, "
          f"interquartile {q[0]:.3f}-{q[2]:.3f}; goal <= 1.10)")


if __name__ == "__main__":
    main()
