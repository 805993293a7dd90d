"""Adapters: the ODE limit reproduces each diffusers pipeline; stored steps re-score to ratio 1."""
import pytest
import torch

from flowrl.models import load_policy, policy_from_pipeline
from flowrl.models.tiny import build_tiny, save_tiny
from flowrl.sampling import DDIMEta, Flat, FlowSDE, Window, rollout, score_edges
from flowrl.sampling.schedules import Constant

PROMPTS = ["a red circle above a blue square", "two green triangles"]
KW = {"sd3": {"max_sequence_length": 32}, "flux": {"max_sequence_length": 32}, "sd": {}}
GUIDANCE = {"sd3": 4.5, "flux": 3.5, "sd": 7.5}


def _policy(family, **kw):
    return policy_from_pipeline(build_tiny(family, seed=0), **KW[family], **kw)


@pytest.mark.parametrize("family", ["sd3", "flux", "sd"])
@pytest.mark.parametrize("guided", [False, True])
def test_ode_limit_reproduces_the_pipeline(family, guided):
    policy = _policy(family)
    pipe = policy.pipe
    g = GUIDANCE[family] if guided else 1.0
    size = policy.default_height
    x_T = torch.randn((len(PROMPTS), *policy.latent_shape(size, size)), generator=torch.Generator().manual_seed(3))
    ref = pipe(PROMPTS, latents=x_T.clone(), num_inference_steps=6, guidance_scale=g, height=size, width=size,
               output_type="latent", **KW[family]).images
    forest = rollout(policy, PROMPTS, plan=Flat(1), kernel=DDIMEta() if family == "sd" else FlowSDE(),
                     schedule=Constant(0.0), num_steps=6, guidance_scale=g, height=size, width=size,
                     initial_noise=x_T)
    ours = forest.latents[forest.leaves()]
    assert ours.shape == ref.shape
    assert (ours - ref.float()).abs().max() <= 1e-5
    assert forest.nfe == 6 * len(PROMPTS) and not forest.sde.any()


@pytest.mark.parametrize("family", ["sd3", "flux", "sd"])
@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("batch", [1, 8])
def test_rescored_steps_have_ratio_one(family, guided, batch):
    kw = {"true_cfg_scale": 2.0} if family == "flux" and guided else {}
    policy = _policy(family, **kw)
    kernel = DDIMEta(eta=1.0) if family == "sd" else FlowSDE(a=0.7)
    prompts = (PROMPTS * 4)[:batch]
    forest = rollout(policy, prompts, plan=Flat(1), kernel=kernel, schedule=Window(size=3, start=1), num_steps=5,
                     guidance_scale=GUIDANCE[family] if guided else 1.0, seed=7)
    edges = forest.trainable_edges()
    assert len(edges) == 3 * batch
    assert forest.cfg_factor == (2 if guided else 1)
    with torch.no_grad():
        for chunk in (edges[:1], edges):  # micro-batch of one, and all stored steps at once
            logp, _, _ = score_edges(policy, forest, chunk)
            ratio = torch.exp(logp - forest.logp_old[chunk])
            assert (ratio - 1).abs().max() <= 1e-6


@pytest.mark.parametrize("family", ["sd3", "flux", "sd"])
def test_loads_from_a_local_folder_and_decodes(family, tmp_path):
    path = save_tiny(family, tmp_path / family)
    policy = load_policy(str(path), **KW[family])
    size = policy.default_height
    forest = rollout(policy, PROMPTS[:1], plan=Flat(2), kernel=DDIMEta() if family == "sd" else FlowSDE(),
                     num_steps=3, height=size, width=size)
    images = policy.decode(forest.latents[forest.leaves()])
    assert images.shape == (2, 3, size, size)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    # both chains of the group differ (independent initial noise and SDE noise)
    assert not torch.equal(images[0], images[1])


def test_flow_kernel_on_ddim_model_is_an_error():
    with pytest.raises(ValueError, match="flow kernel"):
        rollout(_policy("sd"), PROMPTS, plan=Flat(1), kernel=FlowSDE(), num_steps=2)
