"""Adapters from diffusers pipelines to the sampler's policy interface (flowrl.sampling.policy), and the one
place that turns a model name into a loaded pipeline.

The adapter modules import diffusers (seconds), so they load on first use: config validation imports this
package for the names below and must stay fast.
"""
from __future__ import annotations

import importlib
import logging
from pathlib import Path

from flowrl.models.families import DTYPES, FAMILIES, Family, adapter_options, family_of_pipeline

_ADAPTER_MODULES = {"SD3Policy": "flowrl.models.sd3", "FluxPolicy": "flowrl.models.flux",
                    "SDPolicy": "flowrl.models.sd", "SDXLPolicy": "flowrl.models.sdxl",
                    "FluxKontextPolicy": "flowrl.models.kontext", "QwenImagePolicy": "flowrl.models.qwen",
                    "QwenImageEditPolicy": "flowrl.models.qwen", "WanPolicy": "flowrl.models.wan"}
ADAPTERS = {f.pipeline: f.adapter for f in FAMILIES.values()}
FAMILY_OF_PIPELINE = {f.pipeline: f.name for f in FAMILIES.values()}
TOY_BASE = "toy:shapes"
logger = logging.getLogger("flowrl")


def resolve_model_path(path: str) -> str:
    """``toy:shapes`` names the shapes-world base shipped inside the package; anything else is used as given."""
    if path == TOY_BASE:
        return str(Path(__file__).resolve().parents[1] / "toy" / "base")
    return path


def policy_from_pipeline(pipe, **kwargs):
    """Wrap a loaded pipeline in the adapter for its class (kwargs go to the adapter)."""
    name = type(pipe).__name__
    if name not in ADAPTERS:
        raise ValueError(f"no policy adapter for {name}; supported: {sorted(ADAPTERS)}")
    return __getattr__(ADAPTERS[name])(pipe, **kwargs)


def load_pipeline(path_or_id: str, dtype=None):
    """A frozen, eval-mode pipeline from a diffusers folder or hub id (``from_pretrained``), ``toy:shapes``, or
    ``tiny:<family>`` (built offline in code)."""
    import torch

    if path_or_id.startswith("tiny:"):
        from flowrl.models.tiny import build_tiny

        pipe = build_tiny(path_or_id.split(":", 1)[1], seed=0, **({"dtype": dtype} if dtype is not None else {}))
    else:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(resolve_model_path(path_or_id),
                                                 **({"dtype": dtype} if dtype is not None else {}))
    pipe.set_progress_bar_config(disable=True)
    _ddim_for_unets(pipe, path_or_id)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False).eval()
    return pipe


def _ddim_for_unets(pipe, source: str) -> None:
    """The DDIM-eta kernel (DDPO) needs DDIM's grid: a UNet pipeline shipped with another scheduler (stock SD 1.x
    folders carry PNDM) gets ``DDIMScheduler.from_config`` of its own config, with the same betas, offset and
    prediction type, and the log says so."""
    family = family_of_pipeline(type(pipe).__name__)
    if family is None or family.kernel != "ddim" or type(pipe.scheduler).__name__ == "DDIMScheduler":
        return
    from diffusers import DDIMScheduler

    old = type(pipe.scheduler).__name__
    config = pipe.scheduler.config
    # DDIM's own default clips x0 to [-1, 1], which suits pixels, not latents: a config silent on it gets the
    # stock SD folders' explicit clip_sample false, as the scheduler it replaces never clipped
    pipe.scheduler = DDIMScheduler.from_config(config, **({} if "clip_sample" in config else {"clip_sample": False}))
    logger.warning(f"flowrl: {source}: scheduler {old} replaced by DDIMScheduler.from_config of its config (the "
                   "DDIM-eta sampler steps on DDIM's grid)")


def load_policy(path_or_id: str, dtype=None, device=None, **kwargs):
    """``load_pipeline`` moved to ``device`` and wrapped in its adapter (kwargs go to the adapter)."""
    pipe = load_pipeline(path_or_id, dtype)
    if device is not None:
        pipe.to(device)
    return policy_from_pipeline(pipe, **kwargs)


def __getattr__(name: str):
    if name in _ADAPTER_MODULES:
        return getattr(importlib.import_module(_ADAPTER_MODULES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ADAPTERS", "DTYPES", "FAMILIES", "FAMILY_OF_PIPELINE", "Family", "adapter_options",
           "family_of_pipeline", "FluxPolicy", "SD3Policy", "SDPolicy", "TOY_BASE", "load_pipeline",
           "load_policy", "policy_from_pipeline", "resolve_model_path"]
