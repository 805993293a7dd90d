"""Model-based rewards (PickScore, CLIPScore, aesthetic, ImageReward) on tiny random checkpoints.

Each test writes a checkpoint of the real architecture with the real library's save function (or, for the
files that are plain ``torch.save`` state dicts, in the official key layout written out here) and loads it
through the same code that loads the real weights. Scores are checked against their definitions computed by
hand: PickScore and CLIPScore from ``CLIPModel``'s embeddings of pixels the CLIP image processor made, the
aesthetic head as explicit matrix products, ImageReward against a reference forward pass of BLIP's ViT and
BERT written here from BLIP's code (``scripts/imagereward_parity.py`` compares with the package itself).
"""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import rewards
from flowrl.models.tiny import WORDS
from rewards import MultiReward, build_reward

PROMPTS = ["a red circle", "two blue squares on the left", "a cat", "a green tree near a house"]
IR_MEAN, IR_STD = 0.16717362830052426, 1.0333394966054072  # ImageReward.py, image-reward 1.5


def images(n=4, h=32, w=32, seed=0, quantize=True):
    x = torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))
    return (x * 255).round() / 255 if quantize else x  # 8-bit values survive a PIL round trip exactly


def to_pil(x):
    return [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for im in x]


# -- tiny CLIP: PickScore, CLIPScore, aesthetic -----------------------------------------------------------
@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A CLIPModel + CLIPProcessor folder (shortest side 40, crop 32), as the hub repos hold them."""
    from rewards.tiny import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def clip_ref(clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    return CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)


def clip_cosine(clip_ref, x, prompts):
    """cos(image, text) from CLIPModel's features, pixels made by the CLIP processor from PIL images."""
    model, proc = clip_ref
    inputs = proc(text=prompts, images=to_pil(x), padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        txt = model.get_text_features(input_ids=inputs["input_ids"],
                                      attention_mask=inputs["attention_mask"]).pooler_output
    return F.cosine_similarity(img, txt, dim=-1), model.logit_scale.exp()


def test_clip_preprocessing_matches_the_processor(clip_dir, clip_ref):
    pick = build_reward("pickscore", model=clip_dir, processor=clip_dir)
    proc = clip_ref[1]
    exact = images(2, 40, 40)  # already the resize size: only the crop, identical up to float rounding
    torch.testing.assert_close(pick.pixel_values(exact), proc(images=to_pil(exact), return_tensors="pt")
                               ["pixel_values"], atol=1e-5, rtol=0)
    # 48x64 -> 40x53 -> crop 32x32; PIL resizes 8-bit images, so the two differ by its rounding (~1/255)
    x = images(2, 48, 64)
    ours, ref = pick.pixel_values(x), proc(images=to_pil(x), return_tensors="pt")["pixel_values"]
    assert ours.shape == ref.shape == (2, 3, 32, 32)
    assert (ours - ref).abs().max() < 1.5 / 255 / min(proc.image_processor.image_std)


def test_pickscore_is_logit_scale_times_cosine(clip_dir, clip_ref):
    x = images(4, 40, 40)  # the processor's resize size: the exact path (resizing is checked above)
    out = build_reward("pickscore", model=clip_dir, processor=clip_dir)(x, PROMPTS)
    cos, logit_scale = clip_cosine(clip_ref, x, PROMPTS)
    assert list(out) == ["pickscore"] and out["pickscore"].shape == (4,)
    torch.testing.assert_close(out["pickscore"], logit_scale * cos, atol=1e-4, rtol=1e-5)
    flow_grpo = build_reward("pickscore", model=clip_dir, processor=clip_dir, divisor=26)(x, PROMPTS)["pickscore"]
    torch.testing.assert_close(flow_grpo, out["pickscore"] / 26)


def test_image_similarity_is_the_image_embedding_cosine_with_the_input(clip_dir, clip_ref, tmp_path):
    x, refs = images(3, 40, 40, seed=2), images(3, 48, 40, seed=3)
    paths = []
    for i, im in enumerate(to_pil(refs)):
        im.save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    model, proc = clip_ref
    with torch.no_grad():
        a = model.get_image_features(pixel_values=proc(images=to_pil(x), return_tensors="pt")["pixel_values"])
        b = model.get_image_features(pixel_values=proc(images=to_pil(refs), return_tensors="pt")["pixel_values"])
    want = F.cosine_similarity(a.pooler_output, b.pooler_output, dim=-1)
    reward = build_reward("image_similarity", model=clip_dir)
    got = reward(x, PROMPTS[:3], [{"image": p} for p in paths])["image_similarity"]
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)  # tensor vs PIL resizing, as for PickScore
    same = reward(refs, PROMPTS[:3], [{"image": p} for p in paths])["image_similarity"]
    torch.testing.assert_close(same, torch.ones(3), atol=1e-5, rtol=0)  # an unedited image scores 1
    with pytest.raises(ValueError, match=r"metadata\['image'\].*samples \[1\]"):
        reward(x, PROMPTS[:3], [{"image": paths[0]}, {}, {"image": paths[2]}])


def test_clipscore_is_w_times_clamped_cosine(clip_dir, clip_ref):
    x = images(8, 40, 40, seed=1)
    prompts = (PROMPTS * 2)[::-1]
    cos, _ = clip_cosine(clip_ref, x, ["A photo depicts " + p for p in prompts])
    assert (cos < 0).any() and (cos > 0).any()  # so the clamp is exercised
    out = build_reward("clipscore", model=clip_dir, prefix="A photo depicts ")(x, prompts)["clipscore"]
    torch.testing.assert_close(out, 2.5 * cos.clamp(min=0), atol=1e-5, rtol=1e-5)
    w100 = build_reward("clipscore", model=clip_dir, w=100, prefix="A photo depicts ")(x, prompts)["clipscore"]
    torch.testing.assert_close(w100, 40 * out)


def aesthetic_head(path, in_dim=16, seed=0, fmt="pth"):
    """The LAION predictor's state dict layout: nn.Sequential indices 0, 2, 4 (Linear, Dropout pairs), 6, 7."""
    g = torch.Generator().manual_seed(seed)
    dims = [in_dim, 1024, 128, 64, 16, 1]
    state = {}
    for idx, (i, o) in zip((0, 2, 4, 6, 7), itertools.pairwise(dims)):
        state[f"layers.{idx}.weight"] = torch.randn(o, i, generator=g) / math.sqrt(i)
        state[f"layers.{idx}.bias"] = torch.randn(o, generator=g) * 0.1
    if fmt == "pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
    return state


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_aesthetic_is_the_mlp_on_the_normalised_clip_embedding(clip_dir, clip_ref, tmp_path, fmt):
    head = tmp_path / f"sac+logos+ava1-l14-linearMSE.{fmt}"
    state = aesthetic_head(head, fmt=fmt)
    x = images(3, 40, 40)
    out = build_reward("aesthetic", head=str(head), clip=clip_dir)(x, PROMPTS[:3])["aesthetic"]
    model, proc = clip_ref
    with torch.no_grad():
        e = model.get_image_features(pixel_values=proc(images=to_pil(x), return_tensors="pt")["pixel_values"]
                                     ).pooler_output
    h = e / e.norm(dim=-1, keepdim=True)
    for idx in (0, 2, 4, 6, 7):  # no activations between the layers: the original has its ReLUs commented out
        h = h @ state[f"layers.{idx}.weight"].T + state[f"layers.{idx}.bias"]
    torch.testing.assert_close(out, h.squeeze(-1), atol=1e-4, rtol=1e-5)


def test_aesthetic_head_layout_errors(clip_dir, tmp_path):
    with pytest.raises(ValueError, match="head is required.*sac\\+logos\\+ava1-l14-linearMSE.pth"):
        build_reward("aesthetic", clip=clip_dir)
    bad = tmp_path / "bad.pth"
    torch.save({"0.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match=r"aesthetic MLP layout.*layers\.0\.weight"):
        build_reward("aesthetic", head=str(bad), clip=clip_dir)
    aesthetic_head(bad, in_dim=8)
    with pytest.raises(ValueError, match=r"layers\.0\.weight has shape \(1024, 8\), expected \(1024, 16\)"):
        build_reward("aesthetic", head=str(bad), clip=clip_dir)


# -- the model-reward base: batching, gradients, placement, config kwargs ------------------------------------
def test_batch_size_does_not_change_scores_and_grad_reaches_pixels_only_when_asked(clip_dir):
    x = images(4, 40, 48, quantize=False)
    whole = build_reward("pickscore", model=clip_dir, processor=clip_dir)
    torch.testing.assert_close(build_reward("pickscore", model=clip_dir, processor=clip_dir, batch_size=3)(
        x, PROMPTS)["pickscore"], whole(x, PROMPTS)["pickscore"], atol=1e-5, rtol=1e-5)
    assert not whole(x.requires_grad_(), PROMPTS)["pickscore"].requires_grad
    grad = build_reward("pickscore", model=clip_dir, processor=clip_dir, needs_grad=True)
    s = grad(x, PROMPTS)["pickscore"]
    s.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in grad.model.parameters())


def test_dtype_and_to(clip_dir):
    r = build_reward("pickscore", model=clip_dir, processor=clip_dir, dtype="bfloat16")
    assert next(r.model.parameters()).dtype == torch.bfloat16
    s16 = r(images(), PROMPTS)["pickscore"]
    assert s16.dtype == torch.float32
    s32 = r.to(dtype=torch.float32)(images(), PROMPTS)["pickscore"]
    assert next(r.model.parameters()).dtype == torch.float32
    torch.testing.assert_close(s16, s32, atol=0.1, rtol=0.05)
    with pytest.raises(ValueError, match="dtype must be one of"):
        build_reward("pickscore", model=clip_dir, processor=clip_dir, dtype="half")
    with pytest.raises(ValueError, match="batch_size"):
        build_reward("pickscore", model=clip_dir, processor=clip_dir, batch_size=0)


def test_config_kwargs_reach_the_rewards(clip_dir, tmp_path):
    head = tmp_path / "head.pth"
    aesthetic_head(head)
    mr = MultiReward({"pickscore": 1.0, "aesthetic": 0.5},
                     {"pickscore": {"model": clip_dir, "processor": clip_dir, "divisor": 26},
                      "aesthetic": {"head": str(head), "clip": clip_dir}})
    out = mr(images(), PROMPTS)
    assert set(out) == {"pickscore", "aesthetic"} and all(v.shape == (4,) for v in out.values())
    assert mr.rewards["pickscore"].divisor == 26


def test_missing_paths_fail_first_naming_the_path(monkeypatch, tmp_path):
    import transformers

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the path check")

    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained", no_load)
    missing = str(tmp_path / "nowhere")
    for name, kw in [("pickscore", {"model": missing}), ("pickscore", {"processor": missing}),
                     ("clipscore", {"model": missing}), ("aesthetic", {"head": missing}),
                     ("aesthetic", {"head": str(tmp_path), "clip": "x"}),
                     ("imagereward", {"checkpoint": missing}), ("imagereward", {"med_config": missing}),
                     ("imagereward", {"tokenizer": "./no/such/folder"}), ("hpsv2", {"checkpoint": missing})]:
        with pytest.raises(FileNotFoundError, match=f"reward '{name}'") as e:
            build_reward(name, **kw)
        assert "nowhere" in str(e.value) or "no/such" in str(e.value) or "is a folder" in str(e.value)


def test_hub_id_fails_fast_offline_with_the_reward_named():
    with pytest.raises(OSError, match=r"reward 'clipscore': could not load processor='some-org/no-such-clip'"):
        build_reward("clipscore", model="some-org/no-such-clip")  # the processor comes from the same id


def open_clip_works() -> bool:
    try:
        import open_clip  # noqa: F401
    except Exception:  # noqa: BLE001  (missing, or torchvision failing beside this torch: HPS cannot run)
        return False
    return True


@pytest.mark.skipif(open_clip_works(), reason="open_clip works here; tests/test_rewards_openclip.py covers HPS")
def test_hps_without_open_clip_says_how_to_install(tmp_path):
    ckpt = tmp_path / "HPS_v2_compressed.pt"
    torch.save({"state_dict": {}}, ckpt)
    with pytest.raises(ImportError, match=r"flowrl\[hps\]"):
        build_reward("hpsv2", checkpoint=str(ckpt))


# -- ImageReward ------------------------------------------------------------------------------------------------
BERT_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VIT = {"width": 128, "depth": 2, "patch": 16, "grid": 2}  # 2 heads of 64, 32x32 images
MED = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
       "max_position_embeddings": 40}


def blip_checkpoint(vocab_size: int, seed=0) -> dict:
    """A random ``ImageReward.pt`` state dict in the package's layout (its ``ImageReward`` module's keys)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    def norm(prefix, n):
        return {f"{prefix}.weight": 1 + rnd(n, scale=0.1), f"{prefix}.bias": rnd(n)}

    def linear(prefix, o, i, scale=None):
        return {f"{prefix}.weight": rnd(o, i, scale=scale or 1 / math.sqrt(i)), f"{prefix}.bias": rnd(o)}

    w, p, n = VIT["width"], VIT["patch"], VIT["grid"] ** 2
    sd = {"cls_token": rnd(1, 1, w, scale=0.5), "pos_embed": rnd(1, n + 1, w, scale=0.5),
          **linear("patch_embed.proj", w, 3 * p * p), **norm("norm", w)}
    sd["patch_embed.proj.weight"] = sd["patch_embed.proj.weight"].view(w, 3, p, p)
    for i in range(VIT["depth"]):
        b = f"blocks.{i}"
        sd |= {**norm(f"{b}.norm1", w), **linear(f"{b}.attn.qkv", 3 * w, w), **linear(f"{b}.attn.proj", w, w),
               **norm(f"{b}.norm2", w), **linear(f"{b}.mlp.fc1", 4 * w, w), **linear(f"{b}.mlp.fc2", w, 4 * w)}
    state = {f"blip.visual_encoder.{k}": v for k, v in sd.items()}

    h, inter, pos = MED["hidden_size"], MED["intermediate_size"], MED["max_position_embeddings"]
    sd = {"embeddings.word_embeddings.weight": rnd(vocab_size, h, scale=0.5),
          "embeddings.position_embeddings.weight": rnd(pos, h, scale=0.5),
          "embeddings.position_ids": torch.arange(pos).view(1, -1), **norm("embeddings.LayerNorm", h)}
    for i in range(MED["num_hidden_layers"]):
        b = f"encoder.layer.{i}"
        for att, kv_in in (("attention", h), ("crossattention", w)):
            sd |= {**linear(f"{b}.{att}.self.query", h, h), **linear(f"{b}.{att}.self.key", h, kv_in),
                   **linear(f"{b}.{att}.self.value", h, kv_in), **linear(f"{b}.{att}.output.dense", h, h),
                   **norm(f"{b}.{att}.output.LayerNorm", h)}
        sd |= {**linear(f"{b}.intermediate.dense", inter, h), **linear(f"{b}.output.dense", h, inter),
               **norm(f"{b}.output.LayerNorm", h)}
    state |= {f"blip.text_encoder.{k}": v for k, v in sd.items()}
    state |= {**linear("blip.vision_proj", 256, w), **linear("blip.text_proj", 256, h)}
    dims = [h, 1024, 128, 64, 16, 1]
    for idx, (i, o) in zip((0, 2, 4, 6, 7), itertools.pairwise(dims)):
        state |= linear(f"mlp.layers.{idx}", o, i)
    return state


@pytest.fixture(scope="module")
def ir_files(tmp_path_factory):
    """ImageReward.pt + med_config.json (as in hub repo THUDM/ImageReward) and a BERT tokenizer folder."""
    from transformers import BertTokenizerFast

    root = tmp_path_factory.mktemp("imagereward")
    vocab = BERT_SPECIAL + sorted(set(WORDS))
    tok_dir = root / "bert"
    BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True).save_pretrained(tok_dir)
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "initializer_range": 0.02, "layer_norm_eps": 1e-12, "model_type": "bert",
           "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": len(vocab) + 2, "encoder_width": 768,
           "add_cross_attention": True, **MED}
    (root / "med_config.json").write_text(json.dumps(med))
    state = blip_checkpoint(len(vocab) + 2)
    torch.save(state, root / "ImageReward.pt")
    return {"checkpoint": str(root / "ImageReward.pt"), "med_config": str(root / "med_config.json"),
            "tokenizer": str(tok_dir), "vocab": vocab, "state": state}


@pytest.fixture(scope="module")
def imagereward(ir_files):
    return build_reward("imagereward", checkpoint=ir_files["checkpoint"], tokenizer=ir_files["tokenizer"])


def ln(x, sd, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], eps)


def lin(x, sd, prefix):
    return x @ sd[f"{prefix}.weight"].T + sd[f"{prefix}.bias"]


def attention(q, k, v, heads, bias=0.0):
    n, lq, d = q.shape
    q, k, v = (t.view(n, -1, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads) + bias, dim=-1)
    return (a @ v).transpose(1, 2).reshape(n, lq, d)


def ref_vit(state, pixels):
    """BLIP's VisionTransformer (models/vit.py): patch conv, [CLS] + positions, pre-norm blocks, final norm."""
    sd = {k[len("blip.visual_encoder."):]: v for k, v in state.items() if k.startswith("blip.visual_encoder.")}
    w, heads = VIT["width"], VIT["width"] // 64
    x = F.conv2d(pixels, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=VIT["patch"])
    x = torch.cat([sd["cls_token"].expand(len(x), 1, w), x.flatten(2).transpose(1, 2)], 1) + sd["pos_embed"]
    for i in range(VIT["depth"]):
        b = f"blocks.{i}"
        q, k, v = lin(ln(x, sd, f"{b}.norm1", 1e-6), sd, f"{b}.attn.qkv").split(w, dim=-1)
        x = x + lin(attention(q, k, v, heads), sd, f"{b}.attn.proj")
        x = x + lin(F.gelu(lin(ln(x, sd, f"{b}.norm2", 1e-6), sd, f"{b}.mlp.fc1")), sd, f"{b}.mlp.fc2")
    return ln(x, sd, "norm", 1e-6)


def ref_text_cls(state, ids, mask, image_embeds):
    """BLIP's med.py BertModel in multimodal mode: post-norm layers, self-attention with the padding mask as
    -10000 logits, cross-attention to every image token; the [CLS] output."""
    sd = {k[len("blip.text_encoder."):]: v for k, v in state.items() if k.startswith("blip.text_encoder.")}
    heads = MED["num_attention_heads"]
    x = sd["embeddings.word_embeddings.weight"][ids] + sd["embeddings.position_embeddings.weight"][:ids.shape[1]]
    x = ln(x, sd, "embeddings.LayerNorm", 1e-12)
    pad_bias = (1.0 - mask[:, None, None, :].float()) * -10000.0
    for i in range(MED["num_hidden_layers"]):
        for att, kv, bias in (("attention", None, pad_bias), ("crossattention", image_embeds, 0.0)):
            b = f"encoder.layer.{i}.{att}"
            src = x if kv is None else kv
            ctx = attention(lin(x, sd, f"{b}.self.query"), lin(src, sd, f"{b}.self.key"),
                            lin(src, sd, f"{b}.self.value"), heads, bias)
            x = ln(lin(ctx, sd, f"{b}.output.dense") + x, sd, f"{b}.output.LayerNorm", 1e-12)
        h = F.gelu(lin(x, sd, f"encoder.layer.{i}.intermediate.dense"))
        x = ln(lin(h, sd, f"encoder.layer.{i}.output.dense") + x, sd, f"encoder.layer.{i}.output.LayerNorm", 1e-12)
    return x[:, 0]


def test_imagereward_tokenizer_is_blips(imagereward, ir_files):
    vocab = ir_files["vocab"]
    tok = imagereward.tokenizer
    assert tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [len(vocab), len(vocab) + 1]
    assert tok.bos_token == "[DEC]"
    ids = tok(["A red circle"], padding="max_length", truncation=True, max_length=35).input_ids[0]
    expect = [vocab.index(t) for t in ("[CLS]", "a", "red", "circle", "[SEP]")]
    assert ids == expect + [0] * (35 - len(expect))


def test_imagereward_matches_a_reference_blip_forward(imagereward, ir_files):
    x = images(4, 32, 32)
    out = imagereward(x, PROMPTS)["imagereward"]
    assert out.shape == (4,) and torch.isfinite(out).all()
    state = ir_files["state"]
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    image_embeds = ref_vit(state, (x - mean) / std)
    torch.testing.assert_close(imagereward.vision(pixel_values=(x - mean) / std).last_hidden_state, image_embeds,
                               atol=1e-5, rtol=1e-5)
    vocab = ir_files["vocab"]
    ids = torch.zeros(4, 35, dtype=torch.long)
    for row, p in enumerate(PROMPTS):
        toks = [vocab.index(t) for t in ["[CLS]", *p.split(), "[SEP]"]]
        ids[row, :len(toks)] = torch.tensor(toks)
    h = ref_text_cls(state, ids, ids != 0, image_embeds)
    for idx in (0, 2, 4, 6, 7):
        h = lin(h, state, f"mlp.layers.{idx}")
    torch.testing.assert_close(out, (h.squeeze(-1) - IR_MEAN) / IR_STD, atol=1e-4, rtol=1e-5)
    raw = imagereward.mlp(imagereward.features(x, PROMPTS)).squeeze(-1)
    torch.testing.assert_close(out * IR_STD + IR_MEAN, raw, atol=1e-5, rtol=1e-5)  # the package's constants


def test_imagereward_finds_med_config_beside_the_checkpoint_and_checks_vocab(ir_files, tmp_path):
    r = build_reward("imagereward", checkpoint=ir_files["checkpoint"], tokenizer=ir_files["tokenizer"],
                     batch_size=2)
    s = r(images(3, 40, 48), PROMPTS[:3])["imagereward"]  # resized and cropped to the ViT's 32 pixels
    assert s.shape == (3,) and torch.isfinite(s).all()
    bad = tmp_path / "med_config.json"
    cfg = json.loads(Path(ir_files["med_config"]).read_text())
    bad.write_text(json.dumps({**cfg, "vocab_size": cfg["vocab_size"] + 1}))
    with pytest.raises(ValueError, match="vocab_size"):
        build_reward("imagereward", checkpoint=ir_files["checkpoint"], med_config=str(bad),
                     tokenizer=ir_files["tokenizer"])


def test_imagereward_in_bfloat16_keeps_its_head_in_float32(imagereward, ir_files):
    r = build_reward("imagereward", checkpoint=ir_files["checkpoint"], tokenizer=ir_files["tokenizer"],
                     dtype="bfloat16")
    assert next(r.vision.parameters()).dtype == next(r.text.parameters()).dtype == torch.bfloat16
    assert next(r.mlp.parameters()).dtype == torch.float32
    x = images(4, 32, 32)
    torch.testing.assert_close(r(x, PROMPTS)["imagereward"], imagereward(x, PROMPTS)["imagereward"],
                               atol=0.1, rtol=0.1)


def test_imagereward_rejects_a_foreign_checkpoint(ir_files, tmp_path):
    ckpt = tmp_path / "ImageReward.pt"
    state = dict(ir_files["state"])
    state["blip.visual_encoder.blocks.0.attn.extra.weight"] = torch.zeros(1)
    torch.save(state, ckpt)
    kw = {"med_config": ir_files["med_config"], "tokenizer": ir_files["tokenizer"]}
    with pytest.raises(ValueError, match=r"ViT keys this architecture does not use.*attn\.extra"):
        build_reward("imagereward", checkpoint=str(ckpt), **kw)
    state = dict(ir_files["state"])
    state["blip.text_encoder.encoder.layer.1.crossattention.self.query.weight"] = torch.zeros(32, 16)
    torch.save(state, ckpt)
    with pytest.raises(ValueError, match=r"(?s)does not fit BlipTextModel.*crossattention\.self\.query"):
        build_reward("imagereward", checkpoint=str(ckpt), **kw)
    state = dict(ir_files["state"])
    del state["blip.text_encoder.encoder.layer.0.output.dense.bias"]
    torch.save(state, ckpt)
    with pytest.raises(ValueError, match=r"missing \['encoder\.layer\.0\.output\.dense\.bias'\]"):
        build_reward("imagereward", checkpoint=str(ckpt), **kw)


def test_every_model_reward_is_registered():
    assert {"pickscore", "clipscore", "aesthetic", "hpsv2", "hpsv21", "imagereward"} <= set(rewards.REWARDS)
