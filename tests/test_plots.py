"""The reward curve: its running mean and the PNG a run leaves."""
from __future__ import annotations

import numpy as np

from flowrl.train.plots import _running_mean, reward_curve


def test_running_mean_is_trailing_over_two_percent():
    x = np.arange(100.0)  # window 2: (i - 1 + i) / 2, the first point alone
    assert np.allclose(_running_mean(x), np.r_[0.0, np.arange(1, 100) - 0.5])
    assert np.allclose(_running_mean(np.array([3.0, 5.0])), [3.0, 5.0])  # under 50 points: the points themselves
    assert _running_mean(np.array([])).shape == (0,)


def test_reward_curve_writes_a_png_with_skipped_and_eval_rows(tmp_path):
    rows = [{"iteration": i, "reward/r_mean": 0.01 * i, "reward/r_std": 0.1} for i in range(120)]
    rows[7] = {"iteration": 7, "skipped": "reward"}  # a skipped iteration has no reward
    rows[59]["eval/r_mean"] = 0.5
    out = reward_curve(rows, tmp_path / "reward_curve.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reward_curve.png"]  # no temporary file left
