"""The trainer's guards, in process on a small tiny-SD3 recipe: a non-finite reward, loss or gradient skips the
update (weights, optimizer, LR schedule and EMA untouched) and names the prompts; K skips in a row stop the run
with a checkpoint of the last good state; a failing reward is retried, then fails the run by name without
touching earlier checkpoints; everything a checkpoint registers comes back on resume."""
import hashlib
import json
import math
from pathlib import Path

import fault_rewards  # noqa: F401 (registers test_nan, test_flaky)
import pytest
import torch
from safetensors.torch import load_file

from flowrl.train import checkpoint
from flowrl.train.builders import prompt_indices
from flowrl.train.config import load_config
from flowrl.train.guards import TrainingError
from flowrl.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "tiny_smoke.yaml"
G, P = 4, 2  # samples per prompt, prompts per iteration
SMALL = ["run.progress=false", "eval.every=0", "data.eval_prompts=null", f"data.prompts_per_iteration={P}",
         f"sampling.plan={{name: flat, G: {G}}}", "sampling.num_steps=4",
         "sampling.schedule={name: window, size: 2, start: [0, 2]}", "finetune.ema_decay=0.5"]


pytestmark = pytest.mark.usefixtures("one_thread")


def trainer(tmp_path, *overrides, resume=None, name="run"):
    cfg = load_config(RECIPE, [f"run.output_dir={tmp_path / name}", *SMALL, *overrides])
    return Trainer(cfg, resume=resume)


def snapshot(tr) -> dict:
    """Everything an update changes."""
    opt = tr.optimizer.state_dict()["state"]
    return {"params": [p.detach().clone() for p in tr.params],
            "adam": [v.clone() for s in opt.values() for v in s.values()],
            "lr_steps": tr.lr_scheduler.last_epoch, "ema": [p.clone() for p in tr.ema.shadow_params],
            "ema_steps": tr.ema.optimization_step}


def same(a: dict, b: dict) -> bool:
    def eq(x, y):
        if isinstance(x, list):
            return len(x) == len(y) and all(eq(u, v) for u, v in zip(x, y))
        return torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y

    return all(eq(a[k], b[k]) for k in a)


def ids(tr, it, local_prompts):
    """Prompt-file indices of the iteration's local prompt positions (one process: slots = positions)."""
    idx = prompt_indices(tr.cfg.run.seed, it, len(tr.train_set), P)
    return sorted({idx[p] for p in local_prompts})


def test_non_finite_reward_loss_and_gradient_skip_the_update(tmp_path):
    # samples 1 and 6 are NaN in iteration 1's scoring: the leaves of prompts 0 and 1 (G samples each)
    tr = trainer(tmp_path, "rewards.components=test_nan:1.0",
                 "rewards.kwargs={test_nan: {calls: [1], samples: [1, 6]}}")
    assert not tr.iteration(0).get("skipped")
    before = snapshot(tr)
    row = tr.iteration(1)
    assert row["skipped"] == "reward" and row["skipped_prompts"] == ids(tr, 1, [0, 1]) and row["skips"] == 1
    assert "loss" not in row and "reward/mean" not in row
    assert same(snapshot(tr), before) and tr.state.consecutive_skips == 1

    # a non-finite loss on the units of local prompt 1 only
    unit_loss = tr.objective.loss

    def nan_loss(forest, units, mb):
        loss, s = unit_loss(forest, units, mb)
        bad = units.prompt[mb] == 1
        return torch.where(bad.to(loss.device), torch.full_like(loss, float("nan")), loss), s

    tr.objective.loss = nan_loss
    row = tr.iteration(2)
    assert row["skipped"] == "loss" and row["skipped_prompts"] == ids(tr, 2, [1])
    assert "reward/mean" in row and same(snapshot(tr), before) and tr.state.consecutive_skips == 2
    tr.objective.loss = unit_loss

    # a finite loss whose gradient is not: nothing to blame a prompt for
    hook = tr.params[0].register_hook(lambda g: torch.full_like(g, float("inf")))
    row = tr.iteration(3)
    hook.remove()
    assert row["skipped"] == "gradient" and row["skipped_prompts"] == [] and same(snapshot(tr), before)

    row = tr.iteration(4)
    after = snapshot(tr)
    assert "skipped" not in row and row["skips"] == 3 and tr.state.consecutive_skips == 0
    assert not torch.equal(after["params"][0], before["params"][0])
    assert after["lr_steps"] == before["lr_steps"] + 1 and after["ema_steps"] == before["ema_steps"] + 1


def test_consecutive_skips_stop_the_run_with_the_last_good_state(tmp_path):
    tr = trainer(tmp_path, "rewards.components=test_nan:1.0", "rewards.kwargs={test_nan: {from_call: 1}}",
                 "run.iterations=8", "run.save_every=1", "run.keep_checkpoints=0", "training.max_consecutive_skips=2")
    with pytest.raises(TrainingError, match=r"2 iterations in a row skipped for non-finite values \(the last: "
                                            r"reward, prompt ids \[\d+\]\); the weights of the last good update "
                                            r"are in .*iter_000003"):
        tr.train()
    run = tmp_path / "run"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped") for r in rows] == [None, "reward", "reward"]
    good, bad = checkpoint.scan(run / "checkpoints")
    assert [it for it, _ in good] == [1, 2, 3] and bad == []
    lora = [load_file(p / "pytorch_lora_weights.safetensors") for _, p in good]
    assert all(torch.equal(lora[0][k], other[k]) for other in lora[1:] for k in lora[0])  # no update after it. 0
    assert torch.load(good[2][1] / "custom_checkpoint_1.pkl", weights_only=False)["consecutive_skips"] == 2


def test_failing_reward_is_retried_then_fails_by_name_leaving_checkpoints_intact(tmp_path, caplog):
    # two failures, two retries: the run goes on
    tr = trainer(tmp_path, "rewards.components=test_flaky:1.0", "rewards.retry_backoff=0.01", "run.iterations=2",
                 "rewards.kwargs={test_flaky: {from_call: 1, failures: 2}}", name="recovers")
    assert tr.train() is None
    assert sum("retry" in r.getMessage() for r in caplog.records) == 2
    rows = [json.loads(x) for x in (tmp_path / "recovers" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped") for r in rows] == [None, None]

    # failing for good at iteration 2: the error names the reward; checkpoints 1 and 2 are untouched
    tr = trainer(tmp_path, "rewards.components=test_flaky:1.0", "rewards.retries=1",
                 "rewards.kwargs={test_flaky: {from_call: 2, failures: -1}}", "rewards.retry_backoff=0.01",
                 "run.iterations=6", "run.save_every=1", "run.keep_checkpoints=0", name="fails")
    written = {}
    save = tr.folder.save_checkpoint

    def recording_save(state, iteration, score):
        path = save(state, iteration, score)
        written[path] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in path.iterdir()}
        return path

    tr.folder.save_checkpoint = recording_save
    with pytest.raises(TrainingError, match=r"reward 'test_flaky' failed 2 time\(s\); last error: ConnectionError"):
        tr.train()
    root = tmp_path / "fails" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["iter_000001", "iter_000002"]
    for path, digests in written.items():  # byte for byte what was written
        assert checkpoint.problem(path) is None
        assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in path.iterdir()} == digests
    assert len((tmp_path / "fails" / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_lr_schedule_counts_iterations(tmp_path, schedule):
    """Warm-up and decay are given in iterations; the scheduler steps once per optimizer step (here 2 per
    iteration), so the rate is 0 at the start, peaks after the warm-up iteration and reaches its closed form."""
    its, warm, k, lr = 5, 1, 2, 1e-3
    tr = trainer(tmp_path, f"run.iterations={its}", f"training.warmup_iterations={warm}", "training.inner_epochs=1",
                 f"training.updates_per_epoch={k}", f"training.lr_schedule={schedule}", f"training.lr={lr}")
    rates = []
    for _ in range(its * k):
        rates.append(tr.lr_scheduler.get_last_lr()[0])
        tr.optimizer.step()
        tr.lr_scheduler.step()
    decay = [(s - warm * k) / ((its - warm) * k) for s in range(warm * k, its * k)]
    after = {"constant": [1.0] * len(decay), "linear": [1 - p for p in decay],
             "cosine": [0.5 * (1 + math.cos(math.pi * p)) for p in decay]}[schedule]
    assert rates[:warm * k] == pytest.approx([lr * s / (warm * k) for s in range(warm * k)])
    assert rates[warm * k:] == pytest.approx([lr * f for f in after])


NFT = ["training.objective=nft", "training.nft_eta_max=0.5", "training.nft_eta_rate=0.2",
       "training.updates_per_epoch=2"]


@pytest.mark.parametrize("mode", ["lora", "full", "nft"])
def test_everything_registered_comes_back_on_resume(tmp_path, mode):
    """Trained weights (the LoRA file, or the full model through accelerate), Adam, LR schedule, EMA, per-prompt
    tracker, DiffusionNFT's soft-updated sampling policy, loop state and the global RNGs come back exactly, and the
    resumed run's next iteration equals the straight run's bit for bit."""
    extra = ["advantages.per_prompt_tracker=true", "training.warmup_iterations=1", "training.lr_schedule=cosine",
             "run.iterations=4", f"finetune.mode={'full' if mode == 'full' else 'lora'}", "training.lr=1e-3",
             *(NFT if mode == "nft" else [])]
    tr = trainer(tmp_path, *extra)

    def step(t, it):
        t.state.iteration = it + 1
        t.rows.append(t.iteration(it))
        with open(t.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(t.rows[-1]) + "\n")

    def everything(t) -> dict:
        soft = [p.clone() for o in t.objective.state() for p in o.state_dict()["params"]]
        return {**snapshot(t), "soft": soft, "tracker": t.scorer.tracker.state_dict(), "state": t.state.state_dict(),
                "rng": torch.get_rng_state()}

    step(tr, 0)
    step(tr, 1)
    path = tr.folder.save_checkpoint(tr.state, 2, None)
    expected = everything(tr)
    assert expected["tracker"]["history"] and expected["lr_steps"] == 2 * (2 if mode == "nft" else 1)
    if mode == "nft":  # the sampling policy lags the trained weights
        assert not all(torch.equal(a, b.detach()) for a, b in zip(expected["soft"], tr.params))
    step(tr, 2)  # a later checkpoint and metrics row, which resuming from the earlier checkpoint discards
    straight = {**everything(tr), "row": {k: v for k, v in tr.rows[-1].items() if not k.startswith("time/")}}
    later = tr.folder.save_checkpoint(tr.state, 3, None)
    torch.rand(5)  # move the global generator on: the resume must put it back

    again = trainer(tmp_path, *extra, resume=str(path))
    assert again.resume_from == path and not later.exists()
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    got = everything(again)
    assert same(got, expected) and got["tracker"] == expected["tracker"] and got["state"] == expected["state"]
    assert len(again.rows) == 2
    weights = {"lora": "pytorch_lora_weights.safetensors", "nft": "pytorch_lora_weights.safetensors",
               "full": "model.safetensors"}
    assert sorted(p.name for p in path.glob("*.safetensors")) == [weights[mode]]
    step(again, 2)
    resumed = {**everything(again), "row": {k: v for k, v in again.rows[-1].items() if not k.startswith("time/")}}
    assert same(resumed, straight) and resumed["row"] == straight["row"]


def test_eval_samples_at_eval_guidance(tmp_path, monkeypatch):
    """eval.guidance_scale, when set, is the guidance of the eval images (and the before/after grid); otherwise
    the rollouts' sampling.guidance_scale."""
    import flowrl.train.evaluation as evaluation_module

    seen = []
    real = evaluation_module.rollout

    def spy(*args, **kwargs):
        seen.append(kwargs["guidance_scale"])
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation_module, "rollout", spy)
    evals = [f"data.eval_prompts={ROOT / 'flowrl/data/prompts/tiny_eval.txt'}"]
    trainer(tmp_path, *evals, name="a").evaluator.images([0])
    trainer(tmp_path, *evals, "eval.guidance_scale=3.0", name="b").evaluator.images([0])
    assert seen == [1.0, 3.0]
