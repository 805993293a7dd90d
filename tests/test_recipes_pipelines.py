"""The recipes of the newer pipelines (Wan video, Qwen-Image, FLUX Kontext and Qwen-Image-Edit editing, DDPO-style
SD 1.5 / SDXL), end to end on their tiny pipelines: each keeps the values its header cites, validates offline,
and trains two iterations with its own kernel, schedule, plan shape and advantage settings; only the model (the
tiny one of its family), sizes, group counts, prompts and rewards are swapped. The video recipe's reward is
frame-wise: the stand-in image reward must see every frame of every clip, and the edit recipes' rows carry
their input images."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState

from flowrl.train.config import Config, build_dataclass, load_config
from flowrl.train.trainer import Trainer
from rewards import Reward, register

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# recipe -> (tiny family, the values its header cites)
PUBLISHED = {
    "wan_flowgrpo_ocr.yaml": ("wan", {
        "model.path": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "model.num_frames": 33, "model.height": 240,
        "model.width": 416, "sampling.num_steps": 20, "sampling.guidance_scale": 4.5, "sampling.plan.G": 4,
        "sampling.schedule": {"name": "window", "size": 19, "start": 0}, "advantages.estimator": "grpo",
        "training.lr": 1e-4, "training.clip_eps_low": 1e-3, "training.kl_beta": 0.004, "eval.num_steps": 50,
        "rewards.kwargs": {"ocr": {"frame_stride": 4}}}),
    "flux_kontext_flowgrpo_counting.yaml": ("flux_kontext", {
        "model.path": "black-forest-labs/FLUX.1-Kontext-dev", "sampling.num_steps": 6,
        "sampling.guidance_scale": 2.5, "sampling.kernel": {"name": "flow_sde", "a": 0.9}, "sampling.plan.G": 21,
        "rewards.components": {"image_similarity": 0.5, "geneval": 0.5}, "training.kl_beta": 0.0,
        "advantages.estimator": "flow_grpo"}),
    "sd15_ddpo_aesthetic.yaml": ("sd", {
        "sampling.num_steps": 50, "sampling.kernel": {"name": "ddim", "eta": 1.0}, "sampling.guidance_scale": 5.0,
        "training.lr": 3e-4, "training.clip_eps_low": 1e-4, "training.updates_per_epoch": 2,
        "advantages.per_prompt_tracker": True, "finetune.lora_rank": 4, "rewards.components": {"aesthetic": 1.0}}),
    "sdxl_ddpo_imagereward.yaml": ("sdxl", {
        "model.path": "stabilityai/stable-diffusion-xl-base-1.0", "sampling.num_steps": 50,
        "sampling.kernel": {"name": "ddim", "eta": 1.0}, "training.updates_per_epoch": 2,
        "rewards.components": {"imagereward": 1.0}}),
    "qwen_image_flowgrpo_pickscore.yaml": ("qwen_image", {
        "model.path": "Qwen/Qwen-Image", "sampling.num_steps": 10, "sampling.guidance_scale": 4.0,
        "sampling.negative_prompt": " ", "sampling.kernel": {"name": "flow_sde", "a": 1.2},
        "sampling.schedule": {"name": "window", "size": 2, "start": [0, 3], "draw": "batch"},
        "sampling.plan.G": 16, "data.prompts_per_iteration": 16, "advantages.estimator": "flow_grpo",
        "training.kl_beta": 0.0, "finetune.ema_decay": 0.0, "finetune.lora_rank": 64,
        "finetune.gradient_checkpointing": True, "eval.num_steps": 50, "rewards.components": {"pickscore": 1.0}}),
    "qwen_image_edit_flowgrpo_counting.yaml": ("qwen_image_edit", {
        "model.path": "Qwen/Qwen-Image-Edit", "model.image_area": 512 * 512, "sampling.num_steps": 10,
        "sampling.guidance_scale": 4.0, "sampling.kernel": {"name": "flow_sde", "a": 1.0},
        "sampling.schedule": {"name": "window", "size": 9, "start": 0}, "sampling.plan.G": 16,
        "rewards.components": {"image_similarity": 0.2, "geneval": 0.8}, "training.kl_beta": 0.0,
        "finetune.ema_decay": 0.0, "advantages.estimator": "flow_grpo"}),
}
# tiny runs; the window recipes keep their step count
STEPS = {"wan": 4, "flux_kontext": 6, "sd": 4, "sdxl": 4, "qwen_image": 4, "qwen_image_edit": 4}


@register("test_frame_counter")
class FrameCounter(Reward):
    """Mean brightness; remembers how many images each call saw (clips arrive frame by frame)."""
    seen: list[int] = []

    def score(self, images, prompts, metadata):
        FrameCounter.seen.append(len(images))
        return images.float().mean(dim=(1, 2, 3))


def _raw(name):
    return yaml.safe_load((CONFIGS / name).read_text())


def _get(obj, dotted):
    for part in dotted.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_values(name):
    cfg = build_dataclass(Config, _raw(name))
    for key, expected in PUBLISHED[name][1].items():
        got = _get(cfg, key)
        assert got == (pytest.approx(expected, rel=1e-12) if isinstance(expected, float) else expected), (key, got)


def _overrides(name, out):
    family = PUBLISHED[name][0]
    raw = _raw(name)
    sets = [f"model.path=tiny:{family}", f"run.output_dir={out}", "run.iterations=2", "run.save_every=0",
            "run.progress=false", 'run.mixed_precision="no"', "model.dtype=float32", "data.prompts_per_iteration=2",
            "sampling.plan={name: flat, G: 2}", "sampling.max_batch=null", "model.height=32", "model.width=32",
            "eval.every=0",
            "rewards.components=test_frame_counter:1.0", "rewards.kwargs={}", "data.eval_prompts=null",
            f"sampling.num_steps={STEPS[family]}"]
    if raw["sampling"]["schedule"]["name"] == "window":  # the recipe's window, shrunk to the tiny step count
        sets.append(f"sampling.schedule={{name: window, size: {STEPS[family] - 1}, start: 0}}")
    if family != "sd":
        sets.append("model.max_sequence_length=32")
    if family == "wan":
        sets += ["model.num_frames=5", "data.train_prompts=flowrl/data/prompts/tiny_train.txt"]
    elif family == "flux_kontext":
        sets += ["model.auto_resize=false", "data.train_prompts=prompts:tiny_edit"]
    elif family == "qwen_image_edit":  # input images at 32 x 32 (the tiny VAE's smallest packable size)
        sets += ["model.image_area=1024", "data.train_prompts=prompts:tiny_edit"]
    else:
        sets.append("data.train_prompts=flowrl/data/prompts/tiny_train.txt")
    return sets


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_two_iterations_on_the_tiny_pipeline(name, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    cfg = load_config(CONFIGS / name, _overrides(name, out))
    FrameCounter.seen = []
    trainer = Trainer(cfg)
    assert type(trainer.policy).__name__ == {"wan": "WanPolicy", "flux_kontext": "FluxKontextPolicy",
                                             "sd": "SDPolicy", "sdxl": "SDXLPolicy", "qwen_image": "QwenImagePolicy",
                                             "qwen_image_edit": "QwenImageEditPolicy"}[PUBLISHED[name][0]]
    trainer.train()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    for r in rows:
        assert "skipped" not in r and math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]), r
    if cfg.training.updates_per_epoch == 1:  # the only update of iteration 0 is on-policy
        assert rows[0]["ratio_min"] == pytest.approx(1.0, abs=1e-5) == rows[0]["ratio_max"]
    steps = int(next(iter(trainer.optimizer.state.values()))["step"])
    assert steps == 2 * cfg.training.updates_per_epoch
    samples = cfg.data.prompts_per_iteration * cfg.sampling.plan["G"]
    frames = cfg.model.num_frames if trainer.policy.video else 1
    assert FrameCounter.seen == [samples * frames] * 2  # every frame of every clip, once per iteration


def test_flowrl_sample_writes_clips_for_a_video_model(tmp_path):
    from flowrl.cli import main

    out = tmp_path / "out"
    assert main(["sample", "--model", "tiny:wan", "--prompt", "a red circle", "--num", "2", "--steps", "2",
                 "--height", "32", "--width", "32", "--num-frames", "5", "--max-sequence-length", "32",
                 "--out", str(out)]) == 0
    from PIL import Image

    for name in ("grid.gif", "0000_00.gif", "0000_01.gif"):
        with Image.open(out / name) as im:
            assert im.n_frames == 5, name
    assert not list(out.glob("*.png"))
    torch.manual_seed(0)  # leave the global RNG as other tests expect
