"""Per-iteration cost of the shapes-world recipes, side by side in one process: rollout model calls, training
forward passes and wall time per iteration, each as a ratio to Flow-GRPO's.

    python scripts/bench_methods.py [--rounds 6] [--methods flowgrpo,fast,mixgrpo,flash,flash_star,nft]

Every recipe's trainer is built first (the shipped base, the recipe's own batch), then the rounds run the recipes
in turn, one training iteration each (rollout, rewards, the updates), so that a slow spell of the machine falls
on all of them alike; the first round is a warm-up and is not counted. Prints the median seconds per iteration
and each method's ratio to Flow-GRPO's, with the model calls the metrics log. Run it alone: the ratios are
what the machine does with nothing else on it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from flowrl.train.config import load_config  # noqa: E402
from flowrl.train.trainer import Trainer  # noqa: E402
from flowrl.train.validate import validate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# name -> (recipe, overrides, label)
METHODS = {
    "flowgrpo": ("toy_flowgrpo.yaml", [], "Flow-GRPO (SDE window [0, 6) of 10, 6 trained steps)"),
    "fast": ("toy_flowgrpo.yaml", ["sampling.schedule={name: window, size: 2, start: [0, 7]}"],
             "Flow-GRPO-Fast (a 2-step window drawn per iteration)"),
    "mixgrpo": ("toy_mixgrpo.yaml", [], "MixGRPO (sliding 2-step window)"),
    "flash": ("toy_mixgrpo_flash.yaml", [], "MixGRPO-Flash (ratio 0.4 tail)"),
    "flash_star": ("toy_mixgrpo_flash.yaml", ["sampling.schedule={name: sliding, size: 2, tau: 60, stride: 0}",
                                              "sampling.post_window={ratio: 0.2}"],
                   "MixGRPO-Flash* (frozen window, ratio 0.2 tail)"),
    "nft": ("toy_nft.yaml", [], "DiffusionNFT (the main command, CFG-free ODE)"),
    "treegrpo": ("toy_treegrpo.yaml", [], "TreeGRPO"),
    "tempflow": ("toy_tempflow.yaml", [], "TempFlow-GRPO"),
    "branchgrpo": ("toy_branchgrpo.yaml", [], "BranchGRPO"),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6, help="iterations per method, the first one a warm-up")
    ap.add_argument("--methods", default="flowgrpo,fast,mixgrpo,flash,flash_star,nft")
    args = ap.parse_args()
    names = args.methods.split(",")
    unknown = [n for n in names if n not in METHODS]
    if unknown or "flowgrpo" not in names:
        raise SystemExit(f"--methods: unknown {unknown}; the list must hold flowgrpo (the ratios' reference); "
                         f"choices: {sorted(METHODS)}")
    tmp = Path(tempfile.mkdtemp(prefix="flowrl_bench_"))
    trainers = {}
    for n in names:
        recipe, sets, _ = METHODS[n]
        cfg = load_config(ROOT / "configs" / recipe, [*sets, f"run.output_dir={tmp / n}", "run.progress=false",
                                                      "eval.every=0", f"run.iterations={args.rounds}"])
        validate(cfg)
        trainers[n] = Trainer(cfg)
    times = {n: [] for n in names}
    phases = {n: {"time/rollout": [], "time/train": []} for n in names}
    rows = {}
    for r in range(args.rounds):
        for n in names:
            t0 = time.perf_counter()
            rows[n] = trainers[n].iteration(r)
            if r:
                times[n].append(time.perf_counter() - t0)
                for k in phases[n]:
                    phases[n][k].append(rows[n][k])
    ref = statistics.median(times["flowgrpo"])
    ref_calls = rows["flowgrpo"]["nfe/rollout_calls"]
    print(f"{args.rounds - 1} timed iterations per method, alternating, after one warm-up; 8 prompts x 8 samples")
    print("| method | rollout calls / iteration | ratio | training forward passes | rollout s | training s | "
          "s / iteration | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for n in names:
        t = statistics.median(times[n])
        calls = rows[n]["nfe/rollout_calls"]
        roll, train = (statistics.median(phases[n][k]) for k in ("time/rollout", "time/train"))
        print(f"| {METHODS[n][2]} | {calls} | {calls / ref_calls:.2f} | {rows[n]['nfe/train_forward']} | {roll:.2f} | "
              f"{train:.2f} | {t:.2f} | {t / ref:.2f} |")


if __name__ == "__main__":
    main()
