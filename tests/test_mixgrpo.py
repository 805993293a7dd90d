"""MixGRPO and MixGRPO-Flash: the sliding window's path against the reference rule and across a resume, Flash's
model calls, the DPM-Solver++ tail's order of accuracy, re-ranging, hybrid sampling, and the recipes."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_tree_methods import _tiny_sets, _train_two, fresh_state  # noqa: F401 (a fixture)

from flowrl.sampling import Constant, Flat, FlowSDE, Window, rollout
from flowrl.sampling.analytic import GaussianFlowPolicy
from flowrl.sampling.schedules import Sliding
from flowrl.sampling.solvers import PostWindow, dpm_solver_pp_step
from flowrl.train import dry_run
from flowrl.train.config import ConfigError, load_config
from flowrl.train.units import Units, balanced, micro_batches
from flowrl.train.validate import validate

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
PUBLISHED = ["flux_mixgrpo_multireward.yaml", "flux_mixgrpo_flash_multireward.yaml",
             "flux_mixgrpo_flash_star_multireward.yaml", "sd3_mixgrpo_multireward.yaml",
             "sd3_mixgrpo_flash_multireward.yaml", "sd3_mixgrpo_flash_star_multireward.yaml"]
TOY = ["toy_mixgrpo.yaml", "toy_mixgrpo_flash.yaml"]


# ------------------------------------------------------------------------------------------ 1. the window's path


def reference_starts(n: int, S: int, w: int, tau, stride, roll_back: bool, first: int = 0) -> list[int]:
    """The rule as MixGRPO states it, written out independently: the window [l, l + w) inside the first L = S - 2
    steps; after tau(l) iterations at a start, l moves by the stride (by w without overlap); a start past the
    last one that leaves a non-empty window goes back to the first, or stays at the last."""
    L, out, start, spent = S - 2, [], first, 0
    dwell = tau if callable(tau) else (lambda _l: tau)
    for _ in range(n):
        out.append(start)
        spent += 1
        if spent == dwell(start):
            start, spent = start + (w if stride is None else stride), 0
            if start >= L:
                start = first if roll_back else L - 1
    return out


def test_published_window_path_over_300_iterations(capsys):
    s = Sliding(size=4, tau=25, stride=1, roll_back=True)
    starts = [s.window_start(25, i) for i in range(300)]
    print("MixGRPO window starts, w = 4, tau = 25, S = 25, stride 1, roll-back:", starts)
    assert starts == reference_starts(300, 25, 4, 25, 1, True)
    assert starts == [i // 25 for i in range(300)]  # the paper's l = s floor(i / tau): start 11 at the end
    scales = s.noise_scales(25, 299)
    assert torch.nonzero(scales).flatten().tolist() == [11, 12, 13, 14]


@pytest.mark.parametrize("S, w, tau, stride, roll_back", [(12, 3, 4, 2, True), (12, 3, 4, 2, False),
                                                            (10, 2, 3, None, True), (10, 4, 5, 1, False),
                                                            (25, 4, 20, 0, True)])
def test_progressive_paths_roll_back_clamp_and_freeze(S, w, tau, stride, roll_back):
    s = Sliding(size=w, tau=tau, stride=stride, roll_back=roll_back)
    starts = [s.window_start(S, i) for i in range(200)]
    assert starts == reference_starts(200, S, w, tau, stride, roll_back)
    for i in (0, 57, 199):  # the window never leaves the first S - 2 steps and is never empty
        sde = torch.nonzero(s.noise_scales(S, i)).flatten().tolist()
        assert sde and sde[0] == starts[i] and sde[-1] < S - 2 and len(sde) <= w
    if stride == 0:
        assert set(starts) == {0}
    # a fresh schedule asked for a late iteration first replays the same path
    assert Sliding(size=w, tau=tau, stride=stride, roll_back=roll_back).window_start(S, 150) == starts[150]


def test_decay_and_exp_decay_dwell_times():
    S, L = 25, 23
    decay = Sliding(size=4, tau=10, tau_min=1, stride=1, strategy="decay")
    rule = lambda start: max(1, int(10 * (1 - start / L) + 1 * start / L))  # noqa: E731
    assert [decay.window_start(S, i) for i in range(300)] == reference_starts(300, S, 4, rule, 1, True)
    exp = Sliding(size=4, tau=25, stride=1, strategy="exp_decay", threshold=13, k=0.1)
    rule = lambda start: math.ceil(25 * math.exp(-0.1 * max(0, start - 13)))  # noqa: E731
    path = [exp.window_start(S, i) for i in range(600)]
    assert path == reference_starts(600, S, 4, rule, 1, True)
    first_pass = path[:next(i for i in range(1, 600) if path[i] == 0 and path[i - 1] != 0)]
    assert first_pass.count(0) == 25 and first_pass.count(14) == 23
    assert first_pass.count(20) == math.ceil(25 * math.exp(-0.7)) and first_pass[-1] == 22


def test_random_strategy_is_seeded_and_uniform():
    s, t = Sliding(size=4, strategy="random", seed=3), Sliding(size=4, strategy="random", seed=3)
    draws = [s.window_start(25, i) for i in range(4000)]
    assert draws == [t.window_start(25, i) for i in range(4000)]
    counts = torch.bincount(torch.tensor(draws), minlength=20)
    assert min(draws) == 0 and max(draws) == 19 and len(counts) == 20  # l in 0 .. S - 2 - w
    assert float(counts.float().std() / counts.float().mean()) < 0.15
    assert draws != [Sliding(size=4, strategy="random", seed=4).window_start(25, i) for i in range(4000)]


def test_bad_sliding_settings_are_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="strategy"):
        Sliding(strategy="linear")
    with pytest.raises(ValueError, match="leave no room"):
        Sliding(size=4, first=3).noise_scales(5)
    with pytest.raises(ConfigError, match="sampling.schedule"):
        validate(load_config(CONFIGS / "tiny_smoke.yaml", ["sampling.schedule={name: sliding, size: 2, tau: 0}"]))


def _cli_train(out: Path, iterations: int, *extra) -> subprocess.CompletedProcess:
    sets = ["run.progress=false", "data.prompts_per_iteration=1", "sampling.num_steps=6", "run.save_every=3",
            "sampling.schedule={name: sliding, size: 2, tau: 2, stride: 1, roll_back: true}", "eval.every=0",
            "finetune.lora_rank=4", "training.updates_per_epoch=2", "training.rerange=balance",
            f"run.output_dir={out}", f"run.iterations={iterations}"]
    return subprocess.run([sys.executable, "-m", "flowrl.cli", "train", str(CONFIGS / "tiny_smoke.yaml"),
                           *[a for s in sets for a in ("--set", s)], *extra], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=600)


def test_resume_mid_window_continues_the_same_path_bit_for_bit(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _cli_train(straight, 6).returncode == 0
    first = _cli_train(split, 3)  # stops after the first iteration of the window at start 1
    assert first.returncode == 0, first.stderr[-3000:]
    second = _cli_train(split, 6, "--resume", "latest")
    assert second.returncode == 0, second.stderr[-3000:]
    rows = [[{k: v for k, v in json.loads(x).items() if not k.startswith("time/")}
             for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (straight, split)]
    assert rows[0] == rows[1]
    assert [r["window/start"] for r in rows[0]] == [0, 0, 1, 1, 2, 2]
    assert [r["window/end"] for r in rows[0]] == [2, 2, 3, 3, 4, 4]
    w1 = load_file(straight / "lora" / "pytorch_lora_weights.safetensors")
    w2 = load_file(split / "lora" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


# ------------------------------------------------------------------------------------------ 2. Flash's model calls


class Counting(GaussianFlowPolicy):
    """Counts the states the network is called on (CFG doubling aside: this policy has no CFG)."""

    calls = 0

    def forward(self, x, timesteps, cond, shared, guidance_scale):
        Counting.calls += x.shape[0]
        return super().forward(x, timesteps, cond, shared, guidance_scale)


@pytest.mark.parametrize("ratio, tail", [(0.4, 7), (0.2, 3), (1.0, 21)])
def test_flash_rollout_makes_four_plus_tail_model_calls_per_sample(ratio, tail):
    policy = Counting(torch.zeros(2, 8))
    Counting.calls = 0
    f = rollout(policy, ["a", "b"], plan=Flat(3), kernel=FlowSDE(), schedule=Sliding(size=4, tau=25), num_steps=25,
                post_window=PostWindow(ratio=ratio))
    assert Counting.calls == f.nfe == 6 * (4 + tail)
    assert f.grid.num_steps == 4 + tail and f.info["tail_from"] == 4
    assert int(f.sde.sum()) == 6 * 4  # the window's steps, the only ones trained
    Counting.calls = 0
    rollout(policy, ["a", "b"], plan=Flat(3), kernel=FlowSDE(), schedule=Sliding(size=4, tau=25), num_steps=25)
    assert Counting.calls == 6 * 25


def test_flash_grid_keeps_the_window_and_rescores_to_ratio_one():
    policy = GaussianFlowPolicy(torch.linspace(-1, 1, 16).reshape(2, 8), s0=0.5)
    plain = policy.sampling_grid(25)
    f = rollout(policy, ["a", "b"], plan=Flat(2), kernel=FlowSDE(), schedule=Window(size=4, start=6),
                num_steps=25, post_window=PostWindow(ratio=0.4))
    last = 9  # the window's last step
    assert torch.equal(f.grid.sigmas[:last + 2], plain.sigmas[:last + 2])  # continuous at t_{l+1}
    assert f.grid.num_steps == last + max(int((25 - last) * 0.4), 2) and float(f.grid.sigmas[-1]) == 0.0
    assert bool((f.grid.sigmas[1:] < f.grid.sigmas[:-1]).all())
    from flowrl.sampling import score_edges

    edges = torch.nonzero(f.sde).flatten()
    logp, _, _ = score_edges(policy, f, edges)
    assert float((logp.detach() - f.logp_old[edges]).exp().sub(1).abs().max()) <= 1e-6


def test_flash_needs_a_window_and_a_flow_grid(tmp_path):
    policy = GaussianFlowPolicy(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="no window"):
        rollout(policy, ["a"], plan=Flat(1), kernel=FlowSDE(), schedule=Constant(0.0), num_steps=8,
                post_window=PostWindow())
    with pytest.raises(ValueError, match="ode_solver must be 'euler'"):
        rollout(policy, ["a"], plan=Flat(1), kernel=FlowSDE(), schedule=Window(size=2), num_steps=8,
                post_window=PostWindow(), ode_solver="dpm2m")
    with pytest.raises(ConfigError, match="post_window.ratio"):
        validate(load_config(CONFIGS / "tiny_smoke.yaml", ["sampling.post_window={ratio: 0}"]))
    with pytest.raises(ConfigError, match="unknown config key sampling.post_window.order2"):
        validate(load_config(CONFIGS / "tiny_smoke.yaml", ["sampling.post_window={order2: 1}"]))


# ------------------------------------------------------------------------------------------ 3. the solver


def _exact_ode(x, t, m, s0):
    """The probability-flow ODE of Gaussian data N(m, s0^2) from (x, t) to t = 0, in closed form."""
    return m + s0 * (x - (1 - t) * m) / ((1 - t) ** 2 * s0**2 + t**2) ** 0.5


def _tail_error(policy, x, t0, steps, order=2, solver_type="midpoint", history=()):
    g = policy.tail_grid(t0, steps + 1)
    m = policy.means[:1]
    for k in range(steps):
        v = policy.velocity(x, g.sigmas[k:k + 1], m)
        x, m0 = dpm_solver_pp_step(x, v, g.sigmas[k], g.sigmas[k + 1], history, order, solver_type,
                                   PostWindow().max_order(k, steps))
        history = (*history[-1:], (m0, torch.log((1 - g.sigmas[k]) / g.sigmas[k])))
    return x


@pytest.mark.parametrize("order, solver_type, low, high", [(2, "midpoint", 3.0, 4.5), (2, "heun", 3.0, 4.5),
                                                        (3, "midpoint", 4.0, 8.0), (1, "midpoint", 1.8, 2.2)])
def test_dpm_solver_tail_converges_at_its_order(order, solver_type, low, high):
    """Halving the tail's steps divides the final error by about 2^order (32 .. 256 steps, where the error is in
    its asymptotic regime; order 3 is held to its second-order ends)."""
    torch.manual_seed(0)
    policy = GaussianFlowPolicy(torch.randn(1, 256) * 0.5, s0=0.5, shift=1.0)
    x0 = torch.randn(1, 256) * 0.8 + 0.1
    t0 = 0.7
    exact = _exact_ode(x0, t0, policy.means[:1], 0.5)
    errs = [float((_tail_error(policy, x0, t0, n, order, solver_type) - exact).pow(2).mean().sqrt())
            for n in (32, 64, 128, 256)]
    ratios = [errs[i] / errs[i + 1] for i in range(3)]
    assert all(low < r < high for r in ratios), (errs, ratios)


def test_flash_at_ratio_one_is_the_plain_grid_solved_by_dpm():
    """r -> 1: the tail has the rollout's own grid points, and its ODE part reaches the exact flow from the
    window's end to within the solver's error at that step count."""
    torch.manual_seed(1)
    m = torch.randn(1, 256) * 0.5
    policy = GaussianFlowPolicy(m, s0=0.5, shift=1.0)
    S = 40
    f = rollout(policy, ["a"], plan=Flat(1), kernel=FlowSDE(), schedule=Window(size=4, start=0), num_steps=S,
                post_window=PostWindow(ratio=1.0), seed=5)
    assert torch.allclose(f.grid.sigmas, policy.sampling_grid(S).sigmas, atol=1e-6)
    j = f.info["tail_from"]
    x_l, t_l = f.latents[j:j + 1], float(f.grid.sigmas[j])
    err = float((f.latents[f.leaves()] - _exact_ode(x_l, t_l, m, 0.5)).pow(2).mean().sqrt())
    euler = x_l.clone()
    for k in range(j, S):
        euler = euler + (f.grid.sigmas[k + 1] - f.grid.sigmas[k]) * policy.velocity(euler, f.grid.sigmas[k:k + 1], m)
    err_euler = float((euler - _exact_ode(x_l, t_l, m, 0.5)).pow(2).mean().sqrt())
    assert err < 5e-3 and err < err_euler / 3


# ------------------------------------------------------------------------------------------ training options


def test_balanced_reranging_alternates_signs():
    order = torch.arange(8)
    adv = torch.tensor([1.0, 2.0, -1.0, 0.0, 3.0, -2.0, 4.0, 5.0])
    assert balanced(order, adv).tolist() == [2, 0, 5, 1, 4, 6, 7, 3]
    n = 12
    units = Units.make(sample=torch.arange(n), prompt=torch.zeros(n, dtype=torch.long), group=torch.zeros(n),
                       tree=torch.arange(n), edge=torch.arange(n), step=torch.zeros(n, dtype=torch.long),
                       adv=torch.tensor([1.0] * 6 + [-1.0] * 6))
    for batches in micro_batches(units, 3, 4, 0, 0, 0, 0, rerange="balance"):
        signs = units.adv[torch.cat(batches)]
        assert bool((signs > 0).any()) and bool((signs < 0).any())  # every update sees both signs


def test_hybrid_sampling_switches_to_the_base_after_n_steps(tmp_path, capsys, one_thread):
    """In process (the CLI's main), so seven commands cost one interpreter start."""
    import numpy as np
    from PIL import Image

    from flowrl.cli import main

    run = tmp_path / "run"
    assert main(["train", str(CONFIGS / "tiny_smoke.yaml"), "--set", "run.iterations=1", "--set",
                 f"run.output_dir={run}", "--set", "run.progress=false", "--set", "eval.every=0", "--set",
                 "training.lr=0.05"]) == 0

    def sample(name, *extra):
        out = tmp_path / name
        assert main(["sample", "--model", "tiny:sd3", "--prompt", "a cat", "--steps", "4", "--max-sequence-length",
                     "16", "--out", str(out), *extra]) == 0
        return np.asarray(Image.open(out / "0000_00.png"), dtype=np.int16)

    lora = ["--lora", str(run / "lora")]
    base, full = sample("base"), sample("lora", *lora)
    assert np.abs(full - base).max() > 0
    assert np.array_equal(sample("mix4", *lora, "--mix-steps", "4"), full)
    assert np.array_equal(sample("mix0", *lora, "--mix-steps", "0"), base)
    mixed = sample("mix2", *lora, "--mix-steps", "2")
    assert np.abs(mixed - base).max() > 0 and np.abs(mixed - full).max() > 0
    capsys.readouterr()
    assert main(["sample", "--model", "tiny:sd3", "--prompt", "a", "--mix-steps", "2", "--out",
                 str(tmp_path / "x")]) != 0
    assert "--mix-steps 2: needs --lora" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ 4. recipes


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_recipes_validate_and_print_their_window_and_tail(name):
    family = "tiny:flux" if name.startswith("flux") else "tiny:sd3"  # the hub ids are not cached here
    cfg = load_config(CONFIGS / name, ["data.eval_prompts=null", "eval.every=0", f"model.path={family}"])
    validate(cfg)
    report = dry_run.report(cfg, 1)
    row = dry_run.iteration_costs(cfg, 0)
    G, P = 12, 32
    tail = {"flux_mixgrpo_multireward.yaml": 21, "sd3_mixgrpo_multireward.yaml": 21}.get(name)
    tail = tail if tail is not None else (7 if "flash_multi" in name else 3)
    assert row["rollout calls"] == P * G * (4 + tail) and row["grid steps"] == 4 + tail
    assert row["trained units"] == P * G * 4 and row["SDE window"] == "[0, 4)"
    assert "sliding window (progressive, size 4)" in report
    assert ("post-window tail" in report) == ("flash" in name)
    if "star" in name:
        assert "start (iterations) over the 300 iterations: 0 (0-299)" in report


TAIL = {"flux_mixgrpo_multireward.yaml": 21, "flux_mixgrpo_flash_multireward.yaml": 7,
        "flux_mixgrpo_flash_star_multireward.yaml": 3}


@pytest.mark.parametrize("name", PUBLISHED + TOY)
def test_each_recipe_trains_two_iterations_on_the_tiny_pipeline(name, tmp_path, monkeypatch, fresh_state,  # noqa: F811
                                                                 one_thread):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    cfg = load_config(CONFIGS / name, _tiny_sets(name, out) + ["training.kl_old_beta=0.01"])
    rows = _train_two(cfg, out)
    plan_row = dry_run.iteration_costs(cfg, 0)
    assert rows[0]["nfe/rollout_calls"] == plan_row["rollout calls"]
    assert rows[0]["sampling/steps"] == plan_row["grid steps"]
    assert rows[0]["nfe/trained_units"] == plan_row["trained units"]
    assert rows[0]["ratio_min"] == pytest.approx(1.0, abs=1e-5) and rows[0]["ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert rows[0]["kl_old"] == pytest.approx(0.0, abs=1e-9)  # at ratio 1 the pull toward the rollout is 0
    for r in rows:  # metrics.jsonl logs Flash's saving: 1 prompt x 12 samples x (4 window + tail) model calls
        tail = TAIL.get(name.replace("sd3_", "flux_"))
        if tail is not None:
            assert r["nfe/rollout_calls"] == 12 * (4 + tail) and (r["window/start"], r["window/end"]) == (0, 4)
