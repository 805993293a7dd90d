"""Pretrain the shapes world's tiny SD3 base and save it as a diffusers folder.

    python scripts/pretrain_toy.py [--out flowrl/toy/base] [--seed 0] [--flow-steps N] [--vae-steps N]

Deterministic given the seed and the step counts (CPU, float32, the same torch thread count): the defaults
reproduce the base shipped in flowrl/toy/base. The result loads with the normal
``StableDiffusion3Pipeline.from_pretrained(path)``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from flowrl.toy.pretrain import PretrainConfig, pretrain  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="flowrl/toy/base")
    for f in dataclasses.fields(PretrainConfig):
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = ap.parse_args()
    cfg = PretrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainConfig)})
    pipe = pretrain(cfg)
    pipe.save_pretrained(args.out)
    print(f"saved the toy base to {args.out}")


if __name__ == "__main__":
    main()
