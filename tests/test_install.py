"""Recipes run from any folder, and from a wheel install: shipped prompt sets by name (prompts:<name>), a recipe's
own relative paths against the recipe's folder, the wheel carrying the prompt sets and the shapes-world base."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["--set", "run.iterations=2", "--set", "run.progress=false", "--set", "eval.every=0"]


def _run(args, cwd, env):
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_a_copied_recipe_runs_from_a_third_folder(tmp_path):
    recipes, elsewhere = tmp_path / "recipes", tmp_path / "elsewhere"
    recipes.mkdir(), elsewhere.mkdir()
    shutil.copy(ROOT / "configs" / "tiny_smoke.yaml", recipes / "smoke.yaml")
    # a recipe of one's own with a prompt file beside it
    (recipes / "mine.txt").write_text("a white square\na black circle\n")
    text = (recipes / "smoke.yaml").read_text().replace("train_prompts: prompts:tiny_train", "train_prompts: mine.txt")
    (recipes / "mine.yaml").write_text(text)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = _run(["-m", "flowrl.cli", "train", str(recipes / "smoke.yaml"), "--set", "run.output_dir=runs/smoke",
                *SHORT], elsewhere, env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (elsewhere / "runs" / "smoke" / "lora" / "pytorch_lora_weights.safetensors").is_file()  # cwd-relative
    # plan validates the whole recipe, its prompt files included, without loading a model
    res = _run(["-m", "flowrl.cli", "plan", str(recipes / "mine.yaml")], elsewhere, env)
    assert res.returncode == 0, res.stderr[-2000:]
    # a --set path is the user's typing: relative to the working directory
    res = _run(["-m", "flowrl.cli", "plan", str(recipes / "mine.yaml"), "--set", "data.train_prompts=mine.txt"],
               elsewhere, env)
    assert res.returncode == 2 and "prompt file not found: mine.txt" in res.stderr


def test_shipped_names_are_checked():
    from flowrl.train.builders import load_prompts
    from flowrl.train.config import ConfigError

    assert len(load_prompts("prompts:geneval_evaluation_metadata")) == 553
    with pytest.raises(ConfigError, match="no shipped prompt set 'nope'; shipped: .*toy_heldout"):
        load_prompts("prompts:nope")


@pytest.mark.slow  # CI runs it (.ci/run: pytest -m slow)
def test_the_wheel_carries_its_data_and_trains_from_anywhere(tmp_path):
    """A non-editable install: the wheel built and unpacked into its own folder, imported from there (the source
    tree is not on the path), running the shipped shapes-world base and named prompt sets."""
    dist, site, elsewhere = tmp_path / "dist", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(ROOT)], check=True, capture_output=True, timeout=600)
    (wheel,) = dist.glob("flowrl-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(site)}
    where = _run(["-c", "import flowrl, rewards; print(flowrl.__file__, rewards.__file__)"], elsewhere, env)
    assert where.stdout.split() == [str(site / "flowrl" / "__init__.py"), str(site / "rewards" / "__init__.py")]
    recipe = elsewhere / "toy.yaml"
    shutil.copy(ROOT / "configs" / "toy_flowgrpo.yaml", recipe)
    res = _run(["-m", "flowrl.cli", "train", str(recipe), "--set", "run.output_dir=run", "--set",
                "data.prompts_per_iteration=2", "--set", "sampling.plan={name: flat, G: 2}", *SHORT], elsewhere, env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (elsewhere / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()
