"""ImageReward (Xu et al., 2023): BLIP image-text fusion, an MLP on the [CLS] feature, standardised.

The ``image-reward`` package does not run with transformers 5, so this is the project's own scorer, built from
transformers modules and loading the official checkpoint ``ImageReward.pt`` (hub ``THUDM/ImageReward``, a
``torch.save`` of the package's ``ImageReward`` module) by renaming its keys:

- ``blip.visual_encoder.*`` (BLIP's timm-style ViT) -> ``BlipVisionModel``: the same computation (fused qkv,
  exact GELU, LayerNorm eps 1e-6, final norm) under other names. Its size is read from the checkpoint's shapes;
  heads are 64-dimensional in both of BLIP's ViTs (base 768/12, large 1024/16; ImageReward uses large).
- ``blip.text_encoder.*`` (BLIP's ``med.py`` BERT with cross-attention in every layer) -> ``BlipTextModel``,
  transformers' port of the same module, with the same key names. Its config comes from ``med_config.json``
  (in the hub repo beside the checkpoint), with ``encoder_width`` set to the ViT's width as BLIP does.
- ``mlp.layers.*`` -> the aesthetic predictor's MLP (``rewards.aesthetic.aesthetic_mlp``) on 768 features.

Score, as ``ImageReward.score``: the prompt tokenized by BLIP's tokenizer (``bert-base-uncased`` plus the
special tokens ``[DEC]`` (bos) and ``[ENC]`` that BLIP adds), padded to 35 tokens; the image resized (shortest
side) and centre-cropped to 224 with CLIP's normalisation; the text encoder's [CLS] output, cross-attending to
every image token, through the MLP; then ``(r - 0.16717362830052426) / 1.0333394966054072``, the package's
constants (mean and std of the raw reward on its training data). ``scripts/imagereward_parity.py`` checks
this against the package.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .aesthetic import load_mlp
from .base import register
from .model_reward import ModelReward
from .pixels import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, normalize, resize_center_crop
from .sources import (
    checkpoint_file,
    folder_or_hub_id,
    from_pretrained,
    load_state_dict,
    local_file,
)

HUB_REPO = "THUDM/ImageReward"
MEAN, STD = 0.16717362830052426, 1.0333394966054072
MAX_LENGTH = 35
VIT_HEAD_DIM = 64

_VIT = "blip.visual_encoder."
_TEXT = "blip.text_encoder."
# BLIP ViT block names -> BlipVisionModel encoder-layer names
_BLOCK = {"norm1": "layer_norm1", "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection",
          "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_VIT_TOP = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
            "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
            "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
            "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
# a persistent buffer in BLIP's BERT (transformers rebuilds it); outside the ViT, the BERT and the MLP the
# checkpoint holds only BLIP's contrastive projections (vision_proj, text_proj), unused to score and ignored
_POSITION_IDS = _TEXT + "embeddings.position_ids"


def vision_key(key: str) -> str:
    """A BLIP ViT key (without ``blip.visual_encoder.``) as a BlipVisionModel key."""
    if key in _VIT_TOP:
        return _VIT_TOP[key]
    head, _, rest = key.partition(".")  # blocks.<i>.<name>.<weight|bias>
    index, _, name = rest.partition(".")
    module, _, param = name.rpartition(".")
    if head != "blocks" or not index.isdigit() or module not in _BLOCK:
        raise KeyError(key)
    return f"encoder.layers.{index}.{_BLOCK[module]}.{param}"


def vision_config(state: dict):
    """BlipVisionConfig for the ViT whose weights ``state`` holds (BLIP's ``create_vit`` sizes)."""
    from transformers import BlipVisionConfig

    width = state[_VIT + "cls_token"].shape[-1]
    patch = state[_VIT + "patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(state[_VIT + "pos_embed"].shape[1] - 1)
    depth = len({k.split(".")[3] for k in state if k.startswith(_VIT + "blocks.")})
    return BlipVisionConfig(hidden_size=width, intermediate_size=state[_VIT + "blocks.0.mlp.fc1.weight"].shape[0],
                            num_hidden_layers=depth, num_attention_heads=width // VIT_HEAD_DIM,
                            image_size=grid * patch, patch_size=patch, hidden_act="gelu", layer_norm_eps=1e-6)


def text_config(med: dict, encoder_width: int, tokenizer):
    """BlipTextConfig from BLIP's ``med_config.json`` (a BertConfig with cross-attention)."""
    from transformers import BlipTextConfig

    if not med.get("add_cross_attention"):
        raise ValueError("med_config.json must set add_cross_attention: ImageReward's text encoder attends to "
                         "the image")
    return BlipTextConfig(
        vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], encoder_hidden_size=encoder_width,
        intermediate_size=med["intermediate_size"], num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"], max_position_embeddings=med["max_position_embeddings"],
        hidden_act=med["hidden_act"], layer_norm_eps=med["layer_norm_eps"], pad_token_id=med["pad_token_id"],
        hidden_dropout_prob=med.get("hidden_dropout_prob", 0.0),
        attention_probs_dropout_prob=med.get("attention_probs_dropout_prob", 0.0),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.sep_token_id, sep_token_id=tokenizer.sep_token_id,
        is_decoder=True,  # in BlipTextModel this is what builds the cross-attention layers
    )


def blip_tokenizer(source: str):
    """BLIP's ``init_tokenizer``: a BERT tokenizer plus ``[DEC]`` as bos and ``[ENC]`` as an extra special token."""
    from transformers import BertTokenizerFast

    tok = BertTokenizerFast.from_pretrained(source)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


@register("imagereward")
class ImageReward(ModelReward):
    """ImageReward-v1.0. ``checkpoint``: ``ImageReward.pt`` (default: from hub ``THUDM/ImageReward``);
    ``med_config``: BLIP's text config (default: ``med_config.json`` beside the checkpoint, else from the hub repo);
    ``tokenizer``: a folder or hub id of ``bert-base-uncased``."""

    def __init__(self, checkpoint: str | None = None, med_config: str | None = None,
                 tokenizer: str = "bert-base-uncased", device: str | None = None, dtype: str = "float32",
                 batch_size: int | None = None, needs_grad: bool = False):
        super().__init__(device, dtype, batch_size, needs_grad)
        tok_src = folder_or_hub_id(self.name, "tokenizer", tokenizer)
        if checkpoint is not None:
            checkpoint = local_file(self.name, "checkpoint", checkpoint)
        if med_config is not None:
            med_config = local_file(self.name, "med_config", med_config)
        elif checkpoint is not None and (Path(checkpoint).parent / "med_config.json").is_file():
            med_config = str(Path(checkpoint).parent / "med_config.json")
        checkpoint = checkpoint_file(self.name, "checkpoint", checkpoint, HUB_REPO, "ImageReward.pt")
        med_config = checkpoint_file(self.name, "med_config", med_config, HUB_REPO, "med_config.json")
        with open(med_config) as f:
            med = json.load(f)

        from transformers import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        self.tokenizer = from_pretrained(self.name, "tokenizer", blip_tokenizer, tok_src)
        if len(self.tokenizer) != med["vocab_size"]:
            raise ValueError(f"reward {self.name!r}: tokenizer {tokenizer!r} has {len(self.tokenizer)} tokens with "
                             f"BLIP's two added, but {med_config} says vocab_size {med['vocab_size']}")
        state = load_state_dict(checkpoint)
        if _VIT + "cls_token" not in state or "mlp.layers.0.weight" not in state:
            raise ValueError(f"reward {self.name!r}: {checkpoint} is not an ImageReward checkpoint (no "
                             f"{_VIT}cls_token / mlp.layers.0.weight); keys start {sorted(state)[:5]}")
        vcfg = vision_config(state)
        self.vision = BlipVisionModel(vcfg)
        self.text = BlipTextModel(text_config(med, vcfg.hidden_size, self.tokenizer), add_pooling_layer=False)
        self._load(state, checkpoint)
        self.mlp = load_mlp(self.name, state, "mlp.layers.", med["hidden_size"], checkpoint)
        self.image_size = vcfg.image_size
        self._place()

    def _load(self, state: dict, source: str) -> None:
        vision, text, stray = {}, {}, []
        for key, value in state.items():
            if key.startswith(_VIT):
                try:
                    vision[vision_key(key[len(_VIT):])] = value
                except KeyError:
                    stray.append(key)
            elif key.startswith(_TEXT) and key != _POSITION_IDS:
                text[key[len(_TEXT):]] = value
        if stray:
            raise ValueError(f"reward {self.name!r}: {source} has ViT keys this architecture does not use: "
                             f"{stray[:8]}")
        for module, sub, prefix in ((self.vision, vision, _VIT), (self.text, text, _TEXT)):
            what = f"reward {self.name!r}: {source} does not fit {type(module).__name__} under {prefix!r}"
            try:
                missing, unexpected = module.load_state_dict(sub, strict=False)
            except RuntimeError as e:  # shape mismatches
                raise ValueError(f"{what}: {e}") from None
            if missing or unexpected:
                raise ValueError(f"{what}: missing {missing[:8]}, unexpected {unexpected[:8]}")

    def modules(self):
        return [self.vision, self.text]

    def float32_modules(self):
        return [self.mlp]  # the package runs its head on .float() features

    def features(self, images, prompts):
        """The text encoder's [CLS] output for each (image, prompt), before the MLP."""
        pixels = normalize(resize_center_crop(images, self.image_size), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        image_embeds = self.vision(pixel_values=pixels.to(self.dtype)).last_hidden_state
        text = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_LENGTH,
                              return_tensors="pt").to(self.device)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        out = self.text(input_ids=text.input_ids, attention_mask=text.attention_mask,
                        encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts)
        return out.last_hidden_state[:, 0, :].float()

    def score_batch(self, images, prompts):
        raw = self.mlp(self.features(images, prompts)).squeeze(-1)
        return (raw - MEAN) / STD


__all__ = [
    "HUB_REPO",
    "MAX_LENGTH",
    "MEAN",
    "STD",
    "ImageReward",
    "blip_tokenizer",
    "text_config",
    "vision_config",
    "vision_key",
]
