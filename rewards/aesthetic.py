"""The LAION aesthetic predictor v2: an MLP on L2-normalised CLIP ViT-L/14 image embeddings.

Official head: ``sac+logos+ava1-l14-linearMSE.pth`` from github.com/christophschuhmann/improved-aesthetic-predictor
(trained on SAC + LAION-Logos + AVA ratings, MSE loss), a ``torch.save`` of the MLP's state dict with keys
``layers.{0,2,4,6,7}.{weight,bias}``. It is not on the Hugging Face hub, so ``head`` is a local file (.pth or
.safetensors with the same keys). The CLIP tower is OpenAI's ViT-L/14, ``openai/clip-vit-large-patch14`` in
transformers. Scores are on the AVA scale, roughly 1-10 (typical images 4-7).
"""
from __future__ import annotations

from torch import nn

from .base import register
from .clip_similarity import clip_geometry
from .model_reward import ModelReward
from .pixels import normalize, resize_center_crop
from .sources import folder_or_hub_id, from_pretrained, load_state_dict, local_file

MLP_WIDTHS = (1024, 128, 64, 16, 1)
MLP_DROPOUT = {1: 0.2, 2: 0.2, 3: 0.1}  # after the 1st, 2nd and 3rd linear layers; none after the 4th


def aesthetic_mlp(input_size: int) -> nn.Sequential:
    """The predictor's head: Linear layers input -> 1024 -> 128 -> 64 -> 16 -> 1 with dropouts in between and no
    activations (the ReLUs are commented out in the original). ImageReward reuses it on BLIP features, so the
    module indices, hence state-dict keys, follow the original ``nn.Sequential``."""
    layers: list[nn.Module] = []
    widths = (input_size, *MLP_WIDTHS)
    for i in range(1, len(widths)):
        layers.append(nn.Linear(widths[i - 1], widths[i]))
        if i in MLP_DROPOUT:
            layers.append(nn.Dropout(MLP_DROPOUT[i]))
    return nn.Sequential(*layers)


def load_mlp(reward: str, state: dict, prefix: str, input_size: int, source: str) -> nn.Sequential:
    """``aesthetic_mlp`` filled from the ``prefix``-ed keys of ``state``; any other layout is an error naming keys."""
    mlp = aesthetic_mlp(input_size)
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    expected = set(mlp.state_dict())
    if set(sub) != expected:
        raise ValueError(f"reward {reward!r}: {source} does not hold the aesthetic MLP layout: expected keys "
                         f"{sorted(prefix + k for k in expected)}, got {sorted(state)[:12]}")
    shapes = {k: tuple(v.shape) for k, v in mlp.state_dict().items()}
    bad = [k for k, v in sub.items() if tuple(v.shape) != shapes[k]]
    if bad:
        raise ValueError(f"reward {reward!r}: {source}: {prefix + bad[0]} has shape {tuple(sub[bad[0]].shape)}, "
                         f"expected {shapes[bad[0]]} (input size {input_size})")
    mlp.load_state_dict(sub)
    return mlp


@register("aesthetic")
class Aesthetic(ModelReward):
    """``mlp(e / |e|)`` with ``e`` the CLIP image embedding (``CLIPModel.get_image_features``). ``head``: the MLP's
    weights (required); ``clip``: the CLIP folder or hub id."""

    def __init__(self, head: str | None = None, clip: str = "openai/clip-vit-large-patch14",
                 device: str | None = None, dtype: str = "float32", batch_size: int | None = None,
                 needs_grad: bool = False):
        super().__init__(device, dtype, batch_size, needs_grad)
        if head is None:
            raise ValueError(f"reward {self.name!r}: head is required: a local copy of "
                             "sac+logos+ava1-l14-linearMSE.pth from "
                             "github.com/christophschuhmann/improved-aesthetic-predictor")
        head = local_file(self.name, "head", head)
        clip_src = folder_or_hub_id(self.name, "clip", clip)
        state = load_state_dict(head)
        from transformers import CLIPImageProcessor, CLIPModel

        self.clip = from_pretrained(self.name, "clip", CLIPModel.from_pretrained, clip_src)
        ip = from_pretrained(self.name, "clip", CLIPImageProcessor.from_pretrained, clip_src)
        self.size, self.crop, self.mean, self.std = clip_geometry(self.name, ip)
        self.mlp = load_mlp(self.name, state, "layers.", self.clip.config.projection_dim, head)
        self._place()

    def modules(self):
        return [self.clip]

    def float32_modules(self):
        return [self.mlp]

    def embedding(self, images):
        pixels = normalize(resize_center_crop(images, self.size, self.crop), self.mean, self.std).to(self.dtype)
        emb = self.clip.get_image_features(pixel_values=pixels).pooler_output.float()
        return emb / emb.norm(dim=-1, keepdim=True)

    def score_batch(self, images, prompts):
        return self.mlp(self.embedding(images)).squeeze(-1)


__all__ = ["MLP_WIDTHS", "Aesthetic", "aesthetic_mlp", "load_mlp"]
