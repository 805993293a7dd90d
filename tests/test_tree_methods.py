"""The tree methods (BranchGRPO, TreeGRPO, TempFlow-GRPO): their published counts read from real forests and
from the dry run, their advantages against hand computations, exact log-probs on trees, end-to-end training,
exact resume with a moving depth-pruning window, and 1 process == 2 processes."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from flowrl.core.tree_credit import backprop_advantages, depth_advantages, fuse_leaf_values
from flowrl.sampling import FlowSDE, SplitAt, TrunkBranches, WindowTree, rollout, score_edges
from flowrl.sampling.analytic import GaussianFlowPolicy
from flowrl.train import credit, dry_run, grouping, pruning
from flowrl.train.config import load_config
from flowrl.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
TOY = ["toy_branchgrpo.yaml", "toy_treegrpo.yaml", "toy_tempflow.yaml"]
PUBLISHED = ["flux_branchgrpo_hpsv21.yaml", "flux_branchgrpo_widpru_hpsv21.yaml",
             "flux_branchgrpo_deppru_hpsv21.yaml", "flux_branchgrpo_mix_hpsv21.yaml", "sd3_treegrpo_hpsv21.yaml",
             "sd3_treegrpo_hps_clip.yaml", "sd3_tempflow_pickscore.yaml", "sd3_tempflow_geneval.yaml"]


def _policy(prompts=2, dim=4):
    return GaussianFlowPolicy(torch.linspace(-1, 1, prompts * dim).reshape(prompts, dim), s0=0.5)


def _branching_nodes(forest) -> torch.Tensor:
    """Per tree, the nodes with more than one child."""
    children = torch.bincount(forest.src, minlength=forest.num_nodes)
    return torch.bincount(forest.node_tree[children > 1], minlength=forest.num_trees)


def _recipe(name, *sets):
    return load_config(CONFIGS / name, ["data.eval_prompts=null", "eval.every=0", *sets])


# ------------------------------------------------------------------------------------------ 1. counts


def test_branchgrpo_counts_from_the_forest_the_plan_and_the_dry_run():
    plan = SplitAt(steps=(0, 3, 6, 9), K=2, correlation=4.0)
    forest = rollout(_policy(3), ["a", "b", "c"], plan=plan, kernel=FlowSDE(), num_steps=20)
    assert forest.per_tree("nfe").tolist() == [203] * 3
    assert forest.per_tree("edges").tolist() == [218] * 3
    assert forest.per_tree("leaves").tolist() == [16] * 3
    c = plan.cost(20)
    assert (c.nfe, c.edges, c.leaves) == (203, 218, 16)
    spec = pruning.check({"width": {"mode": "parent_top", "ratio": 0.5}}, plan.split_steps(20))
    edge_adv = torch.randn(forest.num_edges)
    kept = pruning.prune(forest, forest.trainable_edges(), edge_adv, spec, 0, 10)
    assert torch.bincount(forest.node_tree[forest.src[kept]]).tolist() == [138] * 3
    # the dry run of the BranchGRPO recipes reads the same numbers (per prompt: the recipes have one tree each)
    for name, trained in (("flux_branchgrpo_hpsv21.yaml", 218), ("flux_branchgrpo_widpru_hpsv21.yaml", 138),
                          ("flux_branchgrpo_deppru_hpsv21.yaml", 138)):
        cfg = _recipe(name, "data.prompts_per_iteration=2", "model.path=tiny:flux")
        row = dry_run.iteration_costs(cfg, 0)
        assert (row["rollout calls"], row["edges"], row["leaves"], row["trained units"]) == (
            2 * 203, 2 * 218, 2 * 16, 2 * trained), name


@pytest.mark.parametrize("w,k", [(4, 2), (3, 3), (2, 4)])
def test_treegrpo_counts(w, k):
    plan = WindowTree(w=w, k=k, start="geometric", r=0.5)
    for it in range(4):
        forest = rollout(_policy(2), ["a", "b"], plan=plan, kernel=FlowSDE(), num_steps=10, iteration=it)
        i = plan.window_start(10, it)
        assert forest.per_tree("leaves").tolist() == [k ** w] * 2
        assert _branching_nodes(forest).tolist() == [(k ** w - 1) // (k - 1)] * 2
        sde_steps = sorted(set(forest.edge_step[forest.sde].tolist()))
        assert sde_steps == list(range(i, i + w))  # ODE before and after the window
        nfe = i + sum(k ** j for j in range(w)) + k ** w * (10 - i - w)
        assert forest.per_tree("nfe").tolist() == [nfe] * 2 == [plan.cost(10, it).nfe] * 2
        assert plan.cost(10, it).branching_nodes == (k ** w - 1) // (k - 1)


def test_treegrpo_dry_run_counts():
    cfg = _recipe("sd3_treegrpo_hpsv21.yaml", "data.prompts_per_iteration=2", "model.path=tiny:sd3")
    plan = WindowTree(w=3, k=3, start="geometric", r=0.5, seed=cfg.run.seed)  # the run seed draws the windows
    for it in range(3):
        row = dry_run.iteration_costs(cfg, it)
        assert row["leaves"] == 2 * 27 and row["trained units"] == 2 * (3 + 9 + 27)
        assert row["rollout calls"] == 2 * plan.cost(10, it).nfe
        assert row["train forward"] == 2 * 13 * 2  # one call per branching node for its 3 children, CFG pair
    assert "13 branching node(s)" in dry_run.report(cfg, 1)


def test_treegrpo_window_start_follows_the_truncated_geometric_law():
    plan = WindowTree(w=3, k=2, r=0.5)
    p = plan.start_probabilities(10)
    assert len(p) == 7 and float(p.sum()) == pytest.approx(1.0)
    assert torch.allclose(p[1:] / p[:-1], torch.full((6,), 0.5, dtype=torch.float64))
    draws = torch.tensor([plan.window_start(10, it) for it in range(4000)])
    freq = torch.bincount(draws, minlength=7).double() / len(draws)
    assert torch.allclose(freq, p, atol=0.025)
    shift = WindowTree(w=3, k=2, start="shift", shift=2, tau=3)
    assert [shift.window_start(10, it) for it in range(0, 15, 3)] == [0, 2, 4, 6, 1]


def test_tempflow_counts_per_seed():
    plan = TrunkBranches(K=6, seeds=4)
    forest = rollout(_policy(1), ["a"], plan=plan, kernel=FlowSDE(), num_steps=10)
    per_seed = 9 + 6 * sum(10 - 1 - k for k in range(9))  # trunk + completions = 279
    assert forest.per_tree("nfe").tolist() == [per_seed] * 4 == [plan.evaluations(10)] * 4
    assert forest.per_tree("leaves").tolist() == [54] * 4
    assert int(forest.sde.sum()) == 4 * 54 and bool((forest.trainable == forest.sde).all())
    # each leaf has exactly one stochastic step, 6 leaves per (seed, step)
    steps = grouping.branch_steps(forest)
    assert torch.bincount(steps).tolist() == [24] * 9
    cfg = _recipe("sd3_tempflow_pickscore.yaml", "data.prompts_per_iteration=1", "model.path=tiny:sd3")
    row = dry_run.iteration_costs(cfg, 0)
    assert (row["rollout calls"], row["leaves"], row["trained units"]) == (4 * 279, 4 * 54, 4 * 54)
    assert row["train forward"] == 4 * 9 * 2  # one call per trunk parent for its 6 children, CFG pair


# ------------------------------------------------------------------------------------------ 2. advantages


def _two_level(rewards, logp=None):
    """root -> 2 children (step 0) -> 2 each (step 1) -> one more step each (step 2): 4 leaves."""
    forest = rollout(_policy(1), ["a"], plan=SplitAt(steps=(0, 1), K=2), kernel=FlowSDE(), num_steps=3)
    if logp is not None:
        forest.logp_old = logp
    return forest, torch.tensor(rewards, dtype=torch.float64)


def test_branchgrpo_node_values_and_depth_advantages_by_hand():
    forest, r = _two_level([1.0, 2.0, 3.0, 5.0])
    leaves = forest.leaves()
    values = fuse_leaf_values(forest.src, forest.dst, forest.logp_old, forest.num_nodes, leaves, r)
    by_step = {k: values[forest.node_step == k].tolist() for k in range(4)}
    assert by_step[0] == [2.75] and by_step[1] == [1.5, 4.0]
    assert by_step[2] == by_step[3] == [1.0, 2.0, 3.0, 5.0]
    adv = depth_advantages(values, forest.node_tree, forest.node_step)
    assert float(adv[forest.node_step == 0]) == 0.0  # a depth with one node
    sd1 = math.sqrt(2 * 1.25 ** 2)  # sample std of [1.5, 4]
    assert adv[forest.node_step == 1].tolist() == pytest.approx([-1.25 / sd1, 1.25 / sd1])
    sd2 = math.sqrt((1.75 ** 2 + 0.75 ** 2 + 0.25 ** 2 + 2.25 ** 2) / 3)
    expected = [(x - 2.75) / sd2 for x in (1, 2, 3, 5)]
    assert adv[forest.node_step == 2].tolist() == pytest.approx(expected)
    # edges inherit their child's advantage
    edge_adv = credit.depth(forest, r.float(), r)
    assert torch.allclose(edge_adv.double(), adv[forest.dst].double(), atol=1e-6)
    # no spread at a depth: 0
    flat, _ = _two_level([2.0, 2.0, 2.0, 2.0])
    same = credit.depth(flat, torch.zeros(4), torch.full((4,), 2.0))
    assert bool((same == 0).all())


def test_branchgrpo_path_probability_fusion_by_hand():
    forest, r = _two_level([1.0, 2.0, 3.0, 5.0])
    leaves = forest.leaves()
    beta = 2.0
    values = fuse_leaf_values(forest.src, forest.dst, forest.logp_old, forest.num_nodes, leaves, r, beta)
    # root: softmax over the leaves of beta * (sum of the log-probs on their paths)
    paths = torch.tensor([sum(float(forest.logp_old[e]) for e in forest.path_edges(int(leaf))) for leaf in leaves])
    w = torch.softmax(beta * paths.double(), 0)
    assert float(values[0]) == pytest.approx(float((w * r).sum()))
    # a step-1 node: the same over its own two leaves (its shared prefix cancels)
    w2 = torch.softmax(beta * paths[:2].double(), 0)
    first = int(forest.node_step.eq(1).nonzero()[0])
    assert float(values[first]) == pytest.approx(float((w2 * r[:2]).sum()))


def test_branchgrpo_pruned_edge_sets_by_hand():
    forest = rollout(_policy(1), ["a"], plan=SplitAt(steps=(0, 1), K=2), kernel=FlowSDE(), num_steps=4)
    r = torch.tensor([1.0, 4.0, 2.0, 3.0])
    edge_adv = credit.depth(forest, r, r)
    edges = forest.trainable_edges()
    post = edges[forest.edge_step[edges] > 1]  # 4 branches x steps 2, 3
    splits = [0, 1]
    top = pruning.prune(forest, edges, edge_adv, pruning.check({"width": {"mode": "parent_top"}}, splits), 0, 1)
    # each branch's chain has equal advantages: the earlier step (2) is kept
    assert sorted(forest.edge_step[top].tolist()) == [0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    ext = pruning.prune(forest, edges, edge_adv, pruning.check({"width": {"mode": "extreme"}}, splits), 0, 1)
    kept_post = ext[forest.edge_step[ext] > 1]
    leaf_of = credit.single_leaf(forest)[forest.dst[kept_post]]
    assert sorted(r[leaf_of].tolist()) == [1.0, 1.0, 4.0, 4.0]  # best 2 and worst 2 edges of the 8
    depth = pruning.check({"depth": {"depths": [3, 4], "interval": 1, "stop": 2}}, splits)
    assert [pruning.active_depths(depth["depth"], it) for it in range(3)] == [[3, 4], [2, 3], [2, 3]]
    d0 = pruning.prune(forest, edges, edge_adv, depth, 0, 10)
    assert sorted(set(forest.edge_step[d0].tolist())) == [0, 1]  # children at depths 3, 4 dropped
    assert len(post) == 8


def test_treegrpo_backprop_by_hand():
    forest, _ = _two_level([0.0] * 4)
    leaves = forest.leaves()
    leaf_adv = torch.tensor([1.0, -1.0, 2.0, 0.5], dtype=torch.float64)
    # equal old log-probs: the plain mean of the children
    equal = torch.zeros(forest.num_edges)
    adv = backprop_advantages(forest.src, forest.dst, equal, forest.num_nodes, leaves, leaf_adv)
    s1 = forest.node_step == 1
    assert adv[s1].tolist() == pytest.approx([0.0, 1.25])
    assert float(adv[0]) == pytest.approx(0.625)
    # unequal: softmax weights of the children's log-probs, summing to 1 per node
    logp = torch.linspace(-0.3, 0.4, forest.num_edges)
    adv = backprop_advantages(forest.src, forest.dst, logp, forest.num_nodes, leaves, leaf_adv, beta=3.0)
    node = int(s1.nonzero()[0])
    kids = torch.nonzero(forest.src == node).flatten()
    w = torch.softmax(3.0 * logp[kids].double(), 0)
    assert float(w.sum()) == pytest.approx(1.0)
    assert float(adv[node]) == pytest.approx(float((w * adv[forest.dst[kids]]).sum()))


def test_tempflow_noise_aware_weights_are_the_grid_closed_form(tmp_path):
    cfg = _recipe("toy_tempflow.yaml", f"run.output_dir={tmp_path / 'r'}", "data.prompts_per_iteration=1")
    AcceleratorState._reset_state(reset_partial_state=True)
    trainer = Trainer(cfg)
    forest = trainer._rollout(["a red circle"], [0], 0)
    leaves = forest.leaves()
    units = trainer.objective.units(forest, torch.randn(len(leaves)), torch.zeros(len(leaves), dtype=torch.long),
                                    0, torch.zeros(len(leaves)))
    sig = forest.grid.sigmas.double()
    a = cfg.sampling.kernel["a"]
    steps = list(cfg.sampling.plan["steps"])
    s = []
    for k in steps:  # the kernel std g_k sqrt(h_k), g_k = a sqrt(sigma_k / (1 - sigma_k)); at sigma = 1 the
        denom = 1 - (sig[k] if sig[k] < 1 else sig[1])  # denominator takes the next grid point
        s.append(a * math.sqrt(sig[k] / denom) * math.sqrt(sig[k] - sig[k + 1]))
    s = torch.tensor(s)
    expected = s / s.mean()
    for tree in units.tree.unique().tolist():
        own = units.tree == tree
        assert float(units.weight[own].mean()) == pytest.approx(1.0, abs=1e-6)
        for k, w in zip(steps, expected.tolist()):
            assert units.weight[own & (units.step == k)].tolist() == pytest.approx([w] * 4, rel=1e-5)
    AcceleratorState._reset_state(reset_partial_state=True)


# ------------------------------------------------------------------------------------------ 3. exact log-probs


@pytest.mark.parametrize("plan", [SplitAt(steps=(0, 2), K=2, correlation=4.0), WindowTree(w=2, k=3, start=1),
                                  TrunkBranches(K=3, seeds=2, steps=(0, 2, 3))], ids=["branch", "tree", "tempflow"])
@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_every_trained_edge_rescores_to_ratio_one(plan, guidance, one_thread):
    from flowrl.models import load_policy

    policy = load_policy("tiny:sd3")
    forest = rollout(policy, ["a cat", "a dog"], plan=plan, kernel=FlowSDE(a=0.7), num_steps=5,
                     guidance_scale=guidance, height=32, width=32)
    edges = forest.trainable_edges()
    with torch.no_grad():
        logp, _, _ = score_edges(policy, forest, edges)
    ratio = torch.exp(logp.cpu() - forest.logp_old[edges])
    assert float((ratio - 1).abs().max()) <= 1e-6


# ------------------------------------------------------------------------------------------ 4. end to end


@pytest.fixture
def fresh_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _tiny_sets(name: str, out: Path) -> list[str]:
    family = "flux" if name.startswith("flux") else "sd3"
    return [f"model.path=tiny:{family}", f"run.output_dir={out}", "run.iterations=2", "run.save_every=0",
            "run.progress=false", "data.prompts_per_iteration=1", "model.height=32", "model.width=32",
            "model.max_sequence_length=32", "eval.every=0", "rewards.components=brightness:1.0",
            "rewards.kwargs={}", "rewards.combine=sum_then_normalize",
            "data.train_prompts=flowrl/data/prompts/tiny_train.txt", "data.eval_prompts=null", "data.balance_key=null",
            "run.mixed_precision=\"no\"", "model.dtype=float32", "finetune.mode=lora", "finetune.lora_rank=4",
            "finetune.lora_target_modules=null", "finetune.ema_decay=0.0", "finetune.gradient_checkpointing=false",
            "sampling.max_batch=null", "training.micro_batch_size=64", "training.updates_per_epoch=1"]


def _train_two(cfg, out: Path) -> list[dict]:
    trainer = Trainer(cfg)
    trainer.train()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    for r in rows:
        assert "skipped" not in r and math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]), r
        assert r["nfe/trained_units"] > 0 and r["nfe/train_forward"] > 0
    return rows


@pytest.mark.parametrize("name", PUBLISHED + TOY)
def test_each_recipe_trains_two_iterations_on_the_tiny_pipeline(name, tmp_path, monkeypatch, fresh_state,
                                                                 one_thread):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    cfg = load_config(CONFIGS / name, _tiny_sets(name, out))
    rows = _train_two(cfg, out)
    plan_row = dry_run.iteration_costs(cfg, 0)  # the dry run predicts the run's counts
    assert rows[0]["nfe/rollout_calls"] == plan_row["rollout calls"]
    assert rows[0]["nfe/trained_units"] == plan_row["trained units"]
    assert rows[0]["nfe/train_forward"] == plan_row["train forward"]
    assert rows[0]["ratio_min"] == pytest.approx(1.0, abs=1e-5) and rows[0]["ratio_max"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("name", TOY)
def test_each_shapes_world_recipe_trains_two_iterations(name, tmp_path, monkeypatch, fresh_state, one_thread):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    cfg = load_config(CONFIGS / name, [f"run.output_dir={out}", "run.iterations=2", "run.progress=false",
                                       "eval.every=0", "data.prompts_per_iteration=2"])
    _train_two(cfg, out)


RESUME_SETS = ["run.progress=false", "data.prompts_per_iteration=1", "sampling.num_steps=6",
               "sampling.schedule={name: constant}",
               "sampling.plan={name: split_at, steps: [0, 2], K: 2, correlation: 4.0}",
               "training.prune={depth: {depths: [5, 6], interval: 1, stop: 3}, width: {mode: extreme}}",
               "advantages.credit={name: depth, fusion: path, beta: 1.0}", "run.save_every=2", "eval.every=0",
               "finetune.lora_rank=4", "training.updates_per_epoch=2"]


def _cli_train(out: Path, iterations: int, *extra) -> subprocess.CompletedProcess:
    sets = [a for s in RESUME_SETS + [f"run.output_dir={out}", f"run.iterations={iterations}"] for a in ("--set", s)]
    return subprocess.run([sys.executable, "-m", "flowrl.cli", "train", str(CONFIGS / "tiny_smoke.yaml"), *sets,
                           *extra], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def test_tree_run_resumes_bit_for_bit_across_a_moving_pruning_window(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _cli_train(straight, 4).returncode == 0
    first = _cli_train(split, 2)
    assert first.returncode == 0, first.stderr[-3000:]
    second = _cli_train(split, 4, "--resume", "latest")
    assert second.returncode == 0, second.stderr[-3000:]
    rows = [[{k: v for k, v in json.loads(x).items() if not k.startswith("time/")}
             for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (straight, split)]
    assert rows[0] == rows[1]
    # the window moved: depths {5, 6} at iteration 0, {4, 5} at 1, {3, 4} from 2 on
    assert len({r["nfe/trained_units"] for r in rows[0]}) > 1
    w1 = load_file(straight / "lora" / "pytorch_lora_weights.safetensors")
    w2 = load_file(split / "lora" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


# ------------------------------------------------------------------------------------------ 5. processes


def test_tree_recipe_on_two_processes_matches_one(tmp_path):
    from test_train import _two_processes  # the launcher command (gloo, a free port)

    sets = ["run.progress=false", "run.iterations=2", "run.dump_advantages=true", "eval.every=0",
            "data.prompts_per_iteration=2", "sampling.num_steps=4",
            "sampling.plan={name: trunk_branches, K: 3, seeds: 2, steps: [0, 1, 2]}",
            "sampling.schedule={name: constant}", "advantages.group=seed_step", "advantages.estimator=grpo",
            "training.step_weights=noise_aware", "finetune.lora_rank=4"]
    args = lambda out: ["train", str(CONFIGS / "tiny_smoke.yaml"),  # noqa: E731
                        *[a for s in sets + [f"run.output_dir={out}"] for a in ("--set", s)]]
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = subprocess.run([sys.executable, "-m", "flowrl.cli", *args(one)], cwd=ROOT, env=ENV, capture_output=True,
                        text=True, timeout=600)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = subprocess.run(_two_processes() + args(two), cwd=ROOT, env=ENV, capture_output=True, text=True,
                        timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    a1 = [json.loads(x) for x in (one / "advantages.jsonl").read_text().splitlines()]
    a2 = [json.loads(x) for x in (two / "advantages.jsonl").read_text().splitlines()]
    assert [(a["iteration"], a["slot"]) for a in a1] == [(a["iteration"], a["slot"]) for a in a2]
    assert [json.loads(x)["world_size"] for x in (two / "metrics.jsonl").read_text().splitlines()] == [2, 2]
    for it in (0, 1):
        adv1 = torch.tensor([a["advantage"] for a in a1 if a["iteration"] == it])
        adv2 = torch.tensor([a["advantage"] for a in a2 if a["iteration"] == it])
        # groups of 3 children of one (prompt, seed, step): equal up to the network's batch-shape rounding
        assert torch.allclose(adv1, adv2, atol=1e-3), float((adv1 - adv2).abs().max())
        assert float(adv1.abs().max()) > 0.5
