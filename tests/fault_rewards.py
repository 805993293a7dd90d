"""Rewards that misbehave on purpose, for the fault-tolerance tests. Importing this module registers them; a
subprocess run names it in ``rewards.modules`` (with tests/ on PYTHONPATH)."""
import time

import torch

from rewards import Reward, register


@register("test_nan")
class NaNReward(Reward):
    """Mean brightness, but NaN at ``samples`` on the calls numbered in ``calls`` (0-based, per instance; every
    call from ``from_call`` on too, if given); or, with ``prompt``, NaN for every sample of that prompt."""

    def __init__(self, calls=(), samples=(0,), from_call=None, prompt=None):
        self.calls, self.samples, self.from_call, self.prompt = set(calls), list(samples), from_call, prompt
        self.made = 0

    def score(self, images, prompts, metadata):
        out = images.mean(dim=(1, 2, 3))
        if self.prompt is not None:
            out[[i for i, p in enumerate(prompts) if p == self.prompt]] = float("nan")
        elif self.made in self.calls or (self.from_call is not None and self.made >= self.from_call):
            out[self.samples] = float("nan")
        self.made += 1
        return out


@register("test_flaky")
class FlakyReward(Reward):
    """Mean brightness, but calls ``from_call`` .. ``from_call + failures - 1`` raise (failures < 0: every call
    from ``from_call`` on), or sleep ``sleep`` seconds first when ``sleep`` > 0."""

    def __init__(self, from_call=0, failures=1, sleep=0.0):
        self.from_call, self.failures, self.sleep, self.made = from_call, failures, sleep, 0

    def score(self, images, prompts, metadata):
        k, self.made = self.made, self.made + 1
        if k >= self.from_call and (self.failures < 0 or k < self.from_call + self.failures):
            if self.sleep > 0:
                time.sleep(self.sleep)
            else:
                raise ConnectionError(f"reward server unreachable (call {k})")
        return images.mean(dim=(1, 2, 3)).to(torch.float32)
