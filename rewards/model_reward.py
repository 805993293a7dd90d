"""The base of rewards backed by neural networks: placement, frozen weights, mini-batches.

Subclasses load their modules in ``__init__`` (after checking every path and argument), list them in
``modules()`` (and small heads in ``float32_modules()``), call ``self._place()``, and implement
``score_batch(images, prompts) -> Tensor (n,)``.

- ``device`` / ``dtype`` place the weights (``"cuda"``, ``"bfloat16"``, ...); ``.to()`` moves them later.
  Images are moved to the weights' device; scores come back float32 on the images' device.
- Weights are frozen (``requires_grad=False``) and in eval mode. With ``needs_grad=True`` the score is
  differentiable with respect to the pixels (preprocessing is done on tensors), for reward backpropagation.
- ``batch_size`` bounds the images scored at once (memory); ``None`` scores the whole batch together.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Reward

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dtype(reward: str, dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"reward {reward!r}: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")


class ModelReward(Reward):
    def __init__(self, device: str | None = None, dtype: str = "float32", batch_size: int | None = None,
                 needs_grad: bool = False):
        try:
            self.device = torch.device(device if device is not None else "cpu")
        except (RuntimeError, TypeError):
            raise ValueError(f"reward {self.name!r}: device must name a torch device, got {device!r}") from None
        self.dtype = _dtype(self.name, dtype)
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ValueError(f"reward {self.name!r}: batch_size must be a positive int or None, got {batch_size!r}")
        if not isinstance(needs_grad, bool):
            raise ValueError(f"reward {self.name!r}: needs_grad must be a bool, got {needs_grad!r}")
        self.batch_size, self.needs_grad = batch_size, needs_grad

    def modules(self) -> list[nn.Module]:
        """The networks placed in ``dtype``."""
        raise NotImplementedError

    def float32_modules(self) -> list[nn.Module]:
        """Small heads kept in float32 whatever ``dtype`` is, as the references run them."""
        return []

    def score_batch(self, images: Tensor, prompts: list[str]) -> Tensor:
        raise NotImplementedError

    def _place(self) -> None:
        for m in self.modules():
            m.requires_grad_(False).eval().to(self.device, self.dtype)
        for m in self.float32_modules():
            m.requires_grad_(False).eval().to(self.device, torch.float32)

    def to(self, device=None, dtype=None) -> ModelReward:
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = _dtype(self.name, dtype)
        self._place()
        return self

    def score(self, images, prompts, metadata):
        pixels = images.to(self.device, torch.float32)  # preprocessing in fp32; models cast after normalising
        step = self.batch_size or len(prompts)
        scores = [self.score_batch(pixels[i:i + step], prompts[i:i + step]) for i in range(0, len(prompts), step)]
        return torch.cat(scores).float().to(images.device)

    def close(self) -> None:
        for name, value in list(vars(self).items()):
            if isinstance(value, nn.Module):
                setattr(self, name, None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


__all__ = ["DTYPES", "ModelReward"]
