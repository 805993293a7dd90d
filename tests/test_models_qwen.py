"""Qwen-Image and Qwen-Image-Edit adapters: the ODE limit reproduces the pipelines (true CFG with its norm rescale
included), stored steps re-score to ratio 1, saved folders load, the edit model needs its input images."""
import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit
from PIL import Image
from transformers.utils import is_torchvision_available

from flowrl.models import FAMILIES, load_policy, policy_from_pipeline
from flowrl.models.tiny import build_tiny, save_tiny
from flowrl.models.tiny.qwen import qwen_vl_processor
from flowrl.sampling import Flat, FlowSDE, Window, rollout, score_edges
from flowrl.sampling.schedules import Constant
from flowrl.train.finetune import add_lora

T2I, EDIT = "qwen_image", "qwen_image_edit"
PROMPTS = {T2I: ["a red circle above a blue square", "two green triangles"],
           EDIT: ["make the circle red", "add two green triangles"]}
SIZE = 64
NEG = "blurry dark photo"  # longer than the second prompt: the uncond rows are padded differently from the cond
GUIDANCE = {"none": (1.0, None), "true_cfg": (4.0, NEG)}  # (true_cfg_scale = the sampler's guidance_scale, negative)


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def pipes():
    return {f: build_tiny(f, seed=0) for f in (T2I, EDIT)}


@pytest.fixture
def small_area(monkeypatch):
    """The edit pipeline sizes its input image to a hard-coded 1024 ** 2 pixels; the tiny tests use SIZE ** 2."""
    real = pipeline_qwenimage_edit.calculate_dimensions
    monkeypatch.setattr(pipeline_qwenimage_edit, "calculate_dimensions", lambda area, ratio: real(SIZE * SIZE, ratio))


def _policy(pipes, family, **kw):
    return policy_from_pipeline(pipes[family], **({"image_area": SIZE * SIZE} if family == EDIT else {}), **kw)


def _extra(family, n):
    return {"images": _images(n)} if family == EDIT else {}


def test_the_template_prefix_is_the_drop_index(pipes):
    for pipe in pipes.values():
        ids = pipe.tokenizer(pipe.prompt_template_encode.format("a red circle")).input_ids
        kept = pipe.tokenizer.convert_ids_to_tokens(ids[pipe.prompt_template_encode_start_idx:])
        assert kept[0] in ("a", "<|vision_start|>")  # the user turn's content: the system prompt is all dropped


@pytest.mark.parametrize("family", [T2I, EDIT])
@pytest.mark.parametrize("guided", list(GUIDANCE))
def test_ode_limit_reproduces_the_pipeline(pipes, family, guided, small_area, one_thread):
    true_cfg, neg = GUIDANCE[guided]
    policy, pipe, prompts = _policy(pipes, family), pipes[family], PROMPTS[family]
    x_T = torch.randn((2, *policy.latent_shape(SIZE, SIZE)), generator=torch.Generator().manual_seed(3))
    extra = _extra(family, 2)
    ref = pipe(**({"image": extra["images"]} if extra else {}), prompt=prompts, true_cfg_scale=true_cfg,
               negative_prompt=None if neg is None else [neg] * 2, latents=x_T.clone(), num_inference_steps=4,
               height=SIZE, width=SIZE, output_type="latent").images
    forest = rollout(policy, prompts, plan=Flat(1), kernel=FlowSDE(), schedule=Constant(0.0), num_steps=4,
                     guidance_scale=true_cfg, height=SIZE, width=SIZE, initial_noise=x_T, negative_prompt=neg,
                     **extra)
    ours = forest.latents[forest.leaves()]
    assert ours.shape == ref.shape == (2, (SIZE // 4) ** 2, 16)
    assert forest.nfe == 4 * 2 and not forest.sde.any()
    if neg is None:  # the same batch through the same ops: bitwise
        assert torch.equal(ours, ref)
    else:  # one stacked [uncond; cond] batch of 4, text padded to the longer branch, vs the pipeline's two passes
        assert (ours - ref).abs().max() <= 1e-5  # of 2 (each padded to its own length): float32 rounding


@pytest.mark.parametrize("family", [T2I, EDIT])
@pytest.mark.parametrize("guided", list(GUIDANCE))
def test_rescored_steps_have_ratio_one(pipes, family, guided, small_area, one_thread):
    true_cfg, neg = GUIDANCE[guided]
    policy = _policy(pipes, family)
    # two chains per prompt: each state's rows must pick its own prompt's text (and image) tokens
    forest = rollout(policy, PROMPTS[family], plan=Flat(2), kernel=FlowSDE(a=0.7), schedule=Window(size=2, start=1),
                     num_steps=4, guidance_scale=true_cfg, height=SIZE, width=SIZE, seed=7, negative_prompt=neg,
                     **_extra(family, 2))
    edges = forest.trainable_edges()
    assert len(edges) == 2 * 4 and forest.cfg_factor == (2 if neg else 1)
    with torch.no_grad():
        for chunk in (edges[:1], edges):  # micro-batch of one, and all stored steps at once
            logp, _, _ = score_edges(policy, forest, chunk)
            assert (torch.exp(logp - forest.logp_old[chunk]) - 1).abs().max() <= 1e-6


def test_true_cfg_is_rescaled_to_the_conditional_norm(pipes):
    policy = _policy(pipes, T2I)
    v_u, v_c = torch.randn(2, 3, 5, 16).unbind(0)
    out = policy.combine(v_u, v_c, 4.0)
    assert torch.allclose(out.norm(dim=-1), v_c.norm(dim=-1), atol=1e-5)
    assert torch.allclose(out / out.norm(dim=-1, keepdim=True), (v_u + 4 * (v_c - v_u)).div(
        (v_u + 4 * (v_c - v_u)).norm(dim=-1, keepdim=True)), atol=1e-6)


def test_diffusion_nft_guides_with_the_rescale(pipes, one_thread):
    """DiffusionNFT's guided velocity from a computed conditional one is the sampler's (rescaled) guided one."""
    from flowrl.train.nft import guide, velocity

    policy = _policy(pipes, T2I)
    policy.latent_shape(SIZE, SIZE)  # registers the token grid
    cond = policy.encode(PROMPTS[T2I], negative_prompt=NEG)
    g = torch.Generator().manual_seed(0)
    x0, noise = (torch.randn(2, *policy.latent_shape(SIZE, SIZE), generator=g) for _ in range(2))
    t, idx = torch.tensor([0.7, 0.3]), torch.arange(2)
    args = (policy, cond, x0, noise, t, t * 1000, idx, 4.0)
    v_c, v_guided = velocity(*args, guided=False), velocity(*args, guided=True)
    assert torch.allclose(guide(*args, v_c), v_guided, atol=1e-5)
    plain = policy.forward((1 - 0.7) * x0[:1] + 0.7 * noise[:1], t[:1] * 1000, cond.take(idx[:1], "uncond"),
                           cond.shared, 4.0).float()
    assert not torch.allclose(v_guided[:1], plain + 4 * (v_c[:1] - plain), atol=1e-3)  # the rescale is in it


def test_flash_tail_grid_under_shift_terminal(pipes, one_thread):
    """Qwen's scheduler stretches every grid to end at shift_terminal: MixGRPO-Flash's re-discretised tail starts
    at the window's end, ends there too, and from sigma 1 with S + 1 points is the run's own grid."""
    from flowrl.sampling.solvers import PostWindow

    policy = _policy(pipes, T2I)
    terminal = pipes[T2I].scheduler.config.shift_terminal
    grid = policy.grid(10, SIZE, SIZE)
    assert torch.allclose(policy.tail_grid(1.0, 11, SIZE, SIZE).sigmas, grid.sigmas, atol=1e-6)
    for start in (0.05, float(grid.sigmas[4]), 0.9):
        for points in (2, 3, 7):
            tail = policy.tail_grid(start, points, SIZE, SIZE)
            assert len(tail.sigmas) == points and tail.sigmas[-1] == 0 and (tail.sigmas.diff() < 0).all()
            assert abs(float(tail.sigmas[0]) - start) < 1e-6
            assert points == 2 or abs(float(tail.sigmas[-2]) - terminal) < 1e-6
    with pytest.raises(ValueError, match="shift_terminal"):
        policy.tail_grid(terminal / 2, 4, SIZE, SIZE)
    forest = rollout(policy, PROMPTS[T2I][:1], plan=Flat(2), kernel=FlowSDE(), schedule=Window(size=2, start=1),
                     num_steps=8, height=SIZE, width=SIZE, post_window=PostWindow())
    assert torch.isfinite(forest.latents).all()


@pytest.mark.parametrize("family", [T2I, EDIT])
def test_loads_from_a_local_folder_and_decodes(family, tmp_path, small_area, one_thread):
    path = save_tiny(family, tmp_path / family)
    kw = {"image_area": SIZE * SIZE} if family == EDIT else {}
    if family == EDIT and not is_torchvision_available():
        # transformers builds / loads a Qwen2VLProcessor only with torchvision: every other component is loaded
        pipe = DiffusionPipeline.from_pretrained(path, processor=qwen_vl_processor(build_tiny(EDIT).tokenizer))
        policy = policy_from_pipeline(pipe, **kw)
    else:
        policy = load_policy(path, **kw)
    forest = rollout(policy, PROMPTS[family][:1], plan=Flat(2), kernel=FlowSDE(), num_steps=3, height=SIZE,
                     width=SIZE, **_extra(family, 1))
    images = policy.decode(forest.latents[forest.leaves()])
    assert images.shape == (2, 3, SIZE, SIZE)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    assert not torch.equal(images[0], images[1])


def test_input_images_are_required_by_edit_only(pipes):
    edit = _policy(pipes, EDIT)
    with pytest.raises(ValueError, match="edits an input image"):
        rollout(edit, PROMPTS[EDIT], plan=Flat(1), kernel=FlowSDE(), num_steps=2, height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match="edits an input image"):
        edit.conditioning(PROMPTS[EDIT], images=_images(1))
    with pytest.raises(ValueError, match="text-to-image"):
        _policy(pipes, T2I).conditioning(PROMPTS[T2I], images=_images(2))


def test_the_input_image_conditions_each_row(pipes, small_area, one_thread):
    policy = _policy(pipes, EDIT)
    a, b = _images(2, seed=5)
    x_T = torch.randn((1, *policy.latent_shape(SIZE, SIZE)), generator=torch.Generator().manual_seed(3))
    kw = dict(plan=Flat(1), kernel=FlowSDE(), schedule=Constant(0.0), num_steps=3, height=SIZE, width=SIZE)
    both = rollout(policy, PROMPTS[EDIT][:1] * 2, initial_noise=x_T.repeat(2, 1, 1), images=[a, b], **kw)
    alone = rollout(policy, PROMPTS[EDIT][:1], initial_noise=x_T, images=[a], **kw)
    out, out_a = both.latents[both.leaves()], alone.latents[alone.leaves()]
    assert (out[0] - out[1]).abs().max() > 1e-3  # same prompt and noise, different input image
    assert (out[0] - out_a[0]).abs().max() <= 1e-5  # row 0 saw image a, not b


def test_input_size_follows_the_pipeline(pipes):
    policy = policy_from_pipeline(pipes[EDIT])
    assert policy.input_size(Image.new("RGB", (90, 50))) == (768, 1376)  # 1024 ** 2 at 9:5, multiples of 32


@pytest.mark.parametrize("family", [T2I, EDIT])
def test_lora_targets_exist(pipes, family):
    spec = FAMILIES[family]
    assert spec.task == ("edit" if family == EDIT else "t2i")
    names = [n for n, _ in pipes[family].transformer.named_modules()]
    assert all(any(n.endswith(t) for n in names) for t in spec.lora_targets)
    denoiser = build_tiny(family, seed=0).transformer
    add_lora(denoiser, family, rank=2, alpha=None, targets=None)
    assert any(p.requires_grad for p in denoiser.parameters())
