"""The published benchmarks: which prompts, how many images per prompt, what scores them.

- ``geneval`` (Ghosh et al. 2023): GenEval's 553 evaluation prompts x 4 images, graded by GenEval's detector
  rules; the figure is the mean over its six tasks of the share of correct images (Flow-GRPO: SD3.5-M 0.63 ->
  0.95). Scored by GenEval's stack behind the reward server (``--server``), by the shapes world's exact detector
  (``--rewards shapes`` on shapes-world metadata), or not at all (``--no-score``: the folder for GenEval's own
  ``evaluate_images.py``).
- ``ocr`` (Flow-GRPO's text rendering): its 1,018 test prompts x 1 image, OCR accuracy max(0, 1 - edit distance /
  length of the quoted text) averaged over images (SD3.5-M 0.59 -> 0.92).
- ``rewards`` (MixGRPO / BranchGRPO / TreeGRPO tables): HPDv2's 400 test prompts x 1 image (or DrawBench,
  Pick-a-Pic test) scored by any reward models (HPSv2.1, PickScore, ImageReward, CLIP, aesthetic, a VLM judge).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Benchmark:
    name: str
    prompts: str              # the default prompt set (a shipped name)
    images_per_prompt: int
    rewards: str | None       # the default reward spec; None: the user names one
    server_reward: str        # the reward that --server URL fills in
    verdicts: bool            # GenEval's table (per-task share of correct images) from */correct, */strict


BENCHMARKS = {
    "geneval": Benchmark("geneval", "prompts:geneval_evaluation_metadata", 4, None, "geneval", True),
    "ocr": Benchmark("ocr", "prompts:ocr_test", 1, "ocr", "remote", False),
    "rewards": Benchmark("rewards", "prompts:hpdv2_test", 1, None, "remote", False),
}


def reward_spec(bench: Benchmark, rewards: str | None, reward_kwargs: dict | None, server: str | None):
    """(spec, kwargs) that score ``bench``: --rewards, else the benchmark's default; --server points the
    benchmark's server reward at that URL. None when nothing scores it (refused unless --no-score)."""
    kwargs = dict(reward_kwargs or {})
    if server:
        if rewards:
            raise ValueError("give --server (the benchmark's scorer behind rewards.server) or --rewards, not both; "
                             f"a server reward in a spec takes its url in --reward-kwargs ({bench.server_reward})")
        kwargs.setdefault(bench.server_reward, {})["url"] = server
        return bench.server_reward, kwargs
    spec = rewards or bench.rewards
    return spec, kwargs


__all__ = ["BENCHMARKS", "Benchmark", "reward_spec"]
