"""Image-text similarity under a CLIP model (transformers ``CLIPModel``): PickScore and CLIPScore.

Both embed the image and the prompt, L2-normalise, and score a function of the cosine. Images are
preprocessed on tensors (``rewards.pixels``) with the geometry and normalisation the model's image processor
config names (shortest side, centre crop, mean / std); text uses the model's tokenizer, truncated to CLIP's
77-token context as the references do.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import register
from .model_reward import ModelReward
from .pixels import normalize, resize_center_crop
from .sources import folder_or_hub_id, from_pretrained


def clip_geometry(reward: str, ip) -> tuple[int, tuple[int, int], tuple, tuple]:
    """(shortest side, (crop height, crop width), mean, std) from a CLIP image processor."""
    size, crop = ip.size.get("shortest_edge"), ip.crop_size
    if not size or not crop or not crop.get("height") or not crop.get("width"):
        raise ValueError(f"reward {reward!r}: the image processor must resize by shortest_edge and centre-crop "
                         f"(CLIP's preprocessing), got size={ip.size} crop_size={crop}")
    return int(size), (int(crop["height"]), int(crop["width"])), tuple(ip.image_mean), tuple(ip.image_std)


class CLIPSimilarity(ModelReward):
    """Loads ``CLIPModel.from_pretrained(model)`` and ``CLIPProcessor.from_pretrained(processor)`` (folders or hub
    ids) and gives the cosine similarity of each (image, prompt) pair."""

    def __init__(self, model: str, processor: str | None, device, dtype, batch_size, needs_grad):
        super().__init__(device, dtype, batch_size, needs_grad)
        model_src = folder_or_hub_id(self.name, "model", model)
        proc_src = model_src if processor is None else folder_or_hub_id(self.name, "processor", processor)
        from transformers import CLIPModel, CLIPProcessor

        self.processor = from_pretrained(self.name, "processor", CLIPProcessor.from_pretrained, proc_src)
        self.model = from_pretrained(self.name, "model", CLIPModel.from_pretrained, model_src)
        self.size, self.crop, self.mean, self.std = clip_geometry(self.name, self.processor.image_processor)
        self.max_length = self.model.config.text_config.max_position_embeddings
        self._place()

    def modules(self):
        return [self.model]

    def pixel_values(self, images: Tensor) -> Tensor:
        return normalize(resize_center_crop(images, self.size, self.crop), self.mean, self.std).to(self.dtype)

    def cosine(self, images: Tensor, prompts: list[str]) -> Tensor:
        text = self.processor.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length,
                                        return_tensors="pt").to(self.device)
        image_emb = self.model.get_image_features(pixel_values=self.pixel_values(images)).pooler_output.float()
        text_emb = self.model.get_text_features(**text).pooler_output.float()
        image_emb = image_emb / image_emb.norm(dim=-1, keepdim=True)
        text_emb = text_emb / text_emb.norm(dim=-1, keepdim=True)
        return (image_emb * text_emb).sum(-1)


@register("pickscore")
class PickScore(CLIPSimilarity):
    """PickScore (Kirstain et al., 2023, "Pick-a-Pic"): ``logit_scale.exp() * cos(image, text) / divisor``.

    Official weights: model ``yuvalkirstain/PickScore_v1`` (a CLIP ViT-H/14 fine-tuned on Pick-a-Pic) with the
    processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, as the PickScore repository loads them. Raw scores
    sit around 20 (logit_scale.exp() is ~100). ``divisor=1`` gives the raw PickScore; flow_grpo trains on
    ``divisor=26`` ("norm to 0-1" in its scorer).
    """

    def __init__(self, model: str = "yuvalkirstain/PickScore_v1",
                 processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", divisor: float = 1.0,
                 device: str | None = None, dtype: str = "float32", batch_size: int | None = None,
                 needs_grad: bool = False):
        if isinstance(divisor, bool) or not isinstance(divisor, (int, float)) or not divisor > 0:
            raise ValueError(f"reward {self.name!r}: divisor must be a positive number, got {divisor!r}")
        self.divisor = float(divisor)
        super().__init__(model, processor, device, dtype, batch_size, needs_grad)

    def score_batch(self, images, prompts):
        logit_scale = self.model.logit_scale.exp().float()
        return logit_scale * self.cosine(images, prompts) / self.divisor


@register("clipscore")
class CLIPScore(CLIPSimilarity):
    """CLIPScore (Hessel et al., 2021): ``w * max(cos(image, prefix + prompt), 0)`` with the paper's ``w = 2.5``.

    Default model ``openai/clip-vit-large-patch14`` (its own processor unless ``processor`` is given). The paper
    used ViT-B/32 (``openai/clip-vit-base-patch32``) and the prefix ``"A photo depicts "``; the default prefix
    here is empty, so the prompt is scored as written. torchmetrics' CLIPScore is this with ``w=100``.
    """

    def __init__(self, model: str = "openai/clip-vit-large-patch14", processor: str | None = None, w: float = 2.5,
                 prefix: str = "", device: str | None = None, dtype: str = "float32",
                 batch_size: int | None = None, needs_grad: bool = False):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0:
            raise ValueError(f"reward {self.name!r}: w must be a positive number, got {w!r}")
        if not isinstance(prefix, str):
            raise ValueError(f"reward {self.name!r}: prefix must be a str, got {prefix!r}")
        self.w, self.prefix = float(w), prefix
        super().__init__(model, processor, device, dtype, batch_size, needs_grad)

    def score_batch(self, images, prompts):
        cos = self.cosine(images, [self.prefix + p for p in prompts])
        return self.w * torch.clamp(cos, min=0)


@register("image_similarity")
class ImageSimilarity(CLIPSimilarity):
    """Editing fidelity: ``cos(image, input image)`` of CLIP image embeddings, the input being the row's
    ``image`` metadata (the editing prompt files' path field). Paired with an edit-success reward it keeps an
    edit close to its source (flow_grpo's Kontext / Qwen-Image-Edit recipes weight it 0.5 / 0.2 beside GenEval).
    Default model ``openai/clip-vit-large-patch14``."""

    def __init__(self, model: str = "openai/clip-vit-large-patch14", processor: str | None = None,
                 device: str | None = None, dtype: str = "float32", batch_size: int | None = None):
        super().__init__(model, processor, device, dtype, batch_size, needs_grad=False)

    def _embed(self, images: Tensor) -> Tensor:
        emb = self.model.get_image_features(pixel_values=self.pixel_values(images)).pooler_output.float()
        return emb / emb.norm(dim=-1, keepdim=True)

    def score(self, images, prompts, metadata):
        from .pixels import load_rgb

        missing = [i for i, m in enumerate(metadata) if not m.get("image")]
        if missing:
            raise ValueError(f"reward {self.name!r}: needs each sample's input image in metadata['image'] (an "
                             f"editing prompt file's 'image' field); samples {missing[:5]} have none")
        pixels = images.to(self.device, torch.float32)
        # inputs may differ in size from each other: preprocessed one by one to the model's crop
        refs = torch.cat([self._embed(load_rgb(m["image"]).to(self.device)[None]) for m in metadata])
        step = self.batch_size or len(prompts)
        out = torch.cat([self._embed(pixels[i:i + step]) for i in range(0, len(prompts), step)])
        return (out * refs).sum(-1).to(images.device)


__all__ = ["CLIPScore", "CLIPSimilarity", "ImageSimilarity", "PickScore", "clip_geometry"]
