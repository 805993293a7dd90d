"""Checkpoint folders (sealed, complete or skipped with a reason, pruned), what a resume may change, the stop
signal and the reward retries: the pieces the trainer's fault tolerance is built from, without a model."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fault_rewards  # noqa: F401 (registers test_nan, test_flaky)
import pytest
import torch

import rewards
from flowrl.train import checkpoint, guards
from flowrl.train.checkpoint import LoopState, check_config, prune, resolve, scan
from flowrl.train.config import ConfigError, load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "tiny_smoke.yaml"


def make_checkpoint(root: Path, iteration: int, eval_score=None, files=None, config=None) -> Path:
    """A sealed, published checkpoint folder with small stand-in files."""
    name = checkpoint.checkpoint_name(iteration)
    tmp = root / f".tmp-{name}"
    tmp.mkdir(parents=True)
    for rel, data in (files or {"optimizer.bin": b"x" * 100, "random_states_0.pkl": b"r" * 10}).items():
        (tmp / rel).write_bytes(data)
    checkpoint.seal(tmp, {"iteration": iteration, "world_size": 1, "eval_score": eval_score,
                          "config": config or {}, "data": {}})
    checkpoint.publish(tmp, root / name)
    return root / name


def test_sealed_checkpoint_is_complete_and_lists_its_files(tmp_path):
    ck = make_checkpoint(tmp_path / "checkpoints", 3)
    info = checkpoint.read_info(ck)
    assert info["iteration"] == 3 and info["files"] == {"optimizer.bin": 100, "random_states_0.pkl": 10}
    assert checkpoint.problem(ck) is None
    assert not any(p.name.startswith(".tmp-") for p in ck.parent.iterdir())  # renamed into place
    assert scan(ck.parent) == ([(3, ck)], [])


def test_resume_latest_skips_incomplete_checkpoints(tmp_path):
    """A folder truncated mid-write, one without its marker, one with a broken marker, and a temporary folder
    are all passed over: the newest complete checkpoint wins, and the notes say why each was skipped."""
    run = tmp_path / "run"
    root = run / "checkpoints"
    make_checkpoint(root, 1)
    good = make_checkpoint(root, 2)
    truncated = make_checkpoint(root, 3)
    with open(truncated / "optimizer.bin", "r+b") as f:
        f.truncate(40)
    unmarked = make_checkpoint(root, 4)
    (unmarked / checkpoint.MARKER).unlink()
    broken = make_checkpoint(root, 5)
    (broken / checkpoint.MARKER).write_text('{"format": 1, "iter')
    (root / ".tmp-iter_000006").mkdir()
    (root / ".tmp-iter_000006" / "optimizer.bin").write_bytes(b"half")

    path, notes = resolve("latest", str(run))
    assert path == good
    assert resolve(str(run), "elsewhere")[0] == good  # a run folder names its own latest
    text = "\n".join(notes)
    assert "iter_000003: optimizer.bin has 40 bytes, checkpoint.json says 100" in text
    assert "iter_000004: no checkpoint.json" in text and "iter_000005: checkpoint.json is unreadable" in text
    with pytest.raises(ConfigError, match="iter_000003 is not a complete checkpoint: optimizer.bin has 40"):
        resolve(str(truncated), "unused")
    assert resolve(str(good), "unused")[0] == good
    with pytest.raises(ConfigError, match="holds no checkpoints/ folder"):
        resolve("latest", str(tmp_path / "nowhere"))


def test_prune_keeps_the_newest_and_the_best_and_clears_leftovers(tmp_path):
    root = tmp_path / "checkpoints"
    for it, score in [(1, 0.1), (2, 0.9), (3, None), (4, 0.2), (5, None), (6, None)]:
        make_checkpoint(root, it, eval_score=score)
    half = make_checkpoint(root, 7)
    (half / checkpoint.MARKER).unlink()  # incomplete but newer than every complete one: not pruned's business
    (root / ".tmp-iter_000008").mkdir()
    (root / ".del-iter_000000").mkdir()
    prune(root, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["iter_000002", "iter_000005", "iter_000006", "iter_000007"]
    prune(root, keep=0)  # keep everything complete
    assert len(scan(root)[0]) == 3


def test_loop_state_round_trip_and_strict_load():
    s = LoopState(iteration=7, consecutive_skips=1, skips=2, log_bytes={"metrics.jsonl": 123})
    t = LoopState()
    t.load_state_dict(s.state_dict())
    assert t == s
    with pytest.raises(ValueError, match="loop state has fields"):
        t.load_state_dict({"iteration": 1})


def test_config_changes_allowed_on_resume_and_refused(tmp_path):
    saved = to_dict(load_config(RECIPE))
    ok = to_dict(load_config(RECIPE, ["run.iterations=99", "run.save_every=1", "eval.every=0", "run.progress=false",
                                      f"run.output_dir={tmp_path}", "rewards.retries=5"]))
    check_config(saved, ok)
    for override, field in [("training.lr=0.5", "training.lr"), ("run.seed=1", "run.seed"),
                            ("sampling.kernel={name: flow_sde, a: 0.5}", "sampling.kernel.a"),
                            ("finetune.lora_rank=4", "finetune.lora_rank")]:
        with pytest.raises(ConfigError, match=rf"^--resume: {field} was "):
            check_config(saved, to_dict(load_config(RECIPE, [override])))
    # a decaying learning rate ends at run.iterations: a new length would bend the schedule under way
    cosine = to_dict(load_config(RECIPE, ["training.lr_schedule=cosine"]))
    with pytest.raises(ConfigError, match=r"^--resume: run.iterations was 40 .* decays to 0 at run.iterations"):
        check_config(cosine, to_dict(load_config(RECIPE, ["training.lr_schedule=cosine", "run.iterations=99"])))


def test_cli_refuses_a_changed_field_before_loading_anything(tmp_path):
    run = tmp_path / "run"
    cfg = load_config(RECIPE, [f"run.output_dir={run}"])
    make_checkpoint(run / "checkpoints", 5, config=to_dict(cfg))
    info_path = run / "checkpoints" / "iter_000005" / checkpoint.MARKER
    info = json.loads(info_path.read_text())
    info["data"] = checkpoint.data_digests(cfg)
    info_path.write_text(json.dumps(info))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}

    def flowrl(*args):
        return subprocess.run([sys.executable, "-m", "flowrl.cli", "train", str(RECIPE), "--set",
                               f"run.output_dir={run}", "--resume", "latest", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120, check=False)

    t0 = time.perf_counter()
    res = flowrl("--set", "training.lr=0.001")
    assert time.perf_counter() - t0 < 20
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "flowrl: error: --resume: training.lr was 0.03 in the checkpoint and is 0.001 now; it changes the "
        "experiment, so it must stay (fields that may change on resume: " + ", ".join(sorted(checkpoint.RESUMABLE))
        + ")"]
    res = flowrl("--set", "run.iterations=5")
    assert res.returncode == 2 and "is at iteration 5 and run.iterations is 5: nothing to do" in res.stderr
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints"]  # nothing written


def test_truncate_log(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"iteration": 0}\n{"iteration": 1}\n{"itera')
    checkpoint.truncate_log(log, len('{"iteration": 0}\n'))
    assert log.read_text() == '{"iteration": 0}\n'
    with pytest.raises(ConfigError, match="has 17 bytes but had 100 when the checkpoint was written"):
        checkpoint.truncate_log(log, 100)


# ------------------------------------------------------------------------------------------ guards


def images(n=4):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def test_reward_errors_are_retried_with_doubling_backoff(monkeypatch):
    sleeps, warnings = [], []
    monkeypatch.setattr(guards.time, "sleep", sleeps.append)
    reward = rewards.build_reward("test_flaky", failures=2)
    out = guards.score_with_retries(reward, images(), ["p"] * 4, None, None, retries=2, backoff=0.5, timeout=None,
                                    warn=warnings.append)
    assert torch.equal(out["test_flaky"], images().mean(dim=(1, 2, 3)))
    assert sleeps == [0.5, 1.0] and len(warnings) == 2 and "ConnectionError" in warnings[0]

    reward = rewards.build_reward("test_flaky", failures=-1)
    with pytest.raises(guards.TrainingError, match=r"reward 'test_flaky' failed 3 time\(s\); last error: "
                                                   r"ConnectionError: reward server unreachable \(call 2\)"):
        guards.score_with_retries(reward, images(), ["p"] * 4, None, None, 2, 0.0, None, warnings.append)


def test_reward_timeout_counts_as_a_failure():
    reward = rewards.build_reward("test_flaky", failures=1, sleep=2.0)  # the first call hangs, the second answers
    warnings = []
    t0 = time.perf_counter()
    out = guards.score_with_retries(reward, images(), ["p"] * 4, None, None, 1, 0.0, timeout=0.2, warn=warnings.append)
    assert time.perf_counter() - t0 < 1.5 and out["test_flaky"].shape == (4,)
    assert "TimeoutError: no answer within 0.2 s" in warnings[0]


def test_non_finite_scores_are_not_retried_but_reported_by_sample():
    reward = rewards.build_reward("test_nan", calls=[0], samples=[1, 3])
    with pytest.raises(guards.NonFiniteReward) as e:
        guards.score_with_retries(reward, images(), ["p"] * 4, None, None, 3, 0.0, None, print)
    assert e.value.reward == "test_nan" and e.value.indices == [1, 3] and reward.made == 1


def test_stop_signal_first_asks_second_exits():
    before = {s: signal.getsignal(s) for s in guards.StopSignal.SIGNALS}
    stop = guards.StopSignal().install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while stop.received is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stop.received == "SIGTERM"
        os.kill(os.getpid(), signal.SIGINT)  # within the repeat window: the same request, still alive
        time.sleep(0.05)
    finally:
        stop.uninstall()
    assert {s: signal.getsignal(s) for s in guards.StopSignal.SIGNALS} == before
    code = ("import os, signal, time\nfrom flowrl.train.guards import StopSignal\n"
            "s = StopSignal(); s.REPEAT_WINDOW_S = 0.0; s.install()\n"
            "os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.2)\n"
            "os.kill(os.getpid(), signal.SIGTERM); time.sleep(10); print('still running')")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 128 + signal.SIGTERM and "still running" not in res.stdout
    assert "second SIGTERM: exiting now" in res.stderr


def test_reward_modules_and_fault_settings_are_validated():
    cfg = load_config(RECIPE, ["rewards.modules=[fault_rewards]", "rewards.components=test_nan:1"])
    assert cfg.rewards.modules == ["fault_rewards"]
    for override, needle in [("rewards.modules=[no_such_reward_module]", "rewards.modules[0]: cannot import"),
                             ("rewards.timeout=0", "rewards.timeout"), ("rewards.retries=-1", "rewards.retries"),
                             ("training.max_consecutive_skips=0", "training.max_consecutive_skips"),
                             ("run.keep_checkpoints=-1", "run.keep_checkpoints")]:
        with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            load_config(RECIPE, [override])
    with pytest.raises(ConfigError, match="rewards.combine: the per-prompt tracker"):
        load_config(RECIPE, ["advantages.per_prompt_tracker=true", "rewards.combine=normalize_then_sum"])


def test_a_key_added_since_the_checkpoint_resumes_only_at_its_default():
    from flowrl.train.checkpoint import check_config
    from flowrl.train.config import Config, ConfigError, to_dict

    saved = to_dict(Config())
    del saved["sampling"]["post_window"], saved["training"]["rerange"]  # written before these keys existed
    current = to_dict(Config())
    check_config(saved, current)
    current["training"]["rerange"] = "balance"
    with pytest.raises(ConfigError, match="training.rerange was '<absent>'"):
        check_config(saved, current)
