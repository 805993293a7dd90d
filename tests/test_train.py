"""The trainer end to end on the tiny smoke recipe: the reward rises, the LoRA loads in plain diffusers, two
processes agree with one, bad configs fail fast without touching an existing run."""
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "tiny_smoke.yaml"
# one intra-op thread: the tiny models gain nothing from more, and on a busy 2-core box the spinning threads of
# several processes slowed the 24-iteration smoke run from 22 s to 97 s
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
ENV_FAULTS = {**ENV, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}  # + tests/fault_rewards.py


def _flowrl(*args, launcher=None, timeout=600, env=ENV):
    cmd = (launcher or [sys.executable, "-m", "flowrl.cli"]) + list(args)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("smoke") / "run"
    res = _flowrl("train", str(RECIPE), "--set", f"run.output_dir={run}", "--set", "run.iterations=24",
                  "--set", "eval.every=12", "--set", "run.progress=false", "--set", "run.save_every=12")
    assert res.returncode == 0, res.stderr[-3000:]
    return run


def test_reward_clearly_rises(smoke_run):
    rows = _metrics(smoke_run)
    assert len(rows) == 24 and all(r["world_size"] == 1 for r in rows)
    first, last = rows[:3], rows[-3:]
    n = 3 * 32  # samples behind three iterations' means (4 prompts x G = 8 per iteration)

    def mean_and_se(rs):
        mean = sum(r["reward/mean"] for r in rs) / len(rs)
        var = sum(r["reward/brightness_std"] ** 2 for r in rs) / len(rs)
        return mean, math.sqrt(var / n)

    (m0, se0), (m1, se1) = mean_and_se(first), mean_and_se(last)
    assert m1 - m0 > 3 * math.sqrt(se0**2 + se1**2), (m0, m1, se0, se1)
    # on-policy first update: every ratio is exactly 1 before the step
    assert rows[0]["ratio_min"] == pytest.approx(1.0, abs=1e-6) and rows[0]["ratio_max"] == pytest.approx(1.0, abs=1e-6)
    for key in ("loss", "clip_frac", "approx_kl", "grad_norm", "lr", "time/rollout", "time/reward", "time/train",
                "nfe", "adv/mean", "adv/std", "reward/brightness_mean", "reward/brightness_std"):
        assert key in rows[0], key
    assert abs(rows[0]["adv/mean"]) < 1e-5
    assert rows[0]["nfe"] == 4 * 8 * 8  # prompts x G x steps, no CFG in this recipe
    assert (smoke_run / "samples" / "eval_000011.png").is_file() and (smoke_run / "config.yaml").is_file()
    assert any((smoke_run / "tb").iterdir())
    assert (smoke_run / "checkpoints" / "iter_000012").is_dir()


def test_lora_loads_in_plain_diffusers_and_changes_the_output(smoke_run):
    from flowrl.models.tiny import tiny_sd3_pipeline

    def latents(pipe):
        return pipe(["a red circle above a blue square"], num_inference_steps=4, height=32, width=32,
                    max_sequence_length=32, guidance_scale=1.0, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images

    pipe = tiny_sd3_pipeline(seed=0)  # the recipe's base: tiny:sd3
    pipe.set_progress_bar_config(disable=True)
    before = latents(pipe)
    pipe.load_lora_weights(smoke_run / "lora")
    after = latents(pipe)
    assert (after - before).abs().max() > 1e-4


def _free_port() -> int:
    # each 2-process run gets its own rendezvous port: runs that share one (accelerate's default 29500), e.g.
    # test sessions side by side on one machine, join each other's process group and hang
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes() -> list[str]:
    """``accelerate launch`` of two (gloo) processes, on a free port."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(_free_port()), "-m", "flowrl.cli"]


def _ranks(launcher: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of the worker processes a launcher started (its children, RANK in their environment)."""
    children = " ".join(Path(f"/proc/{launcher.pid}/task/{t}/children").read_text()
                        for t in os.listdir(f"/proc/{launcher.pid}/task"))
    ranks = {}
    for pid in map(int, children.split()):
        env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
        if "RANK" in env:
            ranks[int(env["RANK"])] = pid
    return ranks


def test_two_processes_match_one(tmp_path):
    """The same recipe and global batch on 1 and on 2 processes: the same prompts and noise per slot, rewards
    and advantages equal up to float rounding, final LoRA weights close. Not bitwise: the rollout runs the
    network on 2 prompts' states per call instead of 4 (matrix products round differently with the batch
    shape), and the gradient is the DDP all-reduce mean of two per-process sums instead of one sum. The
    2-process run is also stopped by SIGTERM to its rank-1 process only, then resumed on 2 processes: both
    processes stop after the same iteration (else the run would hang or fail) with one checkpoint that holds
    both processes' random states. The reward is brightness, NaN for one prompt that only iteration 1 draws,
    held by rank 1 in the 2-process run: both runs skip that update, naming the prompt (a skip decided by rank
    1 alone would leave rank 0 waiting in the advantage all-gather)."""
    from flowrl.train.builders import load_prompts, prompt_indices
    from flowrl.train.config import load_config
    from flowrl.train.scoring import advantages_from_rewards

    iters = 4
    cfg = load_config(RECIPE)
    train_prompts = load_prompts(cfg.data.train_prompts).prompts
    P = cfg.data.prompts_per_iteration
    draws = [prompt_indices(cfg.run.seed, it, len(train_prompts), P) for it in range(iters)]
    bad = next(i for i in draws[1][P // 2:] if all(i not in d for d in draws[:1] + draws[2:]))  # rank 1's
    common = ["--set", f"run.iterations={iters}", "--set", "run.dump_advantages=true", "--set",
              "run.progress=false", "--set", "eval.every=0", "--set", "rewards.modules=[fault_rewards]",
              "--set", "rewards.components=test_nan:1.0",
              "--set", "rewards.kwargs=" + json.dumps({"test_nan": {"prompt": train_prompts[bad]}})]
    one, two = tmp_path / "one", tmp_path / "two"
    res1 = _flowrl("train", str(RECIPE), "--set", f"run.output_dir={one}", *common, env=ENV_FAULTS)
    assert res1.returncode == 0, res1.stderr[-3000:]

    args = ["train", str(RECIPE), "--set", f"run.output_dir={two}", *common]
    proc = subprocess.Popen(_two_processes() + args, cwd=ROOT, env=ENV_FAULTS, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not ((two / "metrics.jsonl").exists() and (two / "metrics.jsonl").read_text().count("\n") >= 1):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    os.kill(_ranks(proc)[1], signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    stopped = len(_metrics(two))
    assert f"flowrl: stopped by a stop signal to another process after {stopped} of {iters}" in out
    ckpt = two / "checkpoints" / f"iter_{stopped:06d}"
    info = json.loads((ckpt / "checkpoint.json").read_text())
    assert info["world_size"] == 2 and {"random_states_0.pkl", "random_states_1.pkl"} <= set(info["files"])
    res2 = _flowrl(*args, "--resume", "latest", launcher=_two_processes(), env=ENV_FAULTS)
    assert res2.returncode == 0, res2.stderr[-3000:]

    rows1, rows2 = _metrics(one), _metrics(two)
    assert [r["world_size"] for r in rows1] == [1] * iters
    assert [r["world_size"] for r in rows2] == [2] * iters  # really two processes, metrics written once
    for rows in (rows1, rows2):
        assert [(r.get("skipped"), r.get("skipped_prompts")) for r in rows] == [
            (None, None), ("reward", [bad]), (None, None), (None, None)]
    adv1 = [json.loads(x) for x in (one / "advantages.jsonl").read_text().splitlines()]
    adv2 = [json.loads(x) for x in (two / "advantages.jsonl").read_text().splitlines()]
    assert [(a["iteration"], a["slot"]) for a in adv1] == [(a["iteration"], a["slot"]) for a in adv2]
    # the same prompts and noise: iteration 0 rewards agree up to the network's batch-shape-dependent rounding
    # (measured 1.2e-7, one ulp); later the weights differ at that level too, hence the looser bound. An
    # advantage (r - mean) / std moves by at most (2 + |A|) max|dr| / std: the bound checked, with 10% slack
    # (measured 1.3e-4 to 1.7e-4 against a reward std of 7e-4)
    for it in (0, 2, 3):
        r1, r2, a1, a2 = (torch.tensor([a[k] if k == "advantage" else a[k]["test_nan"]
                                        for a in adv if a["iteration"] == it], dtype=torch.float64)
                          for adv, k in ((adv1, "rewards"), (adv2, "rewards"), (adv1, "advantage"),
                                         (adv2, "advantage")))
        dr = float((r1 - r2).abs().max())
        assert dr < (1e-6 if it == 0 else 1e-4), (it, dr)
        bound = 1.1 * (2 + float(a1.abs().max())) * dr / float(r1.std(correction=0)) + 1e-6
        assert float((a1 - a2).abs().max()) <= bound, (it, float((a1 - a2).abs().max()), bound)
    # for the same rollouts (the 2-process rewards), single-process advantage code gives the same advantages
    for it in (0, 2, 3):
        rows = [a for a in adv2 if a["iteration"] == it]
        comps = {"test_nan": torch.tensor([a["rewards"]["test_nan"] for a in rows])}
        slots = torch.tensor([a["slot"] for a in rows])
        ref = advantages_from_rewards(comps, slots, {"test_nan": 1.0}, cfg)
        assert torch.equal(ref, torch.tensor([a["advantage"] for a in rows], dtype=ref.dtype))
    w1 = load_file(one / "lora" / "pytorch_lora_weights.safetensors")
    w2 = load_file(two / "lora" / "pytorch_lora_weights.safetensors")
    # Adam moves a weight by up to lr = 0.03 per step whatever the gradient's scale, so rounding-level gradient
    # differences show where a gradient component is near zero: measured up to 5.5e-4 after 3 steps, bounded by
    # a tenth of one step; the LoRA B matrices (zero at the start) have moved by ~0.09
    assert w1.keys() == w2.keys()
    assert max(float(w1[k].abs().max()) for k in w1 if "lora_B" in k) > 0.05
    for k in w1:
        assert torch.allclose(w1[k], w2[k], rtol=0, atol=3e-3), (k, float((w1[k] - w2[k]).abs().max()))


@pytest.mark.parametrize("override,needle", [
    (["--set", "training.lerning_rate=1"], "training.lerning_rate"),
    (["--set", "training.lr=fast"], "training.lr"),
    (["--set", "data.train_prompts=/nonexistent/prompts.txt"], "/nonexistent/prompts.txt"),
    (["--set", "model.path=/nonexistent/model"], "model.path"),
    (["--set", "sampling.kernel={name: flow_sde, noise: 0.7}"], "sampling.kernel.noise"),
])
def test_bad_config_fails_fast_and_writes_nothing(tmp_path, override, needle):
    run = tmp_path / "existing"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in run.iterdir())
    res = _flowrl("train", str(RECIPE), "--set", f"run.output_dir={run}", *override)
    assert res.returncode == 2
    # one line and nothing else: no model was loaded (its progress bars go to stderr). A wall-clock bound would
    # fail on a loaded machine; the one-line stderr is what says the check ran before any expensive work.
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert sorted((p.name, p.stat().st_mtime_ns) for p in run.iterdir()) == before


def test_existing_run_folder_is_refused(tmp_path):
    run = tmp_path / "existing"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    res = _flowrl("train", str(RECIPE), "--set", f"run.output_dir={run}")
    assert res.returncode == 2 and "already holds a run" in res.stderr
    assert (run / "metrics.jsonl").read_text() == "{}\n" and sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_kl_to_the_base_and_ema(tmp_path, mode):
    """KL to the reference is exactly 0 before the first update (LoRA B = 0, or the frozen copy) and positive
    after; with EMA on, the run still writes the loadable output."""
    run = tmp_path / mode
    res = _flowrl("train", str(RECIPE), "--set", f"run.output_dir={run}", "--set", "run.iterations=2",
                  "--set", f"finetune.mode={mode}", "--set", "training.kl_beta=0.04",
                  "--set", "finetune.ema_decay=0.5", "--set", "eval.every=0", "--set", "run.progress=false",
                  "--set", "training.lr=1e-3")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = _metrics(run)
    assert rows[0]["kl"] == 0 and rows[1]["kl"] > 0
    if mode == "lora":
        assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    else:
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline.from_pretrained(run / "model")
        assert pipe.transformer is not None


def test_tensorboard_holds_every_scalar_of_the_metrics(smoke_run):
    """run.report_to: tensorboard (the default) logs each metrics row's numbers at its iteration."""
    from tensorboardX.proto import event_pb2

    (events,) = (smoke_run / "tb").rglob("events.out.tfevents.*")
    data, scalars = events.read_bytes(), {}
    pos = 0
    while pos < len(data):  # TFRecords: u64 length, u32 crc, the Event, u32 crc
        n = int.from_bytes(data[pos:pos + 8], "little")
        event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
        pos += 16 + n
        for v in event.summary.value:
            scalars.setdefault(v.tag, {})[event.step] = v.simple_value
    rows = _metrics(smoke_run)
    numeric = {k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numeric <= set(scalars)
    loss = scalars["loss"]
    assert sorted(loss) == list(range(24))
    assert all(loss[r["iteration"]] == pytest.approx(r["loss"], rel=1e-6, abs=1e-12) for r in rows)


def test_lora_folder_has_a_model_card_diffusers_reads(smoke_run):
    from diffusers.utils.hub_utils import load_or_create_model_card

    card = load_or_create_model_card(str(smoke_run / "lora" / "README.md"))
    assert card.data.base_model == "tiny:sd3" and card.data.library_name == "diffusers"
    assert {"lora", "flowrl", "diffusers"} <= set(card.data.tags)
    text = card.text
    assert "pipe.load_lora_weights" in text and "objective: grpo" in text and "brightness" in text
    assert "eval/" not in text and "| brightness |" in text  # the last in-run eval's figures


def test_report_to_is_checked_before_anything_runs(tmp_path):
    from flowrl.train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="unknown tracker 'tensorbored'"):
        load_config(RECIPE, ["run.report_to=tensorbored"])
    from accelerate.tracking import get_available_trackers

    if "wandb" not in [str(t) for t in get_available_trackers()]:
        with pytest.raises(ConfigError, match=r"\['wandb'\] not installed"):
            load_config(RECIPE, ["run.report_to=[tensorboard, wandb]"])
    run = tmp_path / "run"
    res = _flowrl("train", str(RECIPE), "--set", f"run.output_dir={run}", "--set", "run.iterations=1", "--set",
                  "run.report_to=none", "--set", "run.progress=false", "--set", "eval.every=0")
    assert res.returncode == 0, res.stderr[-2000:]
    assert not (run / "tb").exists() and (run / "metrics.jsonl").is_file()
