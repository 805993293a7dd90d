"""The reward curve of a run, as a PNG a person can look at (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def reward_curve(rows: list[dict], path: str | Path) -> Path:
    """Training reward per iteration (faint), its running mean over ~2% of the run with a band of one batch std
    (a long run's per-iteration means are mostly batch noise), and eval rewards as points drawn on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(9, 4), dpi=110)
    comps = sorted({k[len("reward/"):-len("_mean")] for r in rows for k in r
                    if k.startswith("reward/") and k.endswith("_mean")})
    for name in comps:
        scored = [r for r in rows if f"reward/{name}_mean" in r]  # an iteration skipped for a NaN reward has none
        its = [r["iteration"] for r in scored]
        mean = np.array([r[f"reward/{name}_mean"] for r in scored])
        std = np.array([r.get(f"reward/{name}_std", 0.0) for r in scored])
        line, = ax.plot(its, mean, lw=0.6, alpha=0.3)
        smooth, band = _running_mean(mean), _running_mean(std)
        ax.plot(its, smooth, color=line.get_color(), label=f"train {name} (running mean)")
        ax.fill_between(its, smooth - band, smooth + band, color=line.get_color(), alpha=0.12, lw=0)
        ev = [(r["iteration"], r[f"eval/{name}_mean"]) for r in rows if f"eval/{name}_mean" in r]
        if ev:
            ax.plot(*zip(*ev), "o--", color=line.get_color(), mec="black", zorder=5,
                    label=f"eval {name} (ODE, held-out)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: the curves start top left
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path


def _running_mean(x: np.ndarray) -> np.ndarray:
    """Trailing mean over 2% of the points (at least 1); the first points average what exists so far."""
    window = max(1, len(x) // 50)
    c = np.cumsum(np.insert(x, 0, 0.0))
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)
