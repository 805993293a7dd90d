"""Tiny offline pipelines: they run, tokenize, encode prompts, reload bit-identically and build deterministically."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import DiffusionPipeline, StableDiffusion3Pipeline  # noqa: E402
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit  # noqa: E402
from PIL import Image  # noqa: E402
from transformers.utils import is_torchvision_available  # noqa: E402

from flowrl.models.tiny import (  # noqa: E402
    DEFAULT_SIZE,
    FAMILIES,
    WORDS,
    build_tiny,
    clip_tokenizer,
    save_tiny,
    t5_tokenizer,
)

# flux and qwen latents are packed 2x2 into tokens; wan: 5 frames -> 2 latent frames
LATENT_SHAPE = {"sd3": (2, 4, 32, 32), "flux": (2, 256, 16), "sd": (2, 4, 32, 32), "sdxl": (2, 4, 32, 32),
                "flux_kontext": (2, 256, 16), "wan": (2, 16, 2, 4, 4), "qwen_image": (2, 256, 16),
                "qwen_image_edit": (2, 256, 16)}
EDITS = ("flux_kontext", "qwen_image_edit")
PROMPTS = ["a red circle left of a blue square", "three green triangles on a white background"]


def _call_kwargs(family):
    size = DEFAULT_SIZE[family]
    kw = {"height": size, "width": size}
    if family not in ("sd", "sdxl"):
        kw["max_sequence_length"] = 32
    if family == "wan":
        kw["num_frames"] = 5
    if family.startswith("qwen"):  # the pipelines' true CFG (default scale 4) runs only with a negative prompt
        kw["negative_prompt"] = [" "] * len(PROMPTS)
    if family in EDITS:  # an input image per prompt
        kw["image"] = [Image.new("RGB", (size, size), c) for c in ("red", "blue")]
    if family == "flux_kontext":  # kept at its size
        kw.update(max_area=size * size, _auto_resize=False)
    return kw


@pytest.fixture(autouse=True)
def small_edit_area(monkeypatch):
    """Qwen-Image-Edit sizes its input image to a hard-coded 1024 ** 2 pixels; the tiny pipelines use 64 ** 2."""
    real = pipeline_qwenimage_edit.calculate_dimensions
    size = DEFAULT_SIZE["qwen_image_edit"]
    monkeypatch.setattr(pipeline_qwenimage_edit, "calculate_dimensions", lambda area, ratio: real(size * size, ratio))


def _run(pipe, family, seed=0, steps=2):
    gen = torch.Generator().manual_seed(seed)
    out = pipe(prompt=PROMPTS, num_inference_steps=steps, generator=gen, output_type="latent",
               **_call_kwargs(family))
    return out.frames if family == "wan" else out.images


def _encode(pipe, family, prompt):
    """Prompt embeddings (sequence, pooled-or-None) through each pipeline's own encode_prompt."""
    if family == "sd3":
        seq, _, pooled, _ = pipe.encode_prompt(prompt, prompt, prompt, do_classifier_free_guidance=False,
                                               max_sequence_length=32)
        return seq, pooled
    if family in ("flux", "flux_kontext"):
        seq, pooled, _ = pipe.encode_prompt(prompt, prompt, max_sequence_length=32)
        return seq, pooled
    if family == "wan":
        seq, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=32)
        return seq, None
    if family == "sdxl":
        seq, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
        return seq, pooled
    if family == "qwen_image":
        return pipe.encode_prompt(prompt, device="cpu", max_sequence_length=32)[0], None
    if family == "qwen_image_edit":  # the prompt and its input image through the VL encoder
        image = Image.new("RGB", (DEFAULT_SIZE[family],) * 2, "gray")
        return pipe.encode_prompt(prompt, image=image, device="cpu")[0], None
    seq, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    return seq, None


@pytest.fixture(scope="module")
def pipes():
    out = {f: build_tiny(f) for f in FAMILIES}
    for p in out.values():
        p.set_progress_bar_config(disable=True)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_runs_and_gives_finite_latents(pipes, family):
    pipe = pipes[family]
    assert all(not m.training for m in pipe.components.values() if isinstance(m, torch.nn.Module))
    lat = _run(pipe, family)
    assert tuple(lat.shape) == LATENT_SHAPE[family]
    assert torch.isfinite(lat).all()


def test_tokenizers_keep_words_whole():
    clip, clip_bang, t5 = clip_tokenizer(), clip_tokenizer(pad_token="!"), t5_tokenizer()
    assert clip.model_max_length == 77 and clip_bang.pad_token == "!"
    assert clip.pad_token_id == clip.eos_token_id != clip.bos_token_id
    for word in WORDS:
        assert len(clip(word).input_ids) == 3, word  # bos, word, eos
        assert len(t5(word).input_ids) == 2, word  # word, </s>
    ids = clip(PROMPTS[0]).input_ids
    assert len(ids) == len(PROMPTS[0].split()) + 2 and clip.unk_token_id not in ids[1:-1]
    assert len(t5(PROMPTS[0]).input_ids) == len(PROMPTS[0].split()) + 1
    assert t5.unk_token_id not in t5("Odd text: x7, q!").input_ids  # ASCII falls back to characters


@pytest.mark.parametrize("family", FAMILIES)
def test_prompts_tokenize_and_embed_differently(pipes, family):
    pipe = pipes[family]
    toks = [t for name, t in pipe.components.items() if name.startswith("tokenizer")]
    for tok in toks:
        ids = tok(PROMPTS[0]).input_ids
        assert len(ids) > 2 and len(set(ids) - {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) > 1
    with torch.no_grad():
        (seq_a, pooled_a), (seq_b, pooled_b) = (_encode(pipe, family, p) for p in PROMPTS)
    assert torch.isfinite(seq_a).all()  # qwen keeps each prompt's own length: compare the common prefix
    n = min(seq_a.shape[1], seq_b.shape[1])
    assert seq_a.shape == seq_b.shape or family.startswith("qwen")
    assert not torch.allclose(seq_a[:, :n], seq_b[:, :n])
    if pooled_a is not None:
        assert not torch.allclose(pooled_a, pooled_b)
    if family == "sd3":  # both CLIPs (channels 0:16, 16:32 of the first 77 rows) and T5 (rows 77:) contribute
        for part in (seq_a[:, :77, :16] - seq_b[:, :77, :16], seq_a[:, :77, 16:] - seq_b[:, :77, 16:],
                     seq_a[:, 77:] - seq_b[:, 77:]):
            assert part.abs().max() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_reload_is_bit_identical(pipes, family, tmp_path):
    if family == "qwen_image_edit" and not is_torchvision_available():
        # transformers loads a Qwen2VLProcessor only with torchvision (tests/test_models_qwen.py loads the folder
        # with the processor passed in instead); the other families do not need it
        pytest.skip("loading Qwen2VLProcessor needs torchvision (the hps extra's environment has it)")
    path = save_tiny(family, tmp_path / family)
    loader = StableDiffusion3Pipeline if family == "sd3" else DiffusionPipeline
    loaded = loader.from_pretrained(path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is type(pipes[family])
    for name, module in pipes[family].components.items():
        if isinstance(module, torch.nn.Module):
            assert not loaded.components[name].training
            ref, got = module.state_dict(), loaded.components[name].state_dict()
            assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref), name
    assert torch.equal(_run(pipes[family], family, seed=3), _run(loaded, family, seed=3))


@pytest.mark.parametrize("family", FAMILIES)
def test_builds_are_deterministic_and_leave_global_rng_alone(pipes, family):
    state = torch.get_rng_state()
    again, other = build_tiny(family, seed=0), build_tiny(family, seed=1)
    assert torch.equal(state, torch.get_rng_state())
    for name, module in pipes[family].components.items():
        if isinstance(module, torch.nn.Module):
            ref = module.state_dict()
            assert all(torch.equal(ref[k], v) for k, v in again.components[name].state_dict().items()), name
            assert any(not torch.equal(ref[k], v) for k, v in other.components[name].state_dict().items()), name


def test_sd_prediction_type_and_unknown_family():
    pipe = build_tiny("sd", prediction_type="v_prediction")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.steps_offset == 1
    with pytest.raises(ValueError):
        build_tiny("sd4")


def test_bfloat16_build():
    pipe = build_tiny("flux", dtype=torch.bfloat16)
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.text_encoder_2.dtype == torch.bfloat16
