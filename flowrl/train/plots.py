"""The reward curve of a run, as a PNG a person can look at (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path


def reward_curve(rows: list[dict], path: str | Path) -> Path:
    """Training reward per iteration (mean with a band of one std of the batch) and eval rewards as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    comps = sorted({k[len("reward/"):-len("_mean")] for r in rows for k in r
                    if k.startswith("reward/") and k.endswith("_mean")})
    for name in comps:
        scored = [r for r in rows if f"reward/{name}_mean" in r]  # an iteration skipped for a NaN reward has none
        its = [r["iteration"] for r in scored]
        mean = [r[f"reward/{name}_mean"] for r in scored]
        std = [r.get(f"reward/{name}_std", 0.0) for r in scored]
        line, = ax.plot(its, mean, label=f"train {name}")
        ax.fill_between(its, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=line.get_color(), alpha=0.15)
        ev = [(r["iteration"], r[f"eval/{name}_mean"]) for r in rows if f"eval/{name}_mean" in r]
        if ev:
            ax.plot(*zip(*ev), "o--", color=line.get_color(), label=f"eval {name} (ODE, held-out)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path
