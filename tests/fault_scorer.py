"""A reward-server scorer for the fault-tolerance tests: mean brightness of the uint8 images, numpy only, so a
server restarts in well under a second (``python -m rewards.server --scorer fault_scorer:brightness``, with
tests/ on PYTHONPATH)."""
import numpy as np


def brightness(images, prompts, metadata):
    return {"score": (np.asarray(images, dtype=np.float64).mean(axis=(1, 2, 3)) / 255.0).tolist()}
