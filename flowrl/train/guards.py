"""Keeping a long run alive and honest: stop signals that end at an iteration boundary, reward calls retried
with backoff (and an optional time limit), non-finite values caught before they reach the weights.

The decisions that change what the processes do next (stop, skip an update, fail) are taken collectively by
the trainer; this module only gives each process its local answer.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

import torch

from rewards import RewardOutputError


class TrainingError(RuntimeError):
    """The run cannot go on (a reward keeps failing, updates keep being non-finite). Nothing saved before is
    touched: the last checkpoint stays complete and resumable."""


class NonFiniteReward(Exception):
    """A reward returned NaN / inf for some samples (their indices in the scored batch)."""

    def __init__(self, reward: str, indices: list[int]):
        super().__init__(f"reward {reward!r} is non-finite at samples {indices}")
        self.reward, self.indices = reward, indices


class StopSignal:
    """SIGTERM / SIGINT ask the loop to stop after the current iteration (it writes a checkpoint and exits 0);
    a second signal exits at once, without a checkpoint.

    A repeat within ``REPEAT_WINDOW_S`` counts as the same request: under ``accelerate launch`` (torch elastic)
    one Ctrl-C reaches a worker twice, from the terminal and again from the launcher, which forwards it.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    REPEAT_WINDOW_S = 2.0

    def __init__(self):
        self.received: str | None = None
        self._at = 0.0
        self._previous: dict = {}

    def install(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received is None:
            self.received, self._at = name, time.monotonic()
            # os.write, not print: the handler may interrupt a write to stderr (tqdm, logging), and a buffered
            # write re-entered from a signal handler raises
            os.write(2, f"flowrl: {name} received: finishing this iteration, then writing a checkpoint (send it "
                        "again to exit at once)\n".encode())
        elif time.monotonic() - self._at > self.REPEAT_WINDOW_S:
            os.write(2, f"flowrl: second {name}: exiting now, without a checkpoint\n".encode())
            os._exit(128 + signum)


def call_with_timeout(fn: Callable, timeout: float | None):
    """``fn()``, or TimeoutError after ``timeout`` seconds. The call runs in a daemon thread, which is abandoned
    (Python cannot kill a thread) if it overruns; grad mode, which is per thread, is carried over."""
    if timeout is None:
        return fn()
    box: dict = {}
    grad = torch.is_grad_enabled()

    def run():
        try:
            with torch.set_grad_enabled(grad):
                box["value"] = fn()
        except Exception as e:  # noqa: BLE001 (handed to the caller's thread, which raises it)
            box["error"] = e

    worker = threading.Thread(target=run, name="flowrl-reward", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise TimeoutError(f"no answer within {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def score_with_retries(reward, images, prompts, metadata, groups, retries: int, backoff: float, timeout: float | None,
                       warn: Callable[[str], None]) -> dict:
    """One reward component's scores. An exception or a timeout is retried ``retries`` times, waiting
    ``backoff * 2**k`` seconds before retry k + 1, then raises TrainingError naming the reward. Non-finite
    scores are not retried (a deterministic reward would give them again): NonFiniteReward, for the trainer to
    skip the update; any other malformed output is a bug in the reward and fails at once."""
    name = reward.label
    for attempt in range(retries + 1):
        try:
            return call_with_timeout(lambda: reward(images, prompts, metadata, groups=groups), timeout)
        except RewardOutputError as e:
            if e.indices:
                raise NonFiniteReward(name, e.indices) from None
            raise TrainingError(f"reward {name!r} returned malformed scores: {e}") from e
        except Exception as e:
            if attempt == retries:
                raise TrainingError(f"reward {name!r} failed {retries + 1} time(s); last error: "
                                    f"{type(e).__name__}: {e}") from e
            delay = backoff * 2**attempt
            warn(f"reward {name!r} failed ({type(e).__name__}: {e}); retry {attempt + 1}/{retries} in {delay:g} s")
            time.sleep(delay)
    raise AssertionError("unreachable")


def grads_finite(params) -> bool:
    return all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None)
