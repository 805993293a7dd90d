"""The method recipes (GCPO, GRPO-Guard, DanceGRPO) and the Flow-GRPO parity recipes, end to end on the tiny
models.

Each recipe keeps its method keys (kernel, schedule, step count, chunks, policy loss, step weights, KL form,
zero-advantage drop, window draw) and swaps only its model for the tiny one of its family, its reward for
brightness with one tied group per iteration, its prompts for the tiny list and its sizes for small ones. Two
iterations run in process; the test reads the rollout forest, the training units and the micro-batches the
objective was handed, and checks that the method did what the recipe says: which steps were SDE and which were
trained, whole chunks only and never split over micro-batches, RatioNorm with its recorded means, 1 / h_k
weights, flow_grpo's KL, the zero-advantage mask, shared initial noise. A second test pins each recipe's
published values, so an edit cannot drift from the sources its header cites.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState

from flowrl.core import KL_FORMS, POLICY_LOSSES
from flowrl.sampling.kernels import KERNELS
from flowrl.train import builders
from flowrl.train.config import Config, build_dataclass, load_config
from flowrl.train.trainer import Trainer
from rewards import Reward, register

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
G = 2  # images per prompt in the test runs
FLUX_DEV, SD35_M = "black-forest-labs/FLUX.1-dev", "stabilityai/stable-diffusion-3.5-medium"

# recipe -> the values its header cites (dotted key -> value), checked on the file as written
PUBLISHED = {
    "flux_gcpo_hpsv21.yaml": {
        "model.path": FLUX_DEV, "model.height": 720, "model.width": 720, "finetune.mode": "full",
        "sampling.num_steps": 17, "sampling.kernel": {"name": "flow_sde", "a": 0.7},
        "sampling.schedule": {"name": "window", "size": 16, "start": 0},
        "sampling.plan": {"name": "flat", "G": 12, "shared_noise": True}, "sampling.guidance_scale": 3.5,
        "training.chunks": {"name": "fixed", "sizes": [2, 3, 4, 7]}, "training.chunk_weighted": False,
        "training.timestep_fraction": 0.5, "training.clip_eps_low": 5e-5, "training.clip_eps_high": 5e-5,
        "training.lr": 1e-5, "training.weight_decay": 1e-4, "training.max_grad_norm": 0.01,
        "training.kl_beta": 0.0, "training.policy_loss": "clip", "training.updates_per_epoch": 2,
        "advantages.estimator": "grpo", "advantages.clip": 5.0, "advantages.eps": 1e-8,
        "data.prompts_per_iteration": 16, "rewards.components": {"hpsv21": 1.0}, "run.iterations": 150,
        "finetune.ema_decay": 0.0, "eval.num_steps": 50,
    },
    "sd3_gcpo_pickscore.yaml": {
        "model.path": SD35_M, "sampling.num_steps": 10, "sampling.kernel": {"name": "flow_sde", "a": 0.7},
        "sampling.schedule": {"name": "window", "size": 9, "start": 0}, "sampling.guidance_scale": 4.5,
        "sampling.plan": {"name": "flat", "G": 24, "shared_noise": False},
        "training.chunks": {"name": "fixed", "sizes": [1, 2, 2, 4]}, "training.timestep_fraction": 0.5,
        "training.clip_eps_low": 5e-5, "training.clip_eps_high": 5e-5, "training.lr": 3e-4,
        "training.kl_beta": 0.0, "training.kl": "flow_grpo", "training.drop_zero_advantage": True,
        "finetune.lora_rank": 32, "finetune.lora_alpha": 64, "advantages.estimator": "flow_grpo",
        "rewards.components": {"pickscore": 1.0},
    },
    "sd3_grpo_guard_geneval.yaml": {
        "model.path": SD35_M, "sampling.num_steps": 10, "sampling.kernel": {"name": "flow_sde", "a": 0.7},
        "sampling.schedule": {"name": "window", "size": 9, "start": 0}, "sampling.guidance_scale": 4.5,
        "training.policy_loss": "ratio_norm", "training.step_weights": "inverse_dt",
        "training.clip_eps_low": 2e-6, "training.clip_eps_high": 2e-6, "training.lr": 1e-4,
        "training.kl_beta": 0.0, "training.drop_zero_advantage": True, "finetune.mode": "lora",
        "finetune.lora_rank": 32, "finetune.lora_alpha": 64, "finetune.ema_decay": 0.987,
        "advantages.estimator": "grpo", "advantages.eps": 1e-4, "data.prompts_per_iteration": 24,
        "rewards.components": {"geneval": 1.0}, "eval.every": 60, "run.save_every": 60,
        "data.train_prompts": "../data/geneval/train_metadata.jsonl",
    },
    "flux_grpo_guard_pickscore.yaml": {
        "model.path": FLUX_DEV, "sampling.num_steps": 16, "sampling.kernel": {"name": "flow_sde_const", "eta": 0.3},
        "sampling.schedule": {"name": "window", "size": 15, "start": 0},
        "sampling.plan": {"name": "flat", "G": 12, "shared_noise": True}, "training.timestep_fraction": 0.6,
        "training.policy_loss": "ratio_norm", "training.step_weights": "inverse_dt",
        "training.clip_eps_low": 4e-6, "training.clip_eps_high": 4e-6, "training.lr": 2e-4,
        "training.kl_beta": 0.0, "finetune.mode": "lora", "finetune.lora_rank": 32, "finetune.lora_alpha": 64,
        "advantages.estimator": "grpo", "advantages.clip": 5.0, "rewards.components": {"pickscore": 1.0},
    },
    "flux_dancegrpo_hpsv21.yaml": {
        "model.path": FLUX_DEV, "model.height": 720, "model.width": 720, "finetune.mode": "full",
        "sampling.num_steps": 16, "sampling.kernel": {"name": "flow_sde_const", "eta": 0.3},
        "sampling.schedule": {"name": "window", "size": 15, "start": 0},
        "sampling.plan": {"name": "flat", "G": 12, "shared_noise": True}, "training.timestep_fraction": 0.6,
        "training.lr": 1e-5, "training.clip_eps_low": 1e-4, "training.max_grad_norm": 1.0,
        "training.weight_decay": 1e-4, "training.kl_beta": 0.0, "training.policy_loss": "clip",
        "training.updates_per_epoch": 3, "advantages.estimator": "grpo", "advantages.clip": 5.0,
        "advantages.eps": 1e-8, "data.prompts_per_iteration": 16, "rewards.components": {"hpsv21": 1.0},
        "run.iterations": 300, "run.save_every": 40,
    },
    "sd3_dancegrpo_hpsv21.yaml": {
        "model.path": SD35_M, "finetune.mode": "full", "sampling.num_steps": 16, "sampling.guidance_scale": 4.5,
        "sampling.kernel": {"name": "flow_sde_const", "eta": 0.3},
        "sampling.schedule": {"name": "window", "size": 15, "start": 0},
        "sampling.plan": {"name": "flat", "G": 12, "shared_noise": True}, "training.timestep_fraction": 0.6,
        "training.lr": 1e-5, "training.clip_eps_low": 1e-4, "training.max_grad_norm": 1.0,
        "training.kl_beta": 0.0, "advantages.estimator": "grpo", "advantages.eps": 1e-8,
        "rewards.components": {"hpsv21": 1.0},
    },
    "sd3_flowgrpo_pickscore.yaml": {
        "sampling.kernel": {"name": "flow_sde", "a": 0.7},
        "sampling.schedule": {"name": "window", "size": 9, "start": 0}, "training.kl": "flow_grpo",
        "training.kl_beta": 0.01, "training.drop_zero_advantage": True,
        "training.cfg_detach_uncond": False, "training.clip_eps_low": 1e-4, "training.lr": 3e-4,
        "advantages.estimator": "flow_grpo",
    },
    "sd3_flowgrpo_geneval.yaml": {
        "training.kl": "flow_grpo", "training.kl_beta": 0.04, "training.drop_zero_advantage": True,
        "training.cfg_detach_uncond": False, "training.clip_eps_low": 1e-4,
    },
    "sd3_flowgrpo_ocr.yaml": {
        "training.kl": "flow_grpo", "training.kl_beta": 0.04, "training.drop_zero_advantage": True,
        "training.cfg_detach_uncond": False, "training.clip_eps_low": 1e-4,
    },
    "sd3_flowgrpo_fast_pickscore.yaml": {
        "sampling.kernel": {"name": "flow_sde", "a": 0.8},
        "sampling.schedule": {"name": "window", "size": 2, "start": [0, 8], "draw": "batch"},
        "training.kl_beta": 0.0, "training.drop_zero_advantage": True, "training.clip_eps_low": 1e-5,
    },
    "flux_flowgrpo_pickscore.yaml": {
        "sampling.num_steps": 6, "sampling.kernel": {"name": "flow_sde", "a": 0.9},
        "sampling.schedule": {"name": "window", "size": 5, "start": 0}, "training.kl": "flow_grpo",
        "training.kl_beta": 0.0, "training.drop_zero_advantage": False,  # flow_grpo's FLUX trainer keeps them
    },
}

# runs: (recipe, extra overrides); the GCPO variant its header names is one --set
RUNS = [(name, []) for name in PUBLISHED] + [("flux_gcpo_hpsv21.yaml", ["training.chunk_weighted=true"])]


@register("test_tied_brightness")
class TiedBrightness(Reward):
    """Mean brightness, except that every image of the batch's first prompt scores 0.5: one group per iteration
    whose images all tie, so its advantages are exactly 0 (what drop_zero_advantage acts on)."""

    def score(self, images, prompts, metadata):
        out = images.float().mean(dim=(1, 2, 3))
        out[[i for i, p in enumerate(prompts) if p == prompts[0]]] = 0.5
        return out


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _raw(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def _family(name: str) -> str:
    return "flux" if "flux" in _raw(name)["model"]["path"].lower() else "sd3"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_values(name):
    """The file says what its header cites (the schema alone; the full validation is tests/test_configs.py)."""
    cfg = build_dataclass(Config, _raw(name))
    for key, expected in PUBLISHED[name].items():
        got = _get(cfg, key)
        if isinstance(expected, float):
            assert got == pytest.approx(expected, rel=1e-12), (name, key, got)
        else:
            assert got == expected, (name, key, got)


def _overrides(name: str, out: Path) -> list[str]:
    raw = _raw(name)
    shared = bool(raw["sampling"]["plan"].get("shared_noise", False))
    return [f"model.path=tiny:{_family(name)}", f"run.output_dir={out}", "run.iterations=2", "run.save_every=0",
            "run.progress=false", "data.prompts_per_iteration=2",
            f"sampling.plan={{name: flat, G: {G}, shared_noise: {str(shared).lower()}}}",
            "model.height=32", "model.width=32", "model.max_sequence_length=32", "eval.every=0",
            "rewards.components=test_tied_brightness:1.0", "rewards.kwargs={}",
            "data.train_prompts=flowrl/data/prompts/tiny_train.txt", "data.eval_prompts=null"]


def _spy(trainer: Trainer) -> list[dict]:
    """Per iteration: the forest, the units and the micro-batches the objective was given."""
    obj, seen = trainer.objective, []
    units_fn, loss_fn = obj.units, obj.loss

    def units(forest, leaf_adv, leaf_group, it, *rest):
        u = units_fn(forest, leaf_adv, leaf_group, it, *rest)
        seen.append({"it": it, "forest": forest, "units": u, "mbs": []})
        return u

    def loss(forest, u, mb):
        seen[-1]["mbs"].append(mb.clone())
        return loss_fn(forest, u, mb)

    obj.units, obj.loss = units, loss
    return seen


def _layout(sizes, n):
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))[:n]


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """The recipes' mixed precision differs from other in-process runs', and accelerate keeps one state per
    process: start and leave each test with none."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("name, extra", RUNS, ids=lambda v: v if isinstance(v, str) else "+".join(v) or "as-is")
def test_two_iterations_run_the_method(name, extra, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    cfg = load_config(CONFIGS / name, _overrides(name, out) + extra)
    t, s = cfg.training, cfg.sampling
    trainer = Trainer(cfg)
    seen = _spy(trainer)
    trainer.train()

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    for r in rows:
        assert "skipped" not in r, r
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]), r
    assert len(seen) == 2
    assert all(r["adv/zero_groups"] == 1 for r in rows)  # the tied group
    if t.updates_per_epoch == 1 and t.inner_epochs == 1:  # the only update of iteration 0 is on-policy
        assert rows[0]["ratio_min"] == pytest.approx(1.0, abs=1e-5)
        assert rows[0]["ratio_max"] == pytest.approx(1.0, abs=1e-5)
    steps = next(iter(trainer.optimizer.state.values()))["step"]
    assert int(steps) == 2 * t.inner_epochs * t.updates_per_epoch  # optimizer steps over both iterations

    kernel_spec = dict(s.kernel)
    kernel_cls = KERNELS[kernel_spec.pop("name")]
    chunk_sizes = t.chunks["sizes"] if t.chunks else None
    for rec in seen:
        forest, u, it = rec["forest"], rec["units"], rec["it"]
        # the kernel the recipe names, with its parameters
        assert type(forest.kernel) is kernel_cls
        assert all(getattr(forest.kernel, k) == v for k, v in kernel_spec.items())
        # SDE exactly where the schedule says (for this iteration's window draw); only SDE steps trained
        scales = builders.make_schedule(s.schedule, cfg.run.seed, 0).noise_scales(s.num_steps, it)
        assert torch.equal(forest.sde, scales[forest.edge_step] > 0)
        assert bool((scales[u.step] > 0).all())
        sde_steps = torch.nonzero(scales > 0).flatten()
        # initial noise shared within a prompt's group or not, as the plan says
        roots = torch.nonzero(forest.parent_edge == -1).flatten()
        for p in forest.node_prompt[roots].unique().tolist():
            r = roots[forest.node_prompt[roots] == p]
            same = all(torch.equal(forest.latents[r[0]], forest.latents[j]) for j in r[1:])
            assert same == bool(s.plan.get("shared_noise", False))
        # how many steps, or which chunks, each trajectory trains
        for tree in forest.node_tree[roots].tolist():
            own = u.tree == tree
            trained = u.step[own].sort().values
            if chunk_sizes is None:
                assert len(trained) == math.ceil(t.timestep_fraction * len(sde_steps))
                continue
            layout = _layout(chunk_sizes, len(sde_steps))  # chunk of each SDE step, from the high-noise end
            picked = layout[torch.searchsorted(sde_steps, trained)].unique()
            assert len(picked) == math.ceil(t.timestep_fraction * len(chunk_sizes))
            assert torch.equal(trained, sde_steps[torch.isin(layout, picked)])  # whole chunks only
            for c in u.chunk[own].unique():  # one unit chunk id = one layout chunk of this trajectory
                members = u.step[u.chunk == c]
                assert len(layout[torch.searchsorted(sde_steps, members)].unique()) == 1
                assert len(members) == chunk_sizes[int(layout[torch.searchsorted(sde_steps, members[:1])])]
        if chunk_sizes is not None:  # a micro-batch never splits a chunk
            for mb in rec["mbs"]:
                for c in u.chunk[mb].unique():
                    assert set(torch.nonzero(u.chunk == c).flatten().tolist()) <= set(mb.tolist())
        # per-step loss weights
        if t.step_weights == "inverse_dt":
            h = forest.grid.sigmas[u.step] - forest.grid.sigmas[u.step + 1]
            assert torch.allclose(u.weight.float(), (1.0 / h).float().cpu(), rtol=1e-5)
            assert float(u.weight.min()) > 1.0  # every step is shorter than the whole path
        else:
            assert bool((u.weight == 1).all())
        # zero-advantage samples out of the loss, or all kept
        tied = u.adv == 0
        assert bool(tied.any()) and bool((~tied).any())
        assert torch.equal(u.keep.float(), (~tied).float() if t.drop_zero_advantage else torch.ones(len(u)))

    # RatioNorm: the rollout recorded the kernel means its log-ratio needs
    assert trainer.objective.policy_loss is POLICY_LOSSES[t.policy_loss]
    if t.policy_loss == "ratio_norm":
        assert all(rec["forest"].mean is not None for rec in seen)
    # the KL form the recipe names, active when beta > 0
    if t.kl_beta > 0:
        assert trainer.objective.kl is KL_FORMS[t.kl]
        assert all(math.isfinite(r["kl"]) and r["kl"] >= 0 for r in rows)
    else:
        assert trainer.objective.kl is None and all("kl" not in r for r in rows)
