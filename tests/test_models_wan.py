"""Wan 2.1 text-to-video adapter: the ODE limit reproduces WanPipeline, stored steps re-score to ratio 1, a saved
folder loads and decodes to clips."""
import pytest
import torch
from diffusers import UniPCMultistepScheduler

from flowrl.models import FAMILIES, load_policy, policy_from_pipeline
from flowrl.models.tiny import build_tiny, save_tiny
from flowrl.sampling import Flat, FlowSDE, Window, rollout, score_edges
from flowrl.sampling.schedules import Constant
from flowrl.train.finetune import add_lora

PROMPTS = ["a red circle above a blue square", "two green triangles"]
SIZE, FRAMES = 32, 5  # latents (16, 2, 4, 4): 5 frames = 2 latent frames under the VAE's 4x temporal compression
KW = {"max_sequence_length": 32, "num_frames": FRAMES}
SHAPE = (16, 2, SIZE // 8, SIZE // 8)


@pytest.fixture(scope="module")
def pipe():
    pipe = build_tiny("wan", seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _noise(n, seed=3):
    return torch.randn((n, *SHAPE), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("g", [1.0, 5.0])
def test_ode_limit_reproduces_the_pipeline(pipe, g, one_thread):
    policy = policy_from_pipeline(pipe, **KW)
    x_T = _noise(len(PROMPTS))
    ref = pipe(PROMPTS, num_frames=FRAMES, height=SIZE, width=SIZE, num_inference_steps=4, guidance_scale=g,
               latents=x_T.clone(), output_type="latent", max_sequence_length=32).frames
    forest = rollout(policy, PROMPTS, plan=Flat(1), kernel=FlowSDE(), schedule=Constant(0.0), num_steps=4,
                     guidance_scale=g, height=SIZE, width=SIZE, initial_noise=x_T)
    ours = forest.latents[forest.leaves()]
    assert ours.shape == ref.shape == (len(PROMPTS), *SHAPE)
    assert forest.nfe == 4 * len(PROMPTS) and not forest.sde.any()
    if g == 1.0:  # the same batch through the same ops: bitwise
        assert torch.equal(ours, ref)
    else:  # one stacked [uncond; cond] batch of 4 vs the pipeline's two passes of 2: float32 matmul rounding
        assert (ours - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("g", [1.0, 5.0])
def test_rescored_steps_have_ratio_one(pipe, g, one_thread):
    policy = policy_from_pipeline(pipe, **KW)
    forest = rollout(policy, PROMPTS, plan=Flat(2), kernel=FlowSDE(a=0.7), schedule=Window(size=2, start=1),
                     num_steps=4, guidance_scale=g, height=SIZE, width=SIZE, seed=7)
    edges = forest.trainable_edges()
    assert len(edges) == 2 * 4 and forest.cfg_factor == (2 if g > 1 else 1)
    with torch.no_grad():
        for chunk in (edges[:1], edges):  # micro-batch of one, and all stored steps at once
            logp, _, _ = score_edges(policy, forest, chunk)
            assert (torch.exp(logp - forest.logp_old[chunk]) - 1).abs().max() <= 1e-6


def test_loads_from_a_local_folder_and_decodes(tmp_path, one_thread):
    policy = load_policy(save_tiny("wan", tmp_path / "wan"), **KW)
    assert policy.video and policy.latent_shape(SIZE, SIZE) == SHAPE
    forest = rollout(policy, PROMPTS[:1], plan=Flat(2), kernel=FlowSDE(), num_steps=3, height=SIZE, width=SIZE)
    latents = forest.latents[forest.leaves()]
    clips = policy.decode(latents)
    assert clips.shape == (2, FRAMES, 3, SIZE, SIZE) and clips.dtype == torch.float32
    assert torch.isfinite(clips).all() and clips.min() >= 0 and clips.max() <= 1
    assert not torch.equal(clips[0], clips[1])
    # the pipeline's own un-normalisation and VAE decode: its "pt" output is (N, frames, 3, H, W) in [0, 1] too
    ref = policy.pipe(PROMPTS[:1] * 2, num_frames=FRAMES, height=SIZE, width=SIZE, num_inference_steps=0,
                      latents=latents.clone(), output_type="pt", max_sequence_length=32).frames
    assert (clips - ref).abs().max() <= 1e-6


def test_family_entry_and_lora_targets(pipe):
    family = FAMILIES["wan"]
    assert family.options == ("max_sequence_length", "num_frames") and family.task == "t2v"
    names = [n for n, _ in pipe.transformer.named_modules()]
    assert all(any(n.endswith(t) for n in names) for t in family.lora_targets)
    denoiser = build_tiny("wan", seed=0).transformer
    add_lora(denoiser, "wan", rank=2, alpha=None, targets=None)
    assert any(p.requires_grad for p in denoiser.parameters())


def test_clip_length_and_stock_scheduler(pipe):
    with pytest.raises(ValueError, match="4k \\+ 1"):
        policy_from_pipeline(pipe, num_frames=6)
    assert policy_from_pipeline(pipe, num_frames=81).latent_shape(480, 832) == (16, 21, 60, 104)
    # the stock folders' UniPC with flow_shift 3: the flow kernels step on Euler's grid of the same shift
    euler = policy_from_pipeline(pipe, **KW).grid(6)
    unipc = build_tiny("wan", seed=0)
    unipc.scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    grid = policy_from_pipeline(unipc, **KW).grid(6)
    assert torch.equal(grid.sigmas, euler.sigmas) and torch.equal(grid.timesteps, euler.timesteps)
