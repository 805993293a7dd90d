"""DiffusionNFT (training.objective: nft): the loss against its closed forms, units keyed by identity, and the
trainer raising a reward with it."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowrl.core import nft_loss, nft_optimality
from flowrl.sampling import Constant, Flat, FlowSDE, rollout
from flowrl.sampling.analytic import GaussianFlowPolicy
from flowrl.train.nft import forward_process, nft_units

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _batch(n=6, shape=(3, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, noise, v_old = (torch.randn(n, *shape, generator=g) for _ in range(3))
    t = torch.rand(n, generator=g) * 0.9 + 0.05
    return x0, noise, v_old, t


def test_optimality_probability():
    adv = torch.tensor([-9.0, -5.0, -1.0, 0.0, 2.5, 5.0, 7.0])
    assert torch.allclose(nft_optimality(adv, 5.0), torch.tensor([0.0, 0.0, 0.4, 0.5, 0.75, 1.0, 1.0]))
    with pytest.raises(ValueError, match="positive clip"):
        nft_optimality(adv, 0.0)


@pytest.mark.parametrize("beta", [1.0, 0.3])
def test_plain_loss_minimiser_is_a_step_toward_good_and_away_from_bad_samples(beta):
    """With the plain velocity error the loss is quadratic in v; its minimiser is
    v* = v_old + (2r - 1) / beta * (target - v_old), so the gradient vanishes exactly there."""
    x0, noise, v_old, t = _batch()
    r = torch.tensor([0.0, 0.2, 0.5, 0.6, 0.9, 1.0])
    target = noise - x0
    v_star = v_old + ((2 * r - 1) / beta).reshape(-1, 1, 1, 1) * (target - v_old)
    v = v_star.clone().requires_grad_(True)
    loss, _ = nft_loss(v, v_old, x0, noise, t, r, beta, adaptive=False)
    (grad,) = torch.autograd.grad(loss.sum(), v)
    assert float(grad.abs().max()) < 1e-5
    # and it is a minimum: any other v scores higher
    worse, _ = nft_loss(v_star + 0.1 * torch.randn_like(v_star), v_old, x0, noise, t, r, beta, adaptive=False)
    assert bool((worse > loss.detach()).all())


@pytest.mark.parametrize("adaptive", [False, True])
def test_on_policy_gradient_is_advantage_weighted_flow_matching(adaptive):
    """At v = v_old the gradient is 2 (2r - 1) (v - target) / D per sample, times t^2 / w with the adaptive
    x0-space error (w = the detached mean |x0_hat - x0|); r = 1/2 (an average sample) gives exactly none."""
    x0, noise, v_old, t = _batch(seed=1)
    r = torch.tensor([0.5, 0.1, 0.3, 0.7, 0.9, 1.0])
    v = v_old.clone().requires_grad_(True)
    loss, stats = nft_loss(v, v_old, x0, noise, t, r, beta=0.5, adaptive=adaptive)
    (grad,) = torch.autograd.grad(loss.sum(), v)
    target = noise - x0
    D = x0[0].numel()
    expect = 2 * (2 * r - 1).reshape(-1, 1, 1, 1) * (v_old - target) / D
    if adaptive:
        tb = t.reshape(-1, 1, 1, 1)
        w = (tb * (target - v_old)).abs().reshape(len(t), -1).mean(1).reshape(-1, 1, 1, 1)
        expect = expect * tb**2 / w
    assert torch.allclose(grad, expect, atol=1e-6, rtol=1e-4)
    assert float(grad[0].abs().max()) < 1e-7  # rounding of (1 -+ beta) v_old +- beta v only
    # on-policy the implicit positive and negative policies are both v_old: equal errors
    assert torch.allclose(stats["nft_pos"], stats["nft_neg"])


def test_loss_hand_value():
    x0, noise, t = torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([0.5])
    v_old, v = torch.zeros(1, 2), torch.full((1, 2), 0.5)
    # beta 1: v+ = v = 0.5, v- = 2 v_old - v = -0.5; target 1: errors 0.25 and 2.25
    loss, _ = nft_loss(v, v_old, x0, noise, t, torch.tensor([0.75]), 1.0, adaptive=False)
    assert loss.item() == pytest.approx(0.75 * 0.25 + 0.25 * 2.25)


def test_units_are_keyed_by_identity_not_batch_position():
    """A prompt's samples get the same forward-process draws (step, noise) whatever else is in the batch."""
    policy = GaussianFlowPolicy(torch.randn(1, 16).expand(3, 16), s0=0.5, shift=1.0)  # one mean: x0 by noise
    kw = dict(plan=Flat(4), kernel=FlowSDE(a=0.7), schedule=Constant(0.0), num_steps=6, seed=3, iteration=2)
    both = rollout(policy, ["a", "b"], prompt_ids=[10, 11], **kw)
    alone = rollout(policy, ["b"], prompt_ids=[11], **kw)
    u_both, u_alone = nft_units(both, 3, seed=0, iteration=5), nft_units(alone, 3, seed=0, iteration=5)
    assert len(u_both) == 2 * 4 * 3 and len(u_alone) == 4 * 3
    mine = torch.arange(12, 24)  # prompt 11's units in the two-prompt batch
    assert torch.equal(u_both.step[mine], u_alone.step) and u_both.seeds[12:] == u_alone.seeds
    x0_a, n_a, t_a, _, _ = forward_process(u_both, mine, both.grid, "cpu")
    x0_b, n_b, t_b, _, _ = forward_process(u_alone, torch.arange(12), alone.grid, "cpu")
    assert torch.equal(n_a, n_b) and torch.equal(t_a, t_b) and torch.equal(x0_a, x0_b)
    assert len(set(u_both.seeds)) == len(u_both)  # every draw its own stream
    assert not torch.equal(nft_units(both, 3, seed=0, iteration=6).step, u_both.step)


def test_nft_raises_the_reward(tmp_path):
    """The tiny smoke recipe with NFT instead of the clipped surrogate: ODE rollouts, brightness rises clearly."""
    run = tmp_path / "run"
    sets = [f"run.output_dir={run}", "run.iterations=16", "eval.every=0", "run.progress=false",
            "training.objective=nft", "sampling.schedule={name: constant, scale: 0.0}", "training.lr=3e-2"]
    res = subprocess.run([sys.executable, "-m", "flowrl.cli", "train", str(ROOT / "configs" / "tiny_smoke.yaml")]
                         + [a for s in sets for a in ("--set", s)], cwd=ROOT, env=ENV, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and all("nft_pos" in r and "clip_frac" not in r for r in rows)
    n = 3 * 32

    def mean_and_se(rs):
        return (sum(r["reward/mean"] for r in rs) / len(rs),
                math.sqrt(sum(r["reward/brightness_std"] ** 2 for r in rs) / len(rs) / n))

    (m0, se0), (m1, se1) = mean_and_se(rows[:3]), mean_and_se(rows[-3:])
    assert m1 - m0 > 3 * math.sqrt(se0**2 + se1**2), (m0, m1, se0, se1)
    assert rows[0]["nfe"] == 4 * 8 * 8  # ODE rollouts: prompts x G x steps
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_several_updates_regress_against_the_sampling_policy(tmp_path, monkeypatch):
    """With two updates per iteration v_old is recorded before the first: that update is on-policy (v = v_old
    exactly), the second sees the moved weights against the same v_old."""
    from flowrl.train import nft as nft_mod
    from flowrl.train import trainer as trainer_mod
    from flowrl.train.config import load_config

    cfg = load_config(str(ROOT / "configs" / "tiny_smoke.yaml"), [
        f"run.output_dir={tmp_path / 'run'}", "training.objective=nft", "training.updates_per_epoch=2",
        "sampling.schedule={name: constant, scale: 0.0}", "eval.every=0", "run.progress=false"])
    gaps, real = [], nft_mod.nft_loss

    def spy(v, v_old, *args, **kw):
        gaps.append(float((v.detach() - v_old).abs().max()))
        return real(v, v_old, *args, **kw)

    monkeypatch.setattr(nft_mod, "nft_loss", spy)
    row = trainer_mod.Trainer(cfg).iteration(0)
    assert len(gaps) == 2 and gaps[0] == 0.0 and gaps[1] > 1e-3, gaps  # 64 units, micro-batches of 32
    assert "skipped" not in row and row["nft_r"] == pytest.approx(0.5, abs=1e-6)


def test_nft_config_errors(tmp_path):
    base = [sys.executable, "-m", "flowrl.cli", "train", str(ROOT / "configs" / "tiny_smoke.yaml"), "--set",
            f"run.output_dir={tmp_path / 'r'}", "--set", "training.objective=nft"]
    for extra, needle in ((["--set", "advantages.clip=null"], "advantages.clip"),
                          (["--set", "training.objective=ppo"], "training.objective"),
                          (["--set", "training.nft_beta=0"], "training.nft_beta")):
        res = subprocess.run(base + extra, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and needle in res.stderr, res.stderr


def test_guided_velocity_is_the_samplers_and_conditional_is_one_branch():
    """``guided``: v_u + w (v_c - v_u), what a guided sampler steps with; otherwise the conditional branch."""
    from flowrl.models import load_policy
    from flowrl.train.nft import guide, velocity

    policy = load_policy("tiny:sd3", max_sequence_length=32)
    cond = policy.encode(["a red cube", "a blue ball"], negative_prompt="")
    g = torch.Generator().manual_seed(0)
    shape = (2, *policy.latent_shape(32, 32))
    x0, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t, ts, idx = torch.tensor([0.3, 0.8]), torch.tensor([300.0, 800.0]), torch.tensor([1, 0])
    with torch.no_grad():
        guided = velocity(policy, cond, x0, noise, t, ts, idx, 4.5, guided=True)
        plain = velocity(policy, cond, x0, noise, t, ts, idx, 4.5, guided=False)
        x_t = (1 - t.reshape(-1, 1, 1, 1)) * x0 + t.reshape(-1, 1, 1, 1) * noise
        v_c = policy.forward(x_t, ts, cond.take(idx), cond.shared, 4.5).float()
        v_u = policy.forward(x_t, ts, cond.take(idx, "uncond"), cond.shared, 4.5).float()
    assert torch.allclose(plain, v_c, atol=1e-6)
    assert torch.allclose(guided, v_u + 4.5 * (v_c - v_u), atol=1e-4)
    assert not torch.allclose(guided, plain, atol=1e-3)
    with torch.no_grad():  # the guided velocity rebuilt from the conditional one (the KL term's shortcut)
        assert torch.allclose(guide(policy, cond, x0, noise, t, ts, idx, 4.5, plain), guided, atol=1e-5)


def test_kl_holds_the_guided_velocity_to_the_base(tmp_path, monkeypatch):
    """kl_beta with conditional training under CFG: the penalty is on the guided velocity (both branches), exactly
    zero while the LoRA is at its zero start (the first iteration's single update) and positive once it moved."""
    from flowrl.train import nft as nft_mod
    from flowrl.train import trainer as trainer_mod
    from flowrl.train.config import load_config

    cfg = load_config(str(ROOT / "configs" / "tiny_smoke.yaml"), [
        f"run.output_dir={tmp_path / 'run'}", "training.objective=nft", "training.lr=1e-2",
        "sampling.schedule={name: constant, scale: 0.0}", "sampling.guidance_scale=4.5", "training.kl_beta=0.1",
        "eval.every=0", "run.progress=false"])
    guided_calls, real = [], nft_mod.velocity

    def spy(*args, **kw):
        guided_calls.append(args[8] if len(args) > 8 else kw["guided"])
        return real(*args, **kw)

    monkeypatch.setattr(nft_mod, "velocity", spy)
    trainer = trainer_mod.Trainer(cfg)
    rows = [trainer.iteration(0), trainer.iteration(1)]
    # per micro-batch (64 units, 32 a batch): the trained conditional velocity (its guided twin adds only the
    # unconditional pass), then the reference's guided velocity
    assert guided_calls[:4] == [False, True] * 2
    assert rows[0]["kl"] == 0.0 and rows[1]["kl"] > 0 and not any("skipped" in r for r in rows)


def test_soft_updated_sampling_policy(tmp_path, monkeypatch):
    """training.nft_eta_max: theta_old starts at theta (eta_0 = 0) and then follows theta_old <- eta theta_old +
    (1 - eta) theta; rollouts run under theta_old and v_old is its velocity, so once theta_old lags, even the
    first update of an iteration is off-policy. Validation keeps it to NFT."""
    from flowrl.train import nft as nft_mod
    from flowrl.train import trainer as trainer_mod
    from flowrl.train.config import ConfigError, load_config
    from flowrl.train.validate import validate

    sets = [f"run.output_dir={tmp_path / 'run'}", "training.objective=nft", "training.lr=1e-2",
            "sampling.schedule={name: constant, scale: 0.0}", "eval.every=0", "run.progress=false",
            "training.nft_eta_max=0.5", "training.nft_eta_rate=0.5"]
    cfg = load_config(str(ROOT / "configs" / "tiny_smoke.yaml"), sets)
    gaps, real = [], nft_mod.nft_loss

    def spy(v, v_old, *args, **kw):
        gaps.append(float((v.detach() - v_old).abs().max()))
        return real(v, v_old, *args, **kw)

    monkeypatch.setattr(nft_mod, "nft_loss", spy)
    trainer = trainer_mod.Trainer(cfg)
    rolled, real_rollout = [], trainer._rollout

    def rollout_spy(*args):
        rolled.append([p.detach().clone() for p in trainer.params])
        return real_rollout(*args)

    monkeypatch.setattr(trainer, "_rollout", rollout_spy)
    clone = lambda ps: [p.detach().clone() for p in ps]  # noqa: E731
    thetas, olds, rows, first_gap = [clone(trainer.params)], [], [], []
    for it in range(3):
        gaps.clear()
        rows.append(trainer.iteration(it))
        first_gap.append(gaps[0])
        thetas.append(clone(trainer.params))
        olds.append(clone(trainer.objective.soft.params))
    assert [r["nft_eta"] for r in rows] == [0.0, 0.5, 0.5] and not any("skipped" in r for r in rows)
    # eta_0 = 0: theta_old = theta_1; then theta_old_2 = (theta_1 + theta_2) / 2
    assert all(torch.equal(o, p) for o, p in zip(olds[0], thetas[1]))
    assert all(torch.allclose(o, 0.5 * a + 0.5 * b, atol=1e-7) for o, a, b in zip(olds[1], thetas[1], thetas[2]))
    # rollouts ran under theta_old (theta itself until it lags), and the weights came back afterwards
    assert all(torch.equal(r, o) for r, o in zip(rolled[2], olds[1]))
    assert not all(torch.equal(r, p) for r, p in zip(rolled[2], thetas[2]))
    # v_old is theta_old's velocity: on-policy while theta_old = theta at an iteration's start, not once it lags
    assert first_gap[0] == 0.0 and first_gap[1] == 0.0 and first_gap[2] > 1e-4, first_gap
    # checkpoint state round-trips
    other = nft_mod.SoftPolicy(thetas[0], 0.5, 0.5)
    other.load_state_dict(trainer.objective.soft.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.params, trainer.objective.soft.params))
    for extra, needle in ((["training.objective=grpo", "sampling.schedule={name: constant}"], "nft_eta_max"),
                          (["training.nft_eta_max=1.0"], "nft_eta_max")):
        with pytest.raises(ConfigError, match=needle):
            validate(load_config(str(ROOT / "configs" / "tiny_smoke.yaml"), sets + extra))


def test_kl_reference_velocity_once_per_iteration(tmp_path, monkeypatch):
    """With several updates per iteration the base's velocity at each unit's fixed draw is computed once, before
    the first update, and the penalty equals the one recomputed per update."""

    from flowrl.train import nft as nft_mod
    from flowrl.train import trainer as trainer_mod
    from flowrl.train.config import load_config

    cfg = load_config(str(ROOT / "configs" / "tiny_smoke.yaml"), [
        f"run.output_dir={tmp_path / 'run'}", "training.objective=nft", "training.lr=1e-2",
        "sampling.schedule={name: constant, scale: 0.0}", "training.kl_beta=0.1", "training.updates_per_epoch=2",
        "eval.every=0", "run.progress=false"])
    trainer = trainer_mod.Trainer(cfg)
    trainer.iteration(0)  # the LoRA moves off its zero start: the penalty is non-zero
    obj = trainer.objective
    forest = trainer._rollout(trainer.train_set.prompts[:4], [0, 1, 2, 3], 1)
    leaves = forest.leaves()
    adv = torch.linspace(-1, 1, len(leaves))
    units = obj.units(forest, adv, forest.node_prompt[leaves], 1)
    calls, real_velocity = [], nft_mod.velocity
    monkeypatch.setattr(nft_mod, "velocity", lambda *a: calls.append(a[-1]) or real_velocity(*a))
    mb = torch.arange(8, 24)
    with trainer.views.use("train"):
        obj.prepare(forest, units, 1)
        assert calls == [False, False, True, True]  # v_old and the reference, per micro-batch of 32 (64 units)
        calls.clear()
        kl_cached = obj.loss(forest, units, mb)[1]["kl"]
        assert calls == [False]  # the update itself: the trained velocity only
        obj.v_ref = None  # one update per iteration: the reference recomputed at the update
        kl_fresh = obj.loss(forest, units, mb)[1]["kl"]
    assert float(kl_cached.min()) > 0 and torch.allclose(kl_cached, kl_fresh, rtol=1e-4, atol=1e-9)


def test_merged_sampling_is_the_same_policy_with_one_matmul_per_layer(tmp_path, monkeypatch):
    """finetune.merged_sampling: rollouts, v_old and evals run the LoRA merged into the base weights. The merged
    forward equals the adapter's, the frozen base tensors come back untouched (the same objects, the same bits),
    the KL reference cannot be taken inside it, and two runs with and without merging agree. Validation keeps it
    to LoRA + NFT."""
    from flowrl.train import finetune
    from flowrl.train import trainer as trainer_mod
    from flowrl.train.config import ConfigError, load_config
    from flowrl.train.validate import validate

    sets = ["training.objective=nft", "training.lr=1e-2", "training.updates_per_epoch=2", "run.progress=false",
            "sampling.schedule={name: constant, scale: 0.0}", "training.nft_eta_max=0.5", "training.nft_eta_rate=0.5",
            "eval.every=2", "eval.num_prompts=4"]
    recipe = str(ROOT / "configs" / "tiny_smoke.yaml")
    entered, real_merged = [], finetune.merged_lora
    monkeypatch.setattr(finetune, "merged_lora", lambda d: entered.append(1) or real_merged(d))
    runs = {}
    for merged in (False, True):
        cfg = load_config(recipe, sets + [f"run.output_dir={tmp_path / str(merged)}",
                                          f"finetune.merged_sampling={str(merged).lower()}"])
        trainer = trainer_mod.Trainer(cfg)
        runs[merged] = ([trainer.iteration(0), trainer.iteration(1), trainer.evaluate(1)], trainer)
    assert len(entered) == 2 * 2 + 1  # each iteration's rollout and v_old, and the eval
    (plain_rows, _), (merged_rows, trainer) = runs[False], runs[True]
    for a, b in zip(plain_rows, merged_rows):
        for k in a:
            if not k.startswith("time/"):
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
    assert any(float(p.detach().abs().max()) > 0 for n, p in trainer.acc.unwrap_model(trainer.model).named_parameters()
               if "lora_B" in n)

    denoiser = trainer.acc.unwrap_model(trainer.model)
    before = {n: (p, p.detach().clone()) for n, p in denoiser.named_parameters()}
    forest = trainer._rollout(trainer.train_set.prompts[:1], [0], 0)
    xt, ts, idx = torch.randn_like(forest.latents[:2]), torch.tensor([300.0, 700.0]), torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        plain = trainer.policy.predict(xt, ts, forest.cond, idx, 1.0)
        with real_merged(denoiser):
            merged = trainer.policy.predict(xt, ts, forest.cond, idx, 1.0)
            with pytest.raises(RuntimeError, match="merged_lora"), finetune.base_weights(denoiser):
                pass
        with finetune.base_weights(denoiser):
            base = trainer.policy.predict(xt, ts, forest.cond, idx, 1.0)
    assert torch.allclose(merged, plain, rtol=1e-5, atol=1e-5) and not torch.allclose(base, plain, atol=1e-3)
    after = dict(denoiser.named_parameters())
    assert all(after[n] is p and torch.equal(p, saved) for n, (p, saved) in before.items())
    assert torch.equal(trainer.policy.predict(xt, ts, forest.cond, idx, 1.0), plain)  # the adapter is back on

    for extra, needle in ((["training.objective=grpo", "sampling.schedule={name: constant}",
                            "training.nft_eta_max=0.0"], "merged_sampling"),
                          (["finetune.mode=full", "training.nft_eta_max=0.0"], "merged_sampling")):
        with pytest.raises(ConfigError, match=needle):
            validate(load_config(recipe, sets + ["finetune.merged_sampling=true"] + extra))
