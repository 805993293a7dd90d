"""A few Flow-GRPO iterations on the shipped shapes-world base: the machinery, not the learning curve (that is
measured by the recipes and `flowrl eval`, see the README)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from flowrl.models import TOY_BASE, resolve_model_path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "toy_flowgrpo.yaml"
HAVE_BASE = (Path(resolve_model_path(TOY_BASE)) / "model_index.json").is_file()


@pytest.mark.skipif(not HAVE_BASE, reason="the shapes-world base is not built (scripts/pretrain_toy.py)")
def test_toy_flowgrpo_machinery(tmp_path):
    run = tmp_path / "toy"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "flowrl.cli", "train", str(RECIPE), "--set", f"run.output_dir={run}",
                          "--set", "run.iterations=2", "--set", "data.prompts_per_iteration=4",
                          "--set", "eval.every=2", "--set", "eval.num_prompts=8", "--set", "run.progress=false",
                          "--set", "run.dump_advantages=true", "--set", "training.updates_per_epoch=1"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    # one update per iteration, so every update is on-policy: ratio exactly 1
    assert rows[0]["ratio_min"] == pytest.approx(1, abs=1e-6) and rows[0]["ratio_max"] == pytest.approx(1, abs=1e-6)
    # reward wiring: the detector's dense score and correctness, in [0, 1]; eval ran on held-out prompts
    assert 0 <= rows[0]["reward/shapes_mean"] <= 1 and "eval/shapes_mean" in rows[1] \
        and "eval/shapes/correct_mean" in rows[1]   # extras are logged in eval rows too
    # advantages: group-relative (per-prompt mean, global std), so each group sums to 0
    adv = [json.loads(x) for x in (run / "advantages.jsonl").read_text().splitlines()]
    for it in (0, 1):
        for slot in {a["slot"] for a in adv if a["iteration"] == it}:
            group = torch.tensor([a["advantage"] for a in adv if a["iteration"] == it and a["slot"] == slot])
            assert len(group) == 8 and abs(float(group.sum())) < 1e-4
    for name in ("reward_curve.png", "samples/before_after.png", "lora/pytorch_lora_weights.safetensors"):
        assert (run / name).is_file(), name


@pytest.mark.skipif(not HAVE_BASE, reason="the shapes-world base is not built (scripts/pretrain_toy.py)")
def test_toy_nft_machinery(tmp_path):
    """The README's main recipe (CFG-free DiffusionNFT) for two iterations: ODE rollouts without CFG (one pass a step),
    group-relative optimality probabilities averaging 1/2, four updates per iteration, the run folder's outputs."""
    run = tmp_path / "toy_nft"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "flowrl.cli", "train", str(ROOT / "configs" / "toy_nft.yaml"),
                          "--set", f"run.output_dir={run}", "--set", "run.iterations=2",
                          "--set", "data.prompts_per_iteration=4", "--set", "eval.every=2",
                          "--set", "eval.num_prompts=8", "--set", "run.progress=false"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["nft_r"] == pytest.approx(0.5, abs=1e-5) for r in rows)
    assert rows[0]["nfe"] == 4 * 8 * 10 and 0 <= rows[0]["reward/shapes_mean"] <= 1
    assert "eval/shapes_mean" in rows[1]
    for name in ("reward_curve.png", "samples/before_after.png", "lora/pytorch_lora_weights.safetensors"):
        assert (run / name).is_file(), name
    # 8 held-out prompts before (top row) and after (bottom row), each 32x32 image shown at 128x128
    assert Image.open(run / "samples" / "before_after.png").size == (8 * 128, 2 * 128)
