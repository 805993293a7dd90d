"""flowrl bench: GenEval's folder layout, resume, the tables, paired gains, and 1 vs 2 processes."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flowrl.bench import tables
from flowrl.cli import main

OFFICIAL = Path(__file__).resolve().parents[1] / "flowrl" / "data" / "prompts" / "geneval_evaluation_metadata.jsonl"
TINY = ["--model", "tiny:sd3", "--steps", "2", "--max-sequence-length", "16", "--batch-size", "2"]


def bench(*args):
    assert main(["bench", *args]) == 0


def official_walk(folder: Path):
    """The folder walk of GenEval's evaluate_images.py main(): digit-named sub-folders, metadata.jsonl read with
    json.load, every samples/<digits>.png."""
    found = []
    for sub in os.listdir(folder):
        path = folder / sub
        if not path.is_dir() or not sub.isdigit():
            continue
        with open(path / "metadata.jsonl") as fp:
            meta = json.load(fp)
        for name in os.listdir(path / "samples"):
            if (path / "samples" / name).is_file() and re.match(r"\d+\.png", name):
                found.append((int(sub), name, meta))
    return sorted(found)


def test_geneval_writes_the_official_layout_and_resumes(tmp_path, one_thread):
    out = tmp_path / "geneval"
    bench("geneval", *TINY, "--limit", "5", "--num", "2", "--rewards", "shapes", "--out", str(out))
    lines = [json.loads(x) for x in OFFICIAL.read_text().splitlines()]
    assert len(lines) == 553
    walk = official_walk(out)
    assert [(i, n) for i, n, _ in walk] == [(i, f"{k:05d}.png") for i in range(5) for k in range(2)]
    assert all(meta == lines[i] for i, _, meta in walk)  # the official metadata line, as json.load reads it
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [f"{i:05d}" for i in range(5)]
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    # evaluate_images.py's fields, which its summary_scores.py reads
    assert {"filename", "tag", "prompt", "correct", "reason", "metadata"} <= set(rows[0])
    assert json.loads(rows[0]["metadata"]) == lines[0] and rows[0]["tag"] == lines[0]["tag"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images_drawn"] == 10 and summary["images_on_disk_before"] == 0
    assert list(summary["geneval"]) == ["shapes/strict", "shapes/correct"]  # the strict verdict leads

    first = (out / "00003" / "samples" / "00001.png").read_bytes()
    bench("geneval", *TINY, "--limit", "5", "--num", "2", "--rewards", "shapes", "--out", str(out))
    again = json.loads((out / "summary.json").read_text())
    assert again["images_drawn"] == 0 and again["images_on_disk_before"] == 10
    (out / "00003" / "samples" / "00001.png").unlink()
    bench("geneval", *TINY, "--limit", "5", "--num", "2", "--rewards", "shapes", "--out", str(out))
    third = json.loads((out / "summary.json").read_text())
    assert third["images_drawn"] == 1 and third["images_on_disk_before"] == 9
    assert (out / "00003" / "samples" / "00001.png").read_bytes() == first  # seeded by (seed, prompt, sample)
    assert third["scores"] == summary["scores"]


def test_a_folder_of_other_settings_is_refused(tmp_path, capsys, one_thread):
    out = tmp_path / "b"
    bench("geneval", *TINY, "--limit", "2", "--num", "1", "--no-score", "--out", str(out))
    assert main(["bench", "geneval", *TINY, "--limit", "2", "--num", "1", "--no-score", "--seed", "3",
                 "--out", str(out)]) == 2
    assert "seed: 0 there, 3 now" in capsys.readouterr().err
    assert main(["bench", "geneval", *TINY, "--limit", "2", "--out", str(tmp_path / "c")]) == 2
    assert "nothing scores it" in capsys.readouterr().err
    assert main(["bench", "geneval", *TINY, "--limit", "-1", "--no-score", "--out", str(tmp_path / "d")]) == 2
    assert "--limit must be >= 0" in capsys.readouterr().err
    assert main(["bench", "geneval", *TINY, "--no-score", "--baseline-differs", "guidance",
                 "--out", str(tmp_path / "d")]) == 2
    assert "needs --baseline" in capsys.readouterr().err
    # a start that failed before drawing anything binds nothing: the corrected run goes ahead
    assert main(["bench", "geneval", *TINY, "--limit", "1", "--num", "1", "--no-score", "--lora", str(tmp_path),
                 "--out", str(tmp_path / "e")]) == 2
    assert "holds no pytorch_lora_weights" in capsys.readouterr().err


def test_geneval_summary_is_genevals_summary_scores():
    rows = [{"index": 0, "sample": 0, "tag": "counting", "v": 1.0}, {"index": 0, "sample": 1, "tag": "counting",
            "v": 0.0}, {"index": 1, "sample": 0, "tag": "colors", "v": 0.0}, {"index": 1, "sample": 1,
            "tag": "colors", "v": 0.0}, {"index": 2, "sample": 0, "tag": "colors", "v": 1.0},
            {"index": 2, "sample": 1, "tag": "colors", "v": 1.0}]
    s = tables.geneval_summary(rows, "v")
    assert list(s["tasks"]) == ["counting", "colors"]             # order of first appearance (sort=False)
    assert s["tasks"]["colors"] == {"accuracy": 0.5, "correct": 2, "images": 4}
    assert s["overall"] == pytest.approx((0.5 + 0.5) / 2)          # mean over tasks, not over images
    assert s["correct_images"] == pytest.approx(3 / 6) and s["correct_prompts"] == pytest.approx(2 / 3)


def test_rewards_bench_table_and_paired_gain(tmp_path, one_thread):
    from rewards.tiny import save_tiny_clip
    from tests.test_rewards_models import aesthetic_head

    clip = save_tiny_clip(tmp_path / "clip")
    aesthetic_head(tmp_path / "head.pth")
    kw = json.dumps({"pickscore": {"model": clip, "processor": clip},
                     "aesthetic": {"clip": clip, "head": str(tmp_path / "head.pth")}})
    common = ["rewards", *TINY, "--prompts", "prompts:drawbench", "--limit", "3", "--num", "2",
              "--rewards", "pickscore,aesthetic", "--reward-kwargs", kw]
    bench(*common, "--out", str(tmp_path / "base"))
    bench(*common, "--guidance", "1.0", "--out", str(tmp_path / "g1"), "--baseline", str(tmp_path / "base"),
          "--baseline-differs", "guidance")
    md = (tmp_path / "g1" / "summary.md").read_text()
    assert "| pickscore |" in md and "| aesthetic |" in md and "Gain over" in md
    base = [json.loads(x) for x in (tmp_path / "base" / "results.jsonl").read_text().splitlines()]
    new = [json.loads(x) for x in (tmp_path / "g1" / "results.jsonl").read_text().splitlines()]
    gain = json.loads((tmp_path / "g1" / "gain.json").read_text())["gains"]["all"]
    for k in ("pickscore", "aesthetic"):
        diff = sum(b[k] - a[k] for a, b in zip(base, new)) / len(new)
        assert gain[k]["gain"] == pytest.approx(diff) and gain[k]["prompts"] == 3
        table = json.loads((tmp_path / "g1" / "summary.json").read_text())["scores"][k]
        assert table["images"] == 6 and table["mean"] == pytest.approx(sum(b[k] for b in new) / 6)


@pytest.mark.slow  # CI runs it (.ci/run: pytest -m slow)
def test_two_processes_give_the_numbers_of_one(tmp_path):
    from tests.test_train import _two_processes

    args = ["bench", "geneval", *TINY, "--prompts", "prompts:toy_heldout", "--limit", "6", "--num", "2",
            "--rewards", "shapes", "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "flowrl.cli", *args, "--out", str(tmp_path / "one")], check=True, env=env)
    subprocess.run([*_two_processes(), *args, "--out", str(tmp_path / "two")], check=True, env=env, timeout=600)
    for i in range(6):
        for k in range(2):
            name = f"{i:05d}/samples/{k:05d}.png"
            assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    one, two = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert one["scores"] == two["scores"] and one["geneval"] == two["geneval"]
    strip = lambda d: [{k: v for k, v in json.loads(x).items() if k != "filename"}  # noqa: E731
                       for x in (tmp_path / d / "results.jsonl").read_text().splitlines()]
    assert strip("one") == strip("two")


def test_bench_gpu_runs_in_tiny_mode(one_thread):
    """scripts/bench_gpu.py on the tiny pipelines (CPU): the same phases and table as on a GPU."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    lines = mod.main(["--tiny", "--max-batch", "2", "--repeats", "1"])
    table = "\n".join(lines)
    for phase in ("rollout", "re-score + backward", "optimizer", "largest micro-batch (fwd + bwd)"):
        assert table.count(f"| {phase} |") == 2, phase  # SD3 and FLUX
    assert "tiny sd3" in table and "tiny flux" in table and "NFE" in table


def fake_ocr(image):
    """An OCR engine for the test: always reads the text the first OCR prompt asks for."""
    from flowrl.train.builders import load_prompts
    from rewards.ocr import quoted_text

    return quoted_text(load_prompts("prompts:ocr_test").prompts[0])


def test_ocr_bench_is_the_ocr_accuracy_of_the_quoted_text(tmp_path, one_thread):
    from flowrl.train.builders import load_prompts
    from rewards.ocr import ocr_accuracy, quoted_text

    bench("ocr", *TINY, "--limit", "4", "--reward-kwargs", json.dumps({"ocr": {"engine": "tests.test_bench:fake_ocr"}}),
          "--out", str(tmp_path / "ocr"))
    prompts = load_prompts("prompts:ocr_test").prompts[:4]
    scores = [ocr_accuracy(fake_ocr(None), quoted_text(p)) for p in prompts]
    assert scores[0] == 1.0
    expected = sum(scores) / 4
    summary = json.loads((tmp_path / "ocr" / "summary.json").read_text())
    assert summary["scores"]["ocr"]["mean"] == pytest.approx(expected) and summary["scores"]["ocr"]["images"] == 4
