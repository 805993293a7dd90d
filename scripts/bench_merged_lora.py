"""Merged-LoRA rollouts (finetune.merged_sampling) vs rollouts through the peft adapter, on the shipped toy base.

    python scripts/bench_merged_lora.py [--batch 64] [--steps 10] [--rank 16] [--repeats 12]

The toy recipes' rollout (CFG-free ODE, 8 prompts x 8 samples) with a rank-16 LoRA on the joint attention, its B
drawn at random so that the adapter changes the output; both variants timed in one run in alternating adjacent
pairs on the same prompts and seeds. Prints the median per-pair time ratio and the largest difference between
the two rollouts' final latents (the same policy, rounded differently).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from flowrl.models import load_pipeline, policy_from_pipeline  # noqa: E402
from flowrl.sampling import Constant, Flat, FlowSDE, rollout  # noqa: E402
from flowrl.train import finetune  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=12)
    args = ap.parse_args()

    pipe = load_pipeline("toy:shapes")
    policy = policy_from_pipeline(pipe, max_sequence_length=16)
    finetune.add_lora(policy.denoiser, "sd3", args.rank, args.rank, None)
    gen = torch.Generator().manual_seed(0)
    for name, p in policy.denoiser.named_parameters():
        if "lora_B" in name:
            p.data.copy_(0.02 * torch.randn(p.shape, generator=gen))
    prompts = ["a red circle", "a blue square above a green triangle", "three yellow circles", "a purple square",
               "a red triangle left of a blue circle", "two green squares", "an orange circle", "a blue triangle"]
    per_prompt = max(1, args.batch // len(prompts))

    @torch.no_grad()
    def adapter():
        return rollout(policy, prompts, plan=Flat(per_prompt), kernel=FlowSDE(a=0.7), schedule=Constant(0.0),
                       num_steps=args.steps, guidance_scale=1.0, seed=0).latents

    def merged():
        with finetune.merged_lora(policy.denoiser):
            return adapter()

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    diff = float((adapter() - merged()).abs().max())  # also the warm-up
    times = {"adapter": [], "merged": []}
    ratios = []
    for i in range(args.repeats):  # alternating adjacent pairs: this machine's speed drifts over seconds
        order = (("adapter", adapter), ("merged", merged)) if i % 2 == 0 else (("merged", merged), ("adapter", adapter))
        pair = {name: timed(fn) for name, fn in order}
        for name, t in pair.items():
            times[name].append(t)
        ratios.append(pair["merged"] / pair["adapter"])
    q = statistics.quantiles(ratios, n=4)
    print(f"toy base, LoRA rank {args.rank}, {len(prompts)} prompts x {per_prompt}, {args.steps} ODE steps without "
          f"CFG, torch threads {torch.get_num_threads()}")
    for name, ts in times.items():
        print(f"{name:8s} rollout: {statistics.median(ts) * 1e3:8.1f} ms (median of {args.repeats})")
    print(f"ratio merged / adapter: {statistics.median(ratios):.3f} (median of {len(ratios)} adjacent pairs, "
          f"interquartile {q[0]:.3f}-{q[2]:.3f}); largest latent difference {diff:.2e}")


if __name__ == "__main__":
    main()
