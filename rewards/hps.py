"""HPS v2 / v2.1 (Wu et al., 2023, "Human Preference Score v2"): an OpenCLIP ViT-H/14 fine-tuned on HPD v2.

Score, as ``hpsv2.score``: the cosine of the normalised image and text embeddings, ``image_emb . text_emb``
(typically 0.2-0.35). Official weights: hub repo ``xswu/HPSv2``, ``HPS_v2_compressed.pt`` (v2.0, ``hpsv2``) and
``HPS_v2.1_compressed.pt`` (v2.1, ``hpsv21``), each a ``torch.save`` of ``{"state_dict": ...}`` whose keys are
OpenCLIP's ``CLIP`` module's. The architecture is OpenCLIP's ``ViT-H-14`` config, built with ``pretrained=None``
(the checkpoint replaces every weight, so the LAION base weights HPSv2 starts from are never needed).

Preprocessing is HPSv2's evaluation transform: the longest side resized to 224 and the rest zero-padded (its
``ResizeMaxSize``, not CLIP's centre crop), with OpenAI CLIP's mean and std.

open_clip imports torchvision, which must match the installed torch: install the ``hps`` extra into an
environment where they agree (README, "Tests"). It is imported when the reward is built, not with this module.
"""
from __future__ import annotations

from .base import register
from .model_reward import ModelReward
from .pixels import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, normalize, resize_longest_pad
from .sources import checkpoint_file, load_state_dict

HUB_REPO = "xswu/HPSv2"


def import_open_clip(reward: str):
    try:
        import open_clip
    except Exception as e:  # ImportError, or torchvision failing to load its operators beside another torch
        raise ImportError(f"reward {reward!r} needs open_clip and a torchvision that matches torch: "
                          f"pip install 'flowrl[hps]' (see README, Tests); importing open_clip failed with: {e}"
                          ) from e
    return open_clip


@register("hpsv2")
class HPSv2(ModelReward):
    """HPS v2.0. ``checkpoint``: a local ``HPS_v2_compressed.pt`` (default: from hub ``xswu/HPSv2``);
    ``arch``: the OpenCLIP model config name (``ViT-H-14`` for the official weights)."""

    filename = "HPS_v2_compressed.pt"

    def __init__(self, checkpoint: str | None = None, arch: str = "ViT-H-14", device: str | None = None,
                 dtype: str = "float32", batch_size: int | None = None, needs_grad: bool = False):
        super().__init__(device, dtype, batch_size, needs_grad)
        if checkpoint is not None:
            checkpoint_file(self.name, "checkpoint", checkpoint, HUB_REPO, self.filename)  # a missing path fails here
        open_clip = import_open_clip(self.name)
        if arch not in open_clip.list_models():
            raise ValueError(f"reward {self.name!r}: arch {arch!r} is not an OpenCLIP model config")
        checkpoint = checkpoint_file(self.name, "checkpoint", checkpoint, HUB_REPO, self.filename)
        state = load_state_dict(checkpoint)
        if "state_dict" not in state:
            raise ValueError(f"reward {self.name!r}: {checkpoint} has no 'state_dict' entry (HPS checkpoints are "
                             f"{{'state_dict': ...}}); top-level keys {sorted(state)[:5]}")
        self.model = open_clip.create_model(arch, pretrained=None)
        self.model.load_state_dict(state["state_dict"])
        self.tokenizer = open_clip.get_tokenizer(arch)
        size = self.model.visual.image_size
        self.image_size = size if isinstance(size, int) else size[0]
        self._place()

    def modules(self):
        return [self.model]

    def score_batch(self, images, prompts):
        pixels = normalize(resize_longest_pad(images, self.image_size), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        image_emb = self.model.encode_image(pixels.to(self.dtype), normalize=True)
        text_emb = self.model.encode_text(self.tokenizer(prompts).to(self.device), normalize=True)
        return (image_emb.float() * text_emb.float()).sum(-1)


@register("hpsv21")
class HPSv21(HPSv2):
    """HPS v2.1: the same model and score, retrained weights ``HPS_v2.1_compressed.pt`` (hub ``xswu/HPSv2``)."""

    filename = "HPS_v2.1_compressed.pt"


__all__ = ["HUB_REPO", "HPSv2", "HPSv21", "import_open_clip"]
