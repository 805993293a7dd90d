"""Tiny random-weight reward-model folders, written offline, for tests and dry runs of reward plumbing: a real
checkpoint layout (``from_pretrained`` loads it), meaningless scores."""
from __future__ import annotations

from pathlib import Path


def save_tiny_clip(path: str | Path, seed: int = 0) -> str:
    """A CLIPModel + CLIPProcessor folder (shortest side 40, crop 32, projection 16) as the PickScore / CLIP hub
    repos hold them; ``pickscore``, ``clipscore`` and ``aesthetic`` (with a 16-wide head) load it."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from flowrl.models.tiny import clip_tokenizer

    tok = clip_tokenizer()
    cfg = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 77, "bos_token_id": tok.bos_token_id,
                     "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(cfg).save_pretrained(path)
    ip = CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(path)
    return str(path)


__all__ = ["save_tiny_clip"]
