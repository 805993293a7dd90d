"""FLUX.1 Kontext adapter: the ODE limit reproduces FluxKontextPipeline, stored steps re-score to ratio 1, the
input image really conditions the model."""
import numpy as np
import pytest
import torch
from PIL import Image

from flowrl.models import FAMILIES, load_policy, policy_from_pipeline
from flowrl.models.tiny import build_tiny, save_tiny
from flowrl.sampling import Flat, FlowSDE, Window, rollout, score_edges
from flowrl.sampling.schedules import Constant
from flowrl.train.finetune import add_lora

PROMPTS = ["make the circle red", "add two green triangles"]
SIZE = 64  # the tiny FLUX resolution; the input images have it too, so the pipeline keeps them as they are
KW = {"max_sequence_length": 32, "auto_resize": False}
# (true_cfg_scale, guidance_scale, negative prompt): none, FLUX.1-Kontext-dev's distilled guidance, true CFG on top
GUIDANCE = {"none": (1.0, 1.0, None), "distilled": (1.0, 2.5, None), "true_cfg": (2.0, 2.5, "gray background")}


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def pipe():
    return build_tiny("flux_kontext", seed=0)


def _noise(policy, n, seed=3):
    return torch.randn((n, *policy.latent_shape(SIZE, SIZE)), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("guided", list(GUIDANCE))
def test_ode_limit_reproduces_the_pipeline(pipe, guided, one_thread):
    true_cfg, g, neg = GUIDANCE[guided]
    policy = policy_from_pipeline(pipe, **KW, true_cfg_scale=true_cfg)
    images, x_T = _images(len(PROMPTS)), _noise(policy, len(PROMPTS))
    # max_area = the requested area keeps height / width as given; _auto_resize off keeps the 64x64 input
    ref = pipe(image=images, prompt=PROMPTS, negative_prompt=None if neg is None else [neg] * len(PROMPTS),
               true_cfg_scale=true_cfg, latents=x_T.clone(), num_inference_steps=4, guidance_scale=g, height=SIZE,
               width=SIZE, max_area=SIZE * SIZE, _auto_resize=False, output_type="latent",
               max_sequence_length=32).images
    forest = rollout(policy, PROMPTS, plan=Flat(1), kernel=FlowSDE(), schedule=Constant(0.0), num_steps=4,
                     guidance_scale=g, height=SIZE, width=SIZE, initial_noise=x_T, images=images,
                     negative_prompt=neg)
    ours = forest.latents[forest.leaves()]
    assert ours.shape == ref.shape == (2, (SIZE // 4) ** 2, 16)
    assert forest.nfe == 4 * len(PROMPTS) and not forest.sde.any()
    if neg is None:  # the same batch through the same ops: bitwise
        assert torch.equal(ours, ref)
    else:  # one stacked [uncond; cond] batch of 4 vs the pipeline's two passes of 2: float32 matmul rounding
        assert (ours - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("guided", ["none", "true_cfg"])
def test_rescored_steps_have_ratio_one(pipe, guided, one_thread):
    true_cfg, g, neg = GUIDANCE[guided]
    policy = policy_from_pipeline(pipe, **KW, true_cfg_scale=true_cfg)
    # two chains per prompt: each state's rows must pick its own prompt's image tokens
    forest = rollout(policy, PROMPTS, plan=Flat(2), kernel=FlowSDE(a=0.7), schedule=Window(size=2, start=1),
                     num_steps=4, guidance_scale=g, height=SIZE, width=SIZE, seed=7, images=_images(2),
                     negative_prompt=neg)
    edges = forest.trainable_edges()
    assert len(edges) == 2 * 4 and forest.cfg_factor == (2 if neg else 1)
    with torch.no_grad():
        for chunk in (edges[:1], edges):  # micro-batch of one, and all stored steps at once
            logp, _, _ = score_edges(policy, forest, chunk)
            assert (torch.exp(logp - forest.logp_old[chunk]) - 1).abs().max() <= 1e-6


def test_loads_from_a_local_folder_and_decodes(tmp_path, one_thread):
    policy = load_policy(save_tiny("flux_kontext", tmp_path / "kontext"), **KW)
    assert policy.needs_image
    forest = rollout(policy, PROMPTS[:1], plan=Flat(2), kernel=FlowSDE(), num_steps=3, height=SIZE, width=SIZE,
                     images=_images(1))
    images = policy.decode(forest.latents[forest.leaves()])
    assert images.shape == (2, 3, SIZE, SIZE)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    assert not torch.equal(images[0], images[1])


def test_no_input_images_is_an_error(pipe):
    policy = policy_from_pipeline(pipe, **KW)
    with pytest.raises(ValueError, match="edits an input image"):
        rollout(policy, PROMPTS, plan=Flat(1), kernel=FlowSDE(), num_steps=2, height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match="edits an input image"):
        policy.conditioning(PROMPTS, images=_images(1))


def test_the_input_image_conditions_each_row(pipe, one_thread):
    policy = policy_from_pipeline(pipe, **KW)
    a, b = _images(2, seed=5)
    x_T = _noise(policy, 1).repeat(2, 1, 1)
    kw = dict(plan=Flat(1), kernel=FlowSDE(), schedule=Constant(0.0), num_steps=3, height=SIZE, width=SIZE)
    both = rollout(policy, PROMPTS[:1] * 2, initial_noise=x_T, images=[a, b], **kw)
    alone = rollout(policy, PROMPTS[:1], initial_noise=x_T[:1], images=[a], **kw)
    out, out_a = both.latents[both.leaves()], alone.latents[alone.leaves()]
    assert (out[0] - out[1]).abs().max() > 1e-3  # same prompt and noise, different input image
    assert (out[0] - out_a[0]).abs().max() <= 1e-5  # row 0 saw image a, not b


def test_input_size_follows_the_pipeline(pipe):
    wide = Image.new("RGB", (90, 50))
    assert policy_from_pipeline(pipe, **KW).input_size(wide) == (48, 88)  # own size, floored to 2 * VAE factor
    # _auto_resize: the preferred Kontext resolution nearest the aspect ratio 88 / 48 (1392 x 752, width x height)
    assert policy_from_pipeline(pipe, max_sequence_length=32).input_size(wide) == (752, 1392)


def test_lora_targets_exist(pipe):
    family = FAMILIES["flux_kontext"]
    assert family.options == ("max_sequence_length", "true_cfg_scale", "auto_resize") and family.task == "edit"
    names = [n for n, _ in pipe.transformer.named_modules()]
    assert all(any(n.endswith(t) for n in names) for t in family.lora_targets)
    denoiser = build_tiny("flux_kontext", seed=0).transformer
    add_lora(denoiser, "flux_kontext", rank=2, alpha=None, targets=None)
    assert any(p.requires_grad for p in denoiser.parameters())
