"""flowrl sample / eval on the tiny offline pipeline."""
import json
from pathlib import Path

from flowrl.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny:sd3", "--steps", "3", "--height", "32", "--width", "32", "--max-sequence-length", "32"]


def test_sample_writes_images(tmp_path):
    assert main(["sample", *TINY, "--prompt", "a red circle", "--num", "2", "--sde", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0000_00.png", "0000_01.png", "grid.png"]


def test_eval_scores_several_rewards(tmp_path, capsys):
    prompts = ROOT / "flowrl" / "data" / "prompts" / "tiny_eval.txt"
    code = main(["eval", *TINY, "--prompts", str(prompts), "--rewards", "brightness:1,jpeg_compressibility:0.5",
                 "--out", str(tmp_path)])
    assert code == 0
    table = json.loads((tmp_path / "eval.json").read_text())["scores"]
    assert set(table) == {"brightness", "jpeg_compressibility"} and table["brightness"]["n"] == 4
    out = capsys.readouterr().out
    assert "| brightness |" in out and (tmp_path / "eval.md").is_file()


def test_missing_lora_is_one_clear_error(tmp_path, capsys):
    code = main(["sample", *TINY, "--prompt", "x", "--lora", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--lora" in err[0]
    assert not (tmp_path / "o").exists()


def test_paired_gains_match_a_hand_computation():
    import torch

    from flowrl.bench.stats import paired_gains

    # two categories; prompts a, b in "x" (2 images each), c in "y" (2 images)
    prompts = ["a", "a", "b", "b", "c", "c"]
    tags = ["x", "x", "x", "x", "y", "y"]
    new = {"s": torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5])}
    old = {"s": torch.tensor([0.0, 1.0, 0.0, 0.0, 0.5, 0.0])}
    g = paired_gains(new, old, prompts, tags)
    # x: per-image differences 1, 0, 0, 1 -> mean 0.5; per-prompt means a 0.5, b 0.5 -> clustered SE 0
    assert g["x"]["s"] == {"gain": 0.5, "stderr": 0.0, "prompts": 2}
    # y: differences 0, 0.5 -> 0.25, one prompt -> SE 0
    assert g["y"]["s"]["gain"] == 0.25 and g["y"]["s"]["prompts"] == 1
    assert g["overall"]["s"]["gain"] == (0.5 + 0.25) / 2
    old["s"][2] = 1.0  # prompt b: differences -1, 1 -> prompt means a 0.5, b 0: SE = std([0.5, 0]) / sqrt(2) = 0.25
    g = paired_gains(new, old, prompts, tags)
    assert abs(g["x"]["s"]["stderr"] - 0.25) < 1e-12


def test_eval_reports_the_paired_gain_over_a_baseline(tmp_path, capsys):
    prompts = str(ROOT / "flowrl" / "data" / "prompts" / "tiny_eval.txt")
    common = ["eval", *TINY, "--prompts", prompts, "--rewards", "brightness", "--num", "2"]
    assert main([*common, "--out", str(tmp_path / "base")]) == 0
    base = tmp_path / "base" / "eval.json"
    assert main([*common, "--baseline", str(base), "--out", str(tmp_path / "again")]) == 0
    gains = json.loads((tmp_path / "again" / "gain.json").read_text())["gains"]
    assert gains["overall"]["brightness"]["gain"] == 0.0  # the same model and seeds: identical images
    capsys.readouterr()
    # a baseline made with other seeds cannot be paired: refused before any sampling
    code = main([*common, "--seed", "1", "--baseline", str(base), "--out", str(tmp_path / "bad")])
    assert code == 2 and "seed" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    # another guidance is refused unless named in --baseline-differs (sampler settings only), then recorded
    code = main([*common, "--guidance", "1.0", "--baseline", str(base), "--out", str(tmp_path / "bad")])
    assert code == 2 and "--baseline-differs" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main([*common, "--guidance", "1.0", "--baseline", str(base), "--baseline-differs", "guidance",
                 "--out", str(tmp_path / "cfgfree")]) == 0
    saved = json.loads((tmp_path / "cfgfree" / "gain.json").read_text())
    assert saved["differs"]["guidance"]["this"] == 1.0 and saved["differs"]["guidance"]["baseline"] != 1.0
    assert "baseline guidance" in (tmp_path / "cfgfree" / "eval.md").read_text()
    capsys.readouterr()
    code = main([*common, "--baseline", str(base), "--baseline-differs", "guidance", "--out", str(tmp_path / "bad")])
    assert code == 2 and "same --guidance" in capsys.readouterr().err
    code = main([*common, "--baseline-differs", "guidance", "--out", str(tmp_path / "bad")])
    assert code == 2 and "--baseline-differs needs --baseline" in capsys.readouterr().err
