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
