"""Pixel-only rewards: JPEG (in)compressibility, brightness, colour."""
import pytest
import torch

from rewards import COLORS, build_reward, color_from_prompt


def noise(n=2, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def flat(rgb, n=1, size=32):
    return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(n, 3, size, size).contiguous()


def score(name, images, prompts=None, **kw):
    prompts = prompts or ["x"] * images.shape[0]
    out = build_reward(name, **kw)(images, prompts)
    assert list(out) == [name]
    s = out[name]
    assert s.shape == (images.shape[0],) and s.dtype == torch.float32
    return s


def test_jpeg_grey_beats_noise_and_pair_is_exact_negative():
    x = torch.cat([flat((0.5, 0.5, 0.5)), noise(2)])
    comp = score("jpeg_compressibility", x)
    incomp = score("jpeg_incompressibility", x)
    assert comp[0] > comp[1] and comp[0] > comp[2]
    assert (comp < 0).all()
    assert torch.equal(comp, -incomp)


def test_jpeg_deterministic_and_bf16_ok():
    x = noise(3, seed=1)
    assert torch.equal(score("jpeg_compressibility", x), score("jpeg_compressibility", x))
    # sizes are in kB of the quality-95 file
    assert 0.3 < float(score("jpeg_incompressibility", x)[0]) < 10
    score("jpeg_compressibility", x.to(torch.bfloat16))


def test_jpeg_quality_validated():
    with pytest.raises(ValueError, match=r"'jpeg_compressibility'.*quality"):
        build_reward("jpeg_compressibility", quality=0)
    lo = score("jpeg_incompressibility", noise(1), quality=10)
    hi = score("jpeg_incompressibility", noise(1), quality=95)
    assert lo < hi


def test_brightness():
    x = torch.cat([flat((0, 0, 0)), flat((1, 1, 1)), flat((0.25, 0.5, 0.75))])
    torch.testing.assert_close(score("brightness", x), torch.tensor([0.0, 1.0, 0.5]))
    torch.testing.assert_close(score("brightness", x, target=0.5), torch.tensor([-0.5, -0.5, 0.0]))


def test_brightness_differentiable_when_asked():
    r = build_reward("brightness")
    r.needs_grad = True
    x = noise(2).requires_grad_(True)
    r(x, ["a", "b"])["brightness"].sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 1 / (3 * 32 * 32)))


def test_color_fixed_target_ranks_red_above_blue():
    x = torch.cat([flat((1, 0, 0)), flat((0, 0, 1)), flat((0.8, 0.2, 0.1))])
    s = score("color", x)  # default target: red
    assert s[0] == 0 and s[0] > s[2] > s[1]
    torch.testing.assert_close(s[1], torch.tensor(-(2 ** 0.5)))
    s_blue = score("color", x, rgb=(0, 0, 1))
    assert s_blue[1] > s_blue[0]


def test_color_from_prompt():
    x = torch.cat([flat((1, 0, 0)), flat((0, 0, 1))])
    s = score("color", x, ["a red circle", "a red circle"], from_prompt=True, rgb=None)
    assert s[0] > s[1]
    s = score("color", x, ["a Blue square", "a blue square"], from_prompt=True)
    assert s[1] > s[0]
    # per-sample targets: each image matches its own prompt
    s = score("color", x, ["a red circle", "two blue squares"], from_prompt=True, rgb=None)
    torch.testing.assert_close(s, torch.zeros(2))
    # no colour word: falls back to rgb (red), or errors naming the prompt without one
    s = score("color", x, ["a circle", "a circle"], from_prompt=True)
    assert s[0] > s[1]
    with pytest.raises(ValueError, match=r"'color'.*'a circle'"):
        build_reward("color", from_prompt=True, rgb=None)(x, ["a red cube", "a circle"])


def test_color_words():
    assert color_from_prompt("A RED cube left of a green ball") == COLORS["red"]
    assert color_from_prompt("a reddish bird") is None  # whole words only
    assert color_from_prompt("a grey cat") == color_from_prompt("a gray cat")
    for word in ["red", "green", "blue", "yellow", "white", "black", "orange", "purple", "pink", "cyan"]:
        assert color_from_prompt(f"a {word} thing") == COLORS[word]


def test_color_args_validated():
    with pytest.raises(ValueError, match=r"'color'.*rgb"):
        build_reward("color", rgb=(1, 0))
    with pytest.raises(ValueError, match=r"'color'.*rgb"):
        build_reward("color", rgb=(255, 0, 0))
    with pytest.raises(ValueError, match=r"'color'.*from_prompt"):
        build_reward("color", rgb=None)


def test_color_differentiable_at_target():
    r = build_reward("color")
    r.needs_grad = True
    x = flat((1, 0, 0), n=2).requires_grad_(True)
    r(x, ["a", "b"])["color"].sum().backward()
    assert torch.isfinite(x.grad).all()


def test_import_loads_nothing_heavy():
    import subprocess
    import sys
    code = ("import sys, rewards; bad = [m for m in ('transformers', 'diffusers', 'open_clip', 'requests') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
