"""Exact resume, end to end through the CLI: a run stopped by SIGTERM, killed with kill -9 twice (at random
checkpoints, while it writes the next one), and left with a truncated newest checkpoint ends with the same LoRA
tensors, bit for bit, and the same metrics rows as the same recipe run straight through."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from flowrl.train import checkpoint

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "tiny_smoke.yaml"
# one thread per process: bitwise comparisons need the same thread count in every run, and on a busy 2-core
# box spinning intra-op threads of several processes slow each other down many times over
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
N = 8
RECIPE_SET = ["run.progress=false", "sampling.plan={name: flat, G: 4}", "data.prompts_per_iteration=2",
              "sampling.num_steps=4", "sampling.schedule={name: window, size: 2, start: [0, 2]}",
              f"run.iterations={N}", "run.save_every=1", "eval.every=3", "eval.num_prompts=2",
              "finetune.ema_decay=0.5"]


def command(run: Path, *extra) -> list[str]:
    sets = [a for s in RECIPE_SET + [f"run.output_dir={run}"] for a in ("--set", s)]
    return [sys.executable, "-m", "flowrl.cli", "train", str(RECIPE), *sets, *extra]


def start(run: Path, *extra) -> subprocess.Popen:
    return subprocess.Popen(command(run, *extra), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_until(done, proc: subprocess.Popen, timeout: float = 300):
    """Poll ``done()`` every 20 ms while ``proc`` runs."""
    deadline = time.monotonic() + timeout
    while not done():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.02)


def has_checkpoint(run: Path, it: int):
    return lambda: (run / "checkpoints" / checkpoint.checkpoint_name(it) / checkpoint.MARKER).exists()


def rows(run: Path) -> list[dict]:
    text = (run / "metrics.jsonl").read_text() if (run / "metrics.jsonl").exists() else ""
    return [json.loads(line) for line in text.splitlines() if line.endswith("}")]


def without_clock(rs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rs]


def test_stopped_killed_and_truncated_run_resumes_bit_for_bit(tmp_path):
    ref_dir, run = tmp_path / "straight", tmp_path / "interrupted"
    ref = start(ref_dir)  # the uninterrupted run, alongside
    # 1. SIGTERM once the first metrics row is out: exit 0 and a checkpoint within one iteration
    proc = start(run)
    wait_until(lambda: len(rows(run)) >= 1, proc)
    n = len(rows(run))
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    stopped = checkpoint.latest(run)
    k0 = checkpoint.read_info(stopped)["iteration"]
    assert n <= k0 <= n + 1, (n, k0)  # the iteration in progress finishes, no more
    assert f"flowrl: stopped by SIGTERM after {k0} of {N} iterations; checkpoint {stopped}" in out
    assert len(rows(run)) == k0 and not (run / "lora").exists()

    # 2. kill -9 twice, each time as soon as a checkpoint is complete (the next iteration is under way), at
    # random checkpoints
    rng = random.Random()
    k1 = min(k0 + rng.randint(1, 2), N - 3)
    k2 = rng.randint(k1 + 2, N - 1)
    assert k0 < k1
    for k in (k1, k2):
        proc = start(run, "--resume", "latest")
        wait_until(has_checkpoint(run, k), proc)
        proc.kill()
        proc.wait()
        assert proc.returncode == -signal.SIGKILL

    # 3. the newest checkpoint cut short (a write that did not finish): --resume latest falls back
    newest = checkpoint.latest(run)
    lora = newest / "pytorch_lora_weights.safetensors"
    with open(lora, "r+b") as f:
        f.truncate(lora.stat().st_size // 2)
    res = subprocess.run(command(run, "--resume", "latest"), cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"skipping {newest.name}: pytorch_lora_weights.safetensors has" in res.stdout

    out, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err[-3000:]
    got, want = load_file(run / "lora" / "pytorch_lora_weights.safetensors"), load_file(
        ref_dir / "lora" / "pytorch_lora_weights.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), (k0, k1, k2)
    assert [r["iteration"] for r in rows(run)] == list(range(N))  # nothing lost, nothing twice
    assert without_clock(rows(run)) == without_clock(rows(ref_dir)), (k0, k1, k2)
    assert any("eval/brightness_mean" in r for r in rows(run))

    def pixels(p):
        return np.asarray(Image.open(p))

    grid = Path("samples") / "before_after.png"
    assert np.array_equal(pixels(run / grid), pixels(ref_dir / grid))
