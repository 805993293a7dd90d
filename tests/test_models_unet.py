"""UNet families on the DDIM-eta kernel: SDXL (two text encoders, pooled embedding, time ids) and stock SD 1.x
folders whose scheduler is PNDM, swapped for DDIM by ``load_pipeline``, loaded, sampled and trained."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowrl.models import load_pipeline, load_policy, policy_from_pipeline
from flowrl.models.tiny import save_tiny
from flowrl.sampling import DDIMEta, Flat, Window, rollout, score_edges
from flowrl.sampling.schedules import Constant

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle above a blue square", "two green triangles"]
SWAP = "replaced by DDIMScheduler.from_config"


@pytest.fixture(scope="module")
def sdxl():
    return policy_from_pipeline(load_pipeline("tiny:sdxl"))


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_sdxl_ode_limit_reproduces_the_pipeline_bitwise(sdxl, guidance):
    """eta 0 is the pipeline's own DDIM loop, CFG, added time ids and zeroed empty negative included."""
    pipe = sdxl.pipe
    x_T = torch.randn((2, *sdxl.latent_shape()), generator=torch.Generator().manual_seed(3))
    ref = pipe(PROMPTS, latents=x_T.clone(), num_inference_steps=6, guidance_scale=guidance,
               output_type="latent").images
    forest = rollout(sdxl, PROMPTS, plan=Flat(1), kernel=DDIMEta(), schedule=Constant(0.0), num_steps=6,
                     guidance_scale=guidance, initial_noise=x_T)
    assert torch.equal(forest.latents[forest.leaves()], ref.float())


def test_sdxl_time_ids_follow_the_resolution(sdxl):
    """A 48x64 sample is conditioned on (48, 64, 0, 0, 48, 64), as the pipeline builds them."""
    x = torch.zeros(3, *sdxl.latent_shape(48, 64))
    pooled = torch.zeros(3, 32)
    assert sdxl._time_ids(x, pooled).tolist() == [[48.0, 64.0, 0.0, 0.0, 48.0, 64.0]] * 3


@pytest.mark.parametrize("guided", [False, True])
def test_sdxl_rescored_steps_have_ratio_one(sdxl, guided):
    forest = rollout(sdxl, PROMPTS * 2, plan=Flat(2), kernel=DDIMEta(eta=1.0), schedule=Window(size=3, start=1),
                     num_steps=5, guidance_scale=5.0 if guided else 1.0, seed=7)
    edges = forest.trainable_edges()
    with torch.no_grad():
        for chunk in (edges[:1], edges):
            logp, _, _ = score_edges(sdxl, forest, chunk)
            assert (torch.exp(logp - forest.logp_old[chunk]) - 1).abs().max() <= 1e-6


@pytest.mark.parametrize("family, stock", [("sd", "PNDMScheduler"), ("sdxl", "EulerDiscreteScheduler")])
def test_stock_scheduler_is_swapped_for_ddim_on_load(family, stock, tmp_path, caplog):
    """A folder as the hub ships it (SD 1.5: PNDM; SDXL: Euler) loads through load_policy; the log names the
    swap, and the DDIM grid has the stock config's betas, offset and final alpha."""
    path = save_tiny(family, tmp_path / family, scheduler="pndm" if family == "sd" else "euler")
    assert json.loads((Path(path) / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == stock
    with caplog.at_level(logging.WARNING, logger="flowrl"):
        policy = load_policy(path)
    assert any(stock in r.message and SWAP in r.message for r in caplog.records)
    sched = policy.pipe.scheduler
    assert type(sched).__name__ == "DDIMScheduler"
    assert sched.config.steps_offset == 1 and sched.config.set_alpha_to_one is False
    assert sched.config.beta_schedule == "scaled_linear" and sched.config.clip_sample is False
    forest = rollout(policy, PROMPTS[:1], plan=Flat(2), kernel=DDIMEta(), num_steps=3)
    images = policy.decode(forest.latents[forest.leaves()])
    assert images.shape == (2, 3, 64, 64) and 0 <= images.min() and images.max() <= 1


def test_a_pipeline_built_with_pndm_is_refused_by_the_adapter_directly():
    """policy_from_pipeline does not convert silently: the swap belongs to load_pipeline, which logs it."""
    from flowrl.models.tiny import build_tiny

    with pytest.raises(TypeError, match="DDIMScheduler"):
        policy_from_pipeline(build_tiny("sd", scheduler="pndm"))


def test_stock_sd_folder_trains_two_iterations(tmp_path):
    path = save_tiny("sd", tmp_path / "stock_sd", scheduler="pndm")
    run = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    sets = [f"run.output_dir={run}", f"model.path={path}", "run.iterations=2", "eval.every=0", "run.progress=false",
            "sampling.kernel={name: ddim, eta: 1.0}", "sampling.num_steps=4", "sampling.guidance_scale=5.0"]
    res = subprocess.run([sys.executable, "-m", "flowrl.cli", "train", str(ROOT / "configs" / "tiny_smoke.yaml"),
                          *[a for s in sets for a in ("--set", s)]], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "PNDMScheduler" in res.stderr and SWAP in res.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_a_config_silent_on_clip_sample_does_not_clip_latents():
    """DDIM's default clip_sample=True would clip latent x0 to [-1, 1]; the scheduler it replaces never clipped."""
    from diffusers import PNDMScheduler

    from flowrl.models import _ddim_for_unets
    from flowrl.models.tiny import build_tiny

    pipe = build_tiny("sd")
    pipe.scheduler = PNDMScheduler(beta_schedule="scaled_linear", skip_prk_steps=True)
    assert "clip_sample" not in pipe.scheduler.config
    _ddim_for_unets(pipe, "test")
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.scheduler.config.clip_sample is False
