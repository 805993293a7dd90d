"""Where reward weights come from: a local path or a Hugging Face hub id, checked before anything loads.

A value that exists on disk is a local path. Otherwise it must look like a hub id (``org/name`` or a legacy
``name``); anything else (``./x``, ``/abs/x``, ``a/b/c``, ``x.pt``) is a missing path and fails at once, naming
it, instead of surfacing later as a hub error or after a large model has loaded.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".json")


def _check_str(reward: str, arg: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"reward {reward!r}: {arg} must be a non-empty str (a local path or a hub id), got {value!r}")
    return value


def folder_or_hub_id(reward: str, arg: str, value: Any) -> str:
    """An existing local path, or a string shaped like a hub id; a missing path raises FileNotFoundError."""
    value = _check_str(reward, arg, value)
    local = Path(value).expanduser()
    if local.exists():
        return str(local)
    if value.startswith((".", "/", "~")) or value.endswith(_FILE_SUFFIXES) or not _HUB_ID.fullmatch(value):
        raise FileNotFoundError(f"reward {reward!r}: {arg} path {value!r} does not exist (and is not a hub id)")
    return value


def local_file(reward: str, arg: str, value: Any) -> str:
    """``value`` as an existing file's path; anything else raises FileNotFoundError naming it."""
    path = Path(_check_str(reward, arg, value)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"reward {reward!r}: {arg} file {value!r} does not exist"
                                + (" (it is a folder)" if path.is_dir() else ""))
    return str(path)


def checkpoint_file(reward: str, arg: str, value: Any, repo_id: str, filename: str) -> str:
    """``value`` must be an existing file; ``None`` means the official ``filename`` from hub repo ``repo_id``."""
    if value is not None:
        return local_file(reward, arg, value)
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id, filename)
    except Exception as e:  # offline, gated, missing: say what was asked for and how to avoid the hub
        raise OSError(f"reward {reward!r}: could not get {filename!r} from hub repo {repo_id!r} ({e}); "
                      f"download it and pass {arg}=<local path>") from e


def from_pretrained(reward: str, arg: str, load: Callable, source: str, **kwargs):
    """``load(source, **kwargs)`` (a ``from_pretrained``); a failure names the reward, the argument and the source."""
    try:
        return load(source, **kwargs)
    except OSError as e:
        raise OSError(f"reward {reward!r}: could not load {arg}={source!r}: {e}") from e


def load_state_dict(path: str) -> dict:
    """A checkpoint file as a dict: safetensors by suffix, else ``torch.load`` restricted to tensors and plain data."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {path!r} holds a {type(obj).__name__}, expected a dict (a state dict)")
    return obj


__all__ = ["checkpoint_file", "folder_or_hub_id", "from_pretrained", "load_state_dict", "local_file"]
