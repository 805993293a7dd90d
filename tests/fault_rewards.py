"""Rewards that misbehave on purpose, for the fault-tolerance tests, and a full disk. Importing this module
registers them; a subprocess run names it in ``rewards.modules`` (with tests/ on PYTHONPATH)."""
import errno
import io
import os
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


# A full disk, for subprocess runs: with FLOWRL_TEST_FULL_DISK=iter_NNNNNN in the environment, importing this
# module makes every torch.save into that checkpoint's folder (accelerate's optimizer, registered objects and
# random states) write half of its bytes and then raise ENOSPC, as a write on a full disk does.
FULL_DISK = os.environ.get("FLOWRL_TEST_FULL_DISK")
if FULL_DISK:
    _save = torch.save

    def _save_on_full_disk(obj, f, *args, **kwargs):
        if not (isinstance(f, (str, os.PathLike)) and f".tmp-{FULL_DISK}" in str(f)):
            return _save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        _save(obj, buf, *args, **kwargs)
        with open(f, "wb") as out:
            out.write(buf.getvalue()[:len(buf.getvalue()) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))

    torch.save = _save_on_full_disk
