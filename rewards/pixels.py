"""Image preprocessing for reward models, on tensors: differentiable, batched, on the images' device.

Most reference implementations preprocess PIL images (torchvision / transformers); ``resize_center_crop``
does the same geometry on (N, 3, H, W) tensors in [0, 1]: bicubic resizing with ``antialias=True``, which is PyTorch's
PIL-compatible kernel (it matches PIL's float resize to ~1e-6, up- and downscaling; without it the kernel
differs by up to 0.1), in PIL's two passes with its clipping, and the same output sizes and crop offsets as
torchvision. They skip the 8-bit quantisation of PIL round trips, so pixels match the references to within
that rounding (~1/255), and exactly when no resize is needed.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# CLIP's normalisation (openai/CLIP), used by every reward here
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _resize(images: Tensor, height: int, width: int) -> Tensor:
    """Bicubic resize as PIL does it: a horizontal pass, then a vertical one, clipping to the pixel range after
    each (PIL stores 8-bit pixels between passes). One 2-D pass without the clip differs from PIL by up to
    ~20/255 on high-frequency images; this matches it to its 8-bit rounding (~1/255)."""
    h, w = images.shape[-2:]
    if w != width:
        images = F.interpolate(images, size=(h, width), mode="bicubic", align_corners=False, antialias=True)
        images = images.clamp(0, 1)
    if h != height:
        images = F.interpolate(images, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
        images = images.clamp(0, 1)
    return images


def resize_center_crop(images: Tensor, size: int, crop: tuple[int, int] | None = None) -> Tensor:
    """Shortest side to ``size`` (the longer one to ``int(size * long / short)``), then a centred crop of
    ``crop`` = (height, width), default (size, size): torchvision's ``Resize(size)`` + ``CenterCrop``."""
    h, w = images.shape[-2:]
    if h <= w:
        new_h, new_w = size, int(size * w / h)
    else:
        new_h, new_w = int(size * h / w), size
    images = _resize(images, new_h, new_w)
    ch, cw = crop or (size, size)
    if ch > new_h or cw > new_w:
        raise ValueError(f"crop {(ch, cw)} is larger than the resized image {(new_h, new_w)}")
    top, left = round((new_h - ch) / 2), round((new_w - cw) / 2)  # torchvision rounds the offsets the same way
    return images[..., top:top + ch, left:left + cw]


def resize_longest_pad(images: Tensor, size: int) -> Tensor:
    """Longest side to ``size``, then zero padding (black, before normalisation) centred to ``size`` x ``size``:
    HPSv2's evaluation transform (its open_clip fork's ``ResizeMaxSize``), which keeps the whole image.

    HPSv2 resizes the float tensor ``ToTensor`` made, not a PIL image, so this is torchvision's tensor resize:
    one antialiased bicubic pass, no clipping."""
    h, w = images.shape[-2:]
    scale = size / max(h, w)
    if scale == 1.0:
        return images  # as ResizeMaxSize: nothing to do, even for a non-square image
    new_h, new_w = round(h * scale), round(w * scale)
    images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    pad_h, pad_w = size - new_h, size - new_w
    return F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))


def normalize(images: Tensor, mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD
              ) -> Tensor:
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


__all__ = ["OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "normalize", "resize_center_crop", "resize_longest_pad"]


def load_rgb(path: str) -> Tensor:
    """An image file as (3, H, W) float in [0, 1] (8-bit RGB, as decoded images are compared)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float() / 255
