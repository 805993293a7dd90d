"""Adapters from diffusers pipelines to the sampler's policy interface (flowrl.sampling.policy)."""
from __future__ import annotations

from flowrl.models.flux import FluxPolicy
from flowrl.models.sd import SDPolicy
from flowrl.models.sd3 import SD3Policy

ADAPTERS = {"StableDiffusion3Pipeline": SD3Policy, "FluxPipeline": FluxPolicy, "StableDiffusionPipeline": SDPolicy}


def policy_from_pipeline(pipe, **kwargs):
    """Wrap a loaded pipeline in the adapter for its class (kwargs go to the adapter)."""
    name = type(pipe).__name__
    if name not in ADAPTERS:
        raise ValueError(f"no policy adapter for {name}; supported: {sorted(ADAPTERS)}")
    return ADAPTERS[name](pipe, **kwargs)


def load_policy(path_or_id: str, dtype=None, device=None, **kwargs):
    """``DiffusionPipeline.from_pretrained(path_or_id)`` (a local folder or a hub id), wrapped in its adapter."""
    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path_or_id, **({"dtype": dtype} if dtype is not None else {}))
    if device is not None:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.eval()
    return policy_from_pipeline(pipe, **kwargs)


__all__ = ["ADAPTERS", "FluxPolicy", "SD3Policy", "SDPolicy", "load_policy", "policy_from_pipeline"]
