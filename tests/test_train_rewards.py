"""Several rewards in training: the two combination modes against a hand computation, and a tiny `flowrl train`
run with a pointwise and a pairwise (Pref-GRPO) reward that logs each component and trains on the advantages
the hand formula gives."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flowrl.train.config import load_config
from flowrl.train.scoring import advantages_from_rewards

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "tiny_smoke.yaml"

# Two groups of four (slots 5 and 2), two components, weights a: 1, b: 2.
A = [1, 3, 1, 3, 0, 0, 4, 4]
B = [0, 0, 4, 4, 5, 1, 5, 1]
SLOTS = [5, 5, 5, 5, 2, 2, 2, 2]
S5, S17, S20 = math.sqrt(5), math.sqrt(17), math.sqrt(19.5)
# By hand (population std, eps 0, no clip):
#   per-group: a g0 mean 2 std 1, g1 mean 2 std 2; b g0 mean 2 std 2, g1 mean 3 std 2
#   a + 2b = [1, 3, 9, 11 | 10, 2, 14, 6]: g0 mean 6, var (25+9+9+25)/4 = 17; g1 mean 8, var (4+36+36+4)/4 = 20
#   global: a + 2b has mean 7, var (36+16+4+16+9+25+49+1)/8 = 19.5; a var 20/8 = 2.5; b mean 2.5, var 34/8 = 4.25
EXPECTED = {
    ("normalize_then_sum", "group"): [-3, -1, 1, 3, 1, -3, 3, -1],     # z_a + 2 z_b
    ("sum_then_normalize", "group"): [-5 / S17, -3 / S17, 3 / S17, 5 / S17, 1 / S5, -3 / S5, 3 / S5, -1 / S5],
    ("sum_then_normalize", "global"): [d / S20 for d in (-5, -3, 3, 5, 2, -6, 6, -2)],
    ("normalize_then_sum", "global"): [da / math.sqrt(2.5) + 2 * db / math.sqrt(4.25) for da, db in
                                       zip((-1, 1, -1, 1, -2, -2, 2, 2), (-2, -2, 2, 2, 2, -2, 2, -2))],
}


ESTIMATOR = {"group": "grpo", "global": "flow_grpo"}


@pytest.mark.parametrize("mode,std", sorted(EXPECTED))
def test_combination_modes_match_the_hand_computation(mode, std):
    cfg = load_config(RECIPE, [f"rewards.combine={mode}", f"advantages.estimator={ESTIMATOR[std]}", "advantages.eps=0",
                               "advantages.clip=null"])
    comps = {"a": torch.tensor(A, dtype=torch.float64), "b": torch.tensor(B, dtype=torch.float64)}
    adv = advantages_from_rewards(comps, torch.tensor(SLOTS), {"a": 1.0, "b": 2.0}, cfg)
    assert adv.tolist() == pytest.approx(EXPECTED[mode, std], abs=1e-12)


def hand_advantages(rows, weights, eps=1e-4, clip=5.0):
    """normalize_then_sum with per-group population std, in numpy, from the dumped rewards."""
    slots = np.array([r["slot"] for r in rows])
    out = np.zeros(len(rows))
    for name, w in weights.items():
        r = np.array([row["rewards"][name] for row in rows])
        for s in np.unique(slots):
            m = slots == s
            std = r[m].std()
            out[m] += 0 if std <= 1e-6 else w * np.clip((r[m] - r[m].mean()) / (std + eps), -clip, clip)
    return out


def test_train_with_a_pointwise_and_a_pairwise_reward(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    sets = [f"run.output_dir={run}", "run.iterations=2", "run.progress=false", "run.dump_advantages=true",
            "eval.every=2", "rewards.components={brightness: 1.0, pairwise: 0.5}",
            "rewards.kwargs={pairwise: {judge: 'reward:jpeg_compressibility'}}",
            "rewards.combine=normalize_then_sum", "advantages.estimator=grpo"]
    cmd = [sys.executable, "-m", "flowrl.cli", "train", str(RECIPE)] + [a for s in sets for a in ("--set", s)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]

    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    dumped = [json.loads(x) for x in (run / "advantages.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for it, row in enumerate(rows):
        mine = [d for d in dumped if d["iteration"] == it]
        assert len(mine) == 4 * 8  # 4 prompts x G = 8
        bright = np.array([d["rewards"]["brightness"] for d in mine])
        wins = np.array([d["rewards"]["pairwise"] for d in mine])
        # each component logged on its own; the win rates of every group average to exactly 1/2
        assert row["reward/brightness_mean"] == pytest.approx(bright.mean(), abs=1e-6)
        assert row["reward/pairwise_mean"] == pytest.approx(0.5, abs=1e-6)
        assert row["reward/mean"] == pytest.approx(bright.mean() + 0.5 * 0.5, abs=1e-6)
        assert np.allclose(np.round(wins * 14), wins * 14, atol=1e-5)  # wins and half-wins over G - 1 = 7
        assert wins.std() > 0  # the judge did rank the images
        adv = np.array([d["advantage"] for d in mine])
        assert np.allclose(adv, hand_advantages(mine, {"brightness": 1.0, "pairwise": 0.5}), atol=1e-5)
    # the periodic eval has one image per prompt: pairwise has nothing to compare and logs the tie value
    assert rows[1]["eval/pairwise_mean"] == 0.5 and 0 < rows[1]["eval/brightness_mean"] < 1


def test_eval_reports_every_reward_of_a_spec(tmp_path):
    """`flowrl eval` with a pointwise and a pairwise reward: each reported; a prompt's images form its group."""
    from flowrl.cli import main

    prompts = ROOT / "flowrl" / "data" / "prompts" / "tiny_eval.txt"
    code = main(["eval", "--model", "tiny:sd3", "--steps", "3", "--height", "32", "--width", "32",
                 "--max-sequence-length", "32", "--prompts", str(prompts), "--num-prompts", "2", "--num", "3",
                 "--rewards", "brightness:1,pairwise:0.5,jpeg_compressibility:0",
                 "--reward-kwargs", '{"pairwise": {"judge": "reward:brightness"}}', "--out", str(tmp_path)])
    assert code == 0
    table = json.loads((tmp_path / "eval.json").read_text())["scores"]
    assert set(table) == {"brightness", "pairwise", "jpeg_compressibility"}
    assert all(t["n"] == 6 for t in table.values())
    # ranks within each prompt's three images: every group's win rates average to 1/2
    assert table["pairwise"]["mean"] == pytest.approx(0.5, abs=1e-7) and table["pairwise"]["std"] > 0
