"""Parity of flowrl's ImageReward scorer with the ``image-reward`` package, on one random full-size checkpoint.

    python scripts/imagereward_parity.py --legacy-python /path/to/legacy/venv/bin/python [--workdir DIR]

The package runs only in a legacy stack, made once outside the repository with

    python3 -m venv venv-ir && venv-ir/bin/pip install "torch==2.14.1" "torchvision==0.29.1" \
        "transformers==4.57.6" "diffusers==0.39.*" "datasets<5" "setuptools<81" image-reward clip-anytorch

so this script, run with flowrl's environment, drives it in a subprocess of ``--legacy-python``. That subprocess
builds the package's ``ImageReward`` module (ViT-L + BERT-base, hard-coded) with random weights, ``torch.save``s its
state dict as ``ImageReward.pt``, loads it back through ``ImageReward.load`` and scores every (image, prompt) pair
with ``model.score(prompt, PIL image)``. This process loads the same file with ``rewards.ImageReward`` and scores
the same pairs from tensors. Nothing is downloaded: the tokenizer is a BERT vocabulary of bert-base-uncased's size
and special-token ids written here, used by both sides (the package's ``bert-base-uncased`` lookup is pointed at it,
along with a shim for three helpers transformers moved to ``pytorch_utils``).

The MLP head is re-drawn with 1/sqrt(fan-in) weights (the package initialises it ~1e-3, which would make every
score nearly the same constant and the comparison empty). Two image sets: 224x224 (the package's resize is then
the identity, so any difference is the model's) and 256x320 (resize and crop; PIL rounds to 8 bits, tensors do
not). Prints max |difference| for each; exits 1 if the first exceeds --tol (default 1e-4).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's rewards, whatever is installed

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from flowrl.models.tiny import WORDS  # noqa: E402

PROMPTS = [
    "a red circle above a blue square",
    "a photo of a cat sitting on a chair near a window",
    "two dogs running on the beach under a bright sun",
    "a tall tree in a green forest with snow on the mountain behind it and a river in front of the house",
    "an apple",
    ("a painting of a city street at night with many people and cars and a bus and a bike near the sea and "
     "clouds in the dark sky above the tall houses"),  # longer than 35 tokens: truncation
]

MED_CONFIG = {  # THUDM/ImageReward med_config.json (BLIP's configs/med_config.json)
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 30524, "encoder_width": 768,
    "add_cross_attention": True,
}

LEGACY = textwrap.dedent('''
    import json, sys, time
    from pathlib import Path
    import torch
    import transformers, transformers.modeling_utils as mu, transformers.pytorch_utils as pu
    from PIL import Image

    # shim: med.py imports these from modeling_utils; transformers 4.57 keeps them in pytorch_utils
    for name in ("apply_chunking_to_forward", "find_pruneable_heads_and_indices", "prune_linear_layer"):
        setattr(mu, name, getattr(pu, name))
    work = Path(sys.argv[1])
    _load = transformers.BertTokenizer.from_pretrained.__func__
    transformers.BertTokenizer.from_pretrained = classmethod(
        lambda cls, name, *a, **k: _load(cls, str(work / "bert") if name == "bert-base-uncased" else name, *a, **k))

    import ImageReward as RM
    from ImageReward.ImageReward import ImageReward

    torch.manual_seed(0)
    model = ImageReward(med_config=str(work / "med_config.json"))
    for name, p in model.mlp.layers.named_parameters():  # an O(1)-output head, see the script's docstring
        with torch.no_grad():
            p.normal_(0, p.shape[-1] ** -0.5) if name.endswith("weight") else p.normal_(0, 0.1)
    torch.save(model.state_dict(), work / "ImageReward.pt")
    del model

    t0 = time.perf_counter()
    model = RM.load(str(work / "ImageReward.pt"), device="cpu", med_config=str(work / "med_config.json"))
    pairs = json.loads((work / "pairs.json").read_text())
    with torch.no_grad():
        scores = [model.score(prompt, Image.open(work / image)) for image, prompt in pairs]
    (work / "legacy_scores.json").write_text(json.dumps(scores))
    print(f"legacy: {len(scores)} scores in {time.perf_counter() - t0:.1f} s (transformers {transformers.__version__})")
''')


def bert_vocab() -> list[str]:
    """30522 tokens with bert-base-uncased's special ids ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103)."""
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    vocab += chars + sorted(set(WORDS) - set(chars)) + [f"##{c}" for c in chars]
    return vocab + [f"[filler{i}]" for i in range(30522 - len(vocab))]


def sample_images(h: int, w: int, n: int, seed: int) -> torch.Tensor:
    """Smooth colour fields with shapes and a little noise, 8-bit valued (a PNG holds them exactly)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    out = []
    for _ in range(n):
        a, b, c = torch.rand(3, 3, 1, 1, generator=g)
        img = a * xx + b * yy + c * (1 - xx * yy)
        cy, cx, r = torch.rand(3, generator=g) * torch.tensor([h, w, min(h, w) / 3])
        disk = ((yy * h - cy) ** 2 + (xx * w - cx) ** 2 < r ** 2)
        img = torch.where(disk, torch.rand(3, 1, 1, generator=g), img) + 0.05 * torch.randn(3, h, w, generator=g)
        out.append(img.clamp(0, 1) / img.clamp(0, 1).amax().clamp_min(1e-6))
    return (torch.stack(out) * 255).round() / 255


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--legacy-python", required=True, help="python of the environment with image-reward installed")
    ap.add_argument("--workdir", default=None, help="keep files here (default: a temporary folder, removed)")
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()
    if not Path(args.legacy_python).is_file():
        sys.exit(f"--legacy-python {args.legacy_python!r} does not exist")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        (work / "bert").mkdir(parents=True, exist_ok=True)
        (work / "bert" / "vocab.txt").write_text("\n".join(bert_vocab()) + "\n")
        (work / "med_config.json").write_text(json.dumps(MED_CONFIG))
        sets = {"224x224": sample_images(224, 224, 6, seed=0), "256x320": sample_images(256, 320, 6, seed=1)}
        pairs = []
        for tag, batch in sets.items():
            for i, (img, prompt) in enumerate(zip(batch, PROMPTS)):
                name = f"{tag}_{i}.png"
                Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(work / name)
                pairs.append((name, prompt))
        (work / "pairs.json").write_text(json.dumps(pairs))
        (work / "legacy.py").write_text(LEGACY)

        subprocess.run([args.legacy_python, str(work / "legacy.py"), str(work)], check=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"})
        legacy = torch.tensor(json.loads((work / "legacy_scores.json").read_text()))

        import rewards  # noqa: PLC0415

        t0 = time.perf_counter()
        scorer = rewards.build_reward("imagereward", checkpoint=str(work / "ImageReward.pt"),
                                      med_config=str(work / "med_config.json"), tokenizer=str(work / "bert"))
        ours = []
        for batch in sets.values():
            ours.append(scorer(batch, PROMPTS)["imagereward"])
        ours = torch.cat(ours)
        print(f"flowrl: {len(ours)} scores in {time.perf_counter() - t0:.1f} s")

    n = len(PROMPTS)
    print(f"{'image':>14}  {'package':>10}  {'flowrl':>10}  {'|diff|':>9}")
    for (name, _), a, b in zip(pairs, legacy.tolist(), ours.tolist()):
        print(f"{name:>14}  {a:10.6f}  {b:10.6f}  {abs(a - b):9.2e}")
    result = 0
    for k, tag in enumerate(sets):
        diff = (legacy[k * n:(k + 1) * n] - ours[k * n:(k + 1) * n]).abs().max().item()
        spread = legacy[k * n:(k + 1) * n].std().item()
        print(f"{tag}: max |difference| {diff:.2e} (scores' std across pairs {spread:.3f})")
        if k == 0 and diff > args.tol:
            result = 1
    return result


if __name__ == "__main__":
    sys.exit(main())
