"""The shipped language-model recipes (configs/llm_*.yaml): each builds and validates (the GPU ones with the
shipped arithmetic files standing in for the GSM8K files a user converts), names known text rewards, keeps
train and eval prompts apart where both are shipped, and the converter writes what the recipes read."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flowrl.llm.algorithms import ALGORITHMS
from flowrl.llm.config import load_llm_config
from flowrl.train import builders

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (REPO / "configs").glob("*.yaml") if yaml.safe_load(p.read_text()).get("trainer") == "llm")
STANDIN = "flowrl/data/prompts/arith_train.jsonl"


def test_the_toy_and_gpu_recipes_are_there():
    names = {p.name for p in RECIPES}
    assert {"llm_toy_grpo.yaml", "llm_gsm8k_dapo.yaml", "llm_gsm8k_dr_grpo.yaml", "llm_gsm8k_gspo.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(path, monkeypatch):
    monkeypatch.chdir(REPO)
    raw = yaml.safe_load(path.read_text())
    sets = []
    if not raw["data"]["train_prompts"].startswith("flowrl/"):  # a user-provided file
        sets = [f"data.train_prompts={STANDIN}", "data.eval_prompts=flowrl/data/prompts/arith_heldout.jsonl"]
    cfg = load_llm_config(path, sets)
    if raw["training"].get("algorithm"):
        preset = ALGORITHMS[raw["training"]["algorithm"]]["training"]
        assert all(getattr(cfg.training, k) == raw["training"].get(k, v) for k, v in preset.items())
    if not sets and cfg.data.eval_prompts:
        train = set(builders.load_prompts(cfg.data.train_prompts).prompts)
        evals = set(builders.load_prompts(cfg.data.eval_prompts).prompts)
        assert not train & evals


def test_gsm8k_converter(tmp_path):
    src = tmp_path / "gsm8k.jsonl"
    src.write_text(json.dumps({"question": "Tom has 3 apples and buys 1,204 more. How many?",
                               "answer": "3 + 1204 = <<3+1204=1207>>1207\n#### 1,207"}) + "\n")
    out = tmp_path / "out.jsonl"
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_gsm8k.py"), str(src), str(out)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    row = json.loads(out.read_text())
    assert row["answer"] == "1207" and row["prompt"].endswith("\\boxed{}.")
    import rewards

    cfg = yaml.safe_load((REPO / "configs" / "llm_gsm8k_dapo.yaml").read_text())
    checker = rewards.build_reward("exact_answer", **cfg["rewards"]["kwargs"]["exact_answer"])
    got = checker(["... so the total is \\boxed{1,207}.", "\\boxed{1207} no, \\boxed{12}"], ["p", "p"],
                  [{"answer": row["answer"]}] * 2)
    assert got["exact_answer"].tolist() == [1.0, 0.0]  # the last boxed answer counts
