"""HPSv2 / v2.1 on a tiny OpenCLIP model. Needs open_clip and a matching torchvision (the ``hps`` extra), so it
runs in the second test environment (README, "Tests"): ``pytest -m openclip``; skipped where open_clip is missing.

The tiny model is a registered OpenCLIP JSON config built with ``pretrained=None``; its state dict is saved in
the HPS checkpoint format (``torch.save({"state_dict": ...})``) and loaded through ``rewards.HPSv2``, the code
that loads ``HPS_v2_compressed.pt``. The score is checked against OpenCLIP's own forward (``output_dict`` image and
text features, as ``hpsv2.score`` uses them) and its ``resize_mode="longest"`` preprocessing.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from rewards import build_reward

pytestmark = pytest.mark.openclip
try:
    import open_clip
except Exception as e:  # noqa: BLE001  (missing, or torchvision broken beside this torch)
    pytest.skip(f"open_clip unavailable: {e}", allow_module_level=True)

TINY = "flowrl-tiny-ViT"  # 32x32 images, 2 heads of 32 in the ViT
PROMPTS = ["a red circle", "two blue squares on the left", "a cat", "a green tree near a house"]


@pytest.fixture(scope="module")
def hps_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hps")
    cfg = {"embed_dim": 32,
           "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    (root / f"{TINY}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(root / f"{TINY}.json")
    paths = {}
    for seed, name in enumerate(("HPS_v2_compressed.pt", "HPS_v2.1_compressed.pt")):
        torch.manual_seed(seed)
        model = open_clip.create_model(TINY, pretrained=None)
        torch.save({"state_dict": model.state_dict()}, root / name)
        paths[name] = str(root / name)
    return paths


def to_pil(x):
    return [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for im in x]


def reference(path, x, prompts):
    """OpenCLIP's forward on its own preprocessing of PIL images: diag(image_features @ text_features.T)."""
    model = open_clip.create_model(TINY, pretrained=None, output_dict=True)
    model.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    model.eval()
    prep = open_clip.image_transform(32, is_train=False, resize_mode="longest")
    pixels = torch.stack([prep(im) for im in to_pil(x)])
    with torch.no_grad():
        out = model(pixels, open_clip.get_tokenizer(TINY)(prompts))
    return (out["image_features"] @ out["text_features"].T).diagonal(), pixels


@pytest.mark.parametrize("name, file", [("hpsv2", "HPS_v2_compressed.pt"), ("hpsv21", "HPS_v2.1_compressed.pt")])
def test_hps_is_the_dot_product_of_normalised_openclip_features(hps_checkpoints, name, file):
    x = (torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).round() / 255
    reward = build_reward(name, checkpoint=hps_checkpoints[file], arch=TINY)
    out = reward(x, PROMPTS)[name]
    expect, _ = reference(hps_checkpoints[file], x, PROMPTS)
    assert out.shape == (4,) and (out.abs() <= 1 + 1e-5).all()
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)


def test_hps_preprocessing_is_hpsv2s_resize_max_size():
    """HPSv2's eval transform: ToTensor, then (when the longest side is not already 224) torchvision's bicubic
    tensor resize of the longest side and zero padding split evenly, then CLIP's normalisation."""
    import torchvision.transforms.functional as TF

    from rewards.pixels import resize_longest_pad

    x = torch.rand(2, 3, 40, 64, generator=torch.Generator().manual_seed(1))
    ref = TF.pad(TF.resize(x, [20, 32], TF.InterpolationMode.BICUBIC, antialias=True), [0, 6, 0, 6], fill=0)
    torch.testing.assert_close(resize_longest_pad(x, 32), ref, atol=1e-6, rtol=0)
    x = torch.rand(1, 3, 32, 20)
    assert torch.equal(resize_longest_pad(x, 32), x)  # scale 1: ResizeMaxSize leaves it as it is


def test_hps_checkpoint_errors(hps_checkpoints, tmp_path):
    bare = tmp_path / "bare.pt"
    torch.save(torch.load(hps_checkpoints["HPS_v2_compressed.pt"], weights_only=True)["state_dict"], bare)
    with pytest.raises(ValueError, match="no 'state_dict' entry"):
        build_reward("hpsv2", checkpoint=str(bare), arch=TINY)
    with pytest.raises(ValueError, match="not an OpenCLIP model config"):
        build_reward("hpsv2", checkpoint=hps_checkpoints["HPS_v2_compressed.pt"], arch="ViT-Nope")
    with pytest.raises(OSError, match=r"HPS_v2\.1_compressed\.pt.*xswu/HPSv2"):  # offline: no hub
        build_reward("hpsv21", arch=TINY)
