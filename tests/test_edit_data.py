"""Editing prompts: rows carry their input image; the trainer, evaluator and CLI hand it to editing adapters.

The shipped tiny editing set (prompts:tiny_edit) trains two iterations on the tiny Kontext pipeline with an
in-run eval; missing or unreadable images are refused before anything loads."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState
from PIL import Image

from flowrl.train import builders
from flowrl.train.config import ConfigError, load_config
from flowrl.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "tiny_smoke.yaml"
KONTEXT = ["model.path=tiny:flux_kontext", "model.auto_resize=false", "model.height=32", "model.width=32",
           "data.train_prompts=prompts:tiny_edit", "data.eval_prompts=prompts:tiny_edit", "eval.num_prompts=2",
           "data.prompts_per_iteration=2", "sampling.plan={name: flat, G: 2}", "sampling.num_steps=3",
           "sampling.schedule={name: window, size: 2, start: 0}", "run.progress=false", "run.save_every=0"]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_shipped_edit_rows_resolve_their_images():
    ps = builders.load_prompts("prompts:tiny_edit")
    assert len(ps.prompts) == 8 and all(Path(m["image"]).is_absolute() for m in ps.metadata)
    images = builders.prompt_images(ps.metadata)
    assert all(im.mode == "RGB" and im.size == (64, 64) for im in images)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_image_fields_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"x.jsonl:1: input image not found: .*nope.png"):
        builders.load_prompts(str(_jsonl(tmp_path / "x.jsonl", [{"prompt": "a", "image": "nope.png"}])))
    with pytest.raises(ConfigError, match="'image' must be a path"):
        builders.load_prompts(str(_jsonl(tmp_path / "y.jsonl", [{"prompt": "a", "image": 3}])))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    rows = builders.load_prompts(str(_jsonl(tmp_path / "z.jsonl", [{"prompt": "a", "image": "bad.png"}]))).metadata
    with pytest.raises(ConfigError, match="cannot read input image .*bad.png"):
        builders.prompt_images(rows)
    with pytest.raises(ConfigError, match=r"rows \[0\] have none"):
        builders.prompt_images([{}])


def test_an_editing_recipe_without_images_stops_at_validation(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    sets = KONTEXT + [f"run.output_dir={tmp_path / 'run'}", "data.train_prompts=prompts:tiny_train"]
    with pytest.raises(ConfigError, match="data.train_prompts: flux_kontext edits an input image"):
        load_config(SMOKE, sets)


def test_kontext_trains_two_iterations_on_the_edit_set(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    AcceleratorState._reset_state(reset_partial_state=True)
    out = tmp_path / "run"
    cfg = load_config(SMOKE, KONTEXT + [f"run.output_dir={out}", "run.iterations=2", "eval.every=2"])
    Trainer(cfg).train()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert [r["iteration"] for r in train] == [0, 1] and all("skipped" not in r for r in train)
    assert any(k.startswith("eval/") for r in rows for k in r), rows
    AcceleratorState._reset_state(reset_partial_state=True)


def test_cli_sample_takes_an_input_image(tmp_path):
    from flowrl.cli import main

    src = tmp_path / "in.png"
    Image.new("RGB", (64, 64), "red").save(src)
    common = ["sample", "--model", "tiny:flux_kontext", "--prompt", "make it blue", "--steps", "2", "--height", "32",
              "--width", "32", "--no-auto-resize", "--max-sequence-length", "32"]
    assert main([*common, "--image", str(src), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "grid.png").is_file()
    assert main([*common, "--out", str(tmp_path / "out2")]) == 2  # an editing model without its image
    assert not (tmp_path / "out2").exists()
