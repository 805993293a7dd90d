"""Quick start on the embedded default: the sampler MDP end to end, offline, on CPU.

    python scripts/quickstart.py [--out runs/quickstart] [--family sd3|flux|sd]

Writes a tiny random-weight pipeline to a local folder, loads it back through the normal
``from_pretrained(path)`` code path, rolls out a Flow-GRPO group (Flat G = 8, SDE on a window of steps) and a
BranchGRPO tree, re-scores every stored stochastic step (importance ratio 1 under unchanged weights), and saves
the decoded samples as a PNG grid. Swap the folder for a real checkpoint (e.g.
stabilityai/stable-diffusion-3.5-medium) on a GPU machine and the same code samples the real model.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

from flowrl.models import load_policy  # noqa: E402
from flowrl.models.tiny import save_tiny  # noqa: E402
from flowrl.sampling import DDIMEta, Flat, FlowSDE, SplitAt, Window, rollout, score_edges  # noqa: E402
from flowrl.train.images import save_grid  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/quickstart")
    ap.add_argument("--family", default="sd3", choices=["sd3", "flux", "sd"])
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model_dir = save_tiny(args.family, out / f"tiny-{args.family}")
    policy = load_policy(str(model_dir), **({} if args.family == "sd" else {"max_sequence_length": 32}))
    kernel = DDIMEta(eta=1.0) if args.family == "sd" else FlowSDE(a=0.7)
    prompts = ["a red circle above a blue square", "two green triangles"]
    size = policy.default_height

    flat = rollout(policy, prompts, plan=Flat(G=8), kernel=kernel, schedule=Window(size=4, start=(0, 2), seed=0),
                   num_steps=10, guidance_scale=4.5, height=size, width=size, iteration=0, seed=0)
    edges = flat.trainable_edges()
    with torch.no_grad():
        logp, _, _ = score_edges(policy, flat, edges)
    drift = float((logp - flat.logp_old[edges]).exp().sub(1).abs().max())
    sde_steps = flat.info["noise_scales"].nonzero().flatten().tolist()
    print(f"Flow-GRPO group: {len(prompts)} prompts x 8 samples, {flat.nfe} model evaluations "
          f"({flat.forward_passes} forward passes with CFG), SDE steps {sde_steps}, "
          f"{len(edges)} trainable steps, max |ratio - 1| on re-scoring = {drift:.2e}")

    tree = rollout(policy, prompts[:1], plan=SplitAt(steps=(0, 3, 6, 9), K=2, correlation=1.0), kernel=kernel,
                   num_steps=20, guidance_scale=4.5, height=size, width=size)
    print(f"BranchGRPO tree: {int(tree.per_tree('leaves')[0])} leaves, {int(tree.per_tree('nfe')[0])} model "
          f"evaluations, {int(tree.per_tree('edges')[0])} edges")

    images = policy.decode(flat.latents[flat.leaves()])
    save_grid(images, out / "samples.png")
    print(f"samples: {out / 'samples.png'} (random weights: expect noise-like images)")


if __name__ == "__main__":
    main()
