"""Rewards on clips: image rewards score frame-wise (mean over each clip's frames, every frame_stride-th),
video rewards get the whole clip; clips are written as animated GIF grids and read back."""
from __future__ import annotations

import pytest
import torch

from flowrl.train.images import load_grid, save_clip, save_grid
from rewards import MultiReward, Reward, build_reward, register


@register("test_frame_probe")
class FrameProbe(Reward):
    """Per frame: its mean pixel, and the prompt's length (to see prompts follow their clip)."""
    main_key = "mean"

    def score(self, images, prompts, metadata):
        assert images.dim() == 4
        return {"mean": images.mean(dim=(1, 2, 3)), "plen": torch.tensor([float(len(p)) for p in prompts])}


@register("test_group_ranker")
class GroupRanker(Reward):
    uses_groups = True

    def score(self, images, prompts, metadata, groups):
        return images.mean(dim=(1, 2, 3))


def _clips(n=3, f=5, seed=0):
    return torch.rand(n, f, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_an_image_reward_scores_clips_frame_wise():
    clips, prompts = _clips(), ["a", "bb", "ccc"]
    out = build_reward("test_frame_probe")(clips, prompts)
    assert torch.allclose(out["test_frame_probe"], clips.mean(dim=(2, 3, 4)).mean(1), atol=1e-6)
    assert out["test_frame_probe/plen"].tolist() == [1.0, 2.0, 3.0]
    strided = build_reward("test_frame_probe", frame_stride=2)(clips, prompts)["test_frame_probe"]
    assert torch.allclose(strided, clips[:, ::2].mean(dim=(2, 3, 4)).mean(1), atol=1e-6)  # frames 0, 2, 4
    with pytest.raises(ValueError, match="frame_stride must be an int >= 1"):
        build_reward("test_frame_probe", frame_stride=0)
    with pytest.raises(ValueError, match="accepted arguments: .*frame_stride"):
        build_reward("brightness", stride=2)


def test_a_video_reward_sees_the_whole_clip():
    still = torch.full((2, 4, 3, 8, 8), 0.3)
    flicker = still.clone()
    flicker[:, 1::2] = 0.7
    reward = build_reward("temporal_consistency")
    assert torch.allclose(reward(still, ["a", "b"])["temporal_consistency"], torch.ones(2))
    assert torch.allclose(reward(flicker, ["a", "b"])["temporal_consistency"], torch.full((2,), 0.6))
    with pytest.raises(ValueError, match=r"scores clips of shape \(N, frames, 3, H, W\)"):
        reward(torch.rand(2, 3, 8, 8), ["a", "b"])


def test_group_rankers_refuse_clips_and_modalities_mix_only_image_with_video():
    with pytest.raises(ValueError, match="ranks images within groups"):
        build_reward("test_group_ranker")(_clips(), ["a"] * 3, groups=torch.zeros(3, dtype=torch.long))
    mixed = MultiReward("brightness:1,temporal_consistency:0.5")
    assert mixed.modality == "video" and set(mixed(_clips(), ["a"] * 3)) == {"brightness", "temporal_consistency"}
    with pytest.raises(ValueError, match="score different things"):
        MultiReward("temporal_consistency,answer_format")


def test_clip_grids_are_gifs_that_read_back(tmp_path):
    clips = _clips(n=2, f=3)
    path = save_grid(clips, tmp_path / "grid.png", cols=2)
    assert path.suffix == ".gif" and path.is_file()
    back = load_grid(path, 2)
    assert back.shape == clips.shape and (back - clips).abs().mean() < 0.1  # GIF palette quantisation
    assert save_clip(clips[0], tmp_path / "one.gif").is_file()
