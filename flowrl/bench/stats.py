"""Summary statistics of benchmark and eval scores: per-category means with standard errors, GenEval's overall
figure (the mean of category means), and paired gains against a baseline scored on the same prompts and seeds."""
from __future__ import annotations

import torch


def paired_gains(scores: dict, baseline: dict, prompts: list[str], tags: list[str] | None) -> dict:
    """Mean score differences against a baseline scored on the same prompts and seeds, per category (when
    ``tags``) and overall (GenEval's mean of category means). Standard errors are clustered by prompt: a
    prompt's images share its difficulty, so they are not independent draws."""
    keys = [k for k in scores if k in baseline]
    index = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
    pid = torch.tensor([index[p] for p in prompts])
    cats = sorted(set(tags)) if tags else ["all"]
    labels = tags if tags else ["all"] * len(prompts)

    def stats(d: torch.Tensor, mask: torch.Tensor) -> dict:
        ids, inverse = torch.unique(pid[mask], return_inverse=True)
        per_prompt = torch.zeros(len(ids), dtype=torch.float64).index_add_(0, inverse, d[mask])
        per_prompt /= torch.bincount(inverse, minlength=len(ids)).double()
        se = float(per_prompt.std() / len(ids) ** 0.5) if len(ids) > 1 else 0.0
        return {"gain": float(d[mask].mean()), "stderr": se, "prompts": len(ids)}

    out = {}
    for c in cats:
        mask = torch.tensor([t == c for t in labels])
        out[c] = {k: stats(scores[k].double() - baseline[k].double(), mask) for k in keys}
    out["overall"] = {k: {"gain": sum(out[c][k]["gain"] for c in cats) / len(cats),
                          "stderr": sum(out[c][k]["stderr"] ** 2 for c in cats) ** 0.5 / len(cats),
                          "prompts": len(index)} for k in keys}
    return out


def category_stats(scores: dict, tags: list[str]) -> dict:
    """Per-category mean and standard error of every score, and GenEval's overall figure: the mean of the
    category means, its standard error combined from the categories' (images treated as independent)."""
    cats = sorted(set(tags))
    out = {}
    for c in cats:
        mask = torch.tensor([t == c for t in tags])
        out[c] = {"n": int(mask.sum())}
        for name, v in scores.items():
            x = v[mask].double()
            out[c][name] = {"mean": float(x.mean()), "stderr": float(x.std() / len(x) ** 0.5) if len(x) > 1 else 0.0}
    overall = {"n": len(tags)}
    for name in scores:
        overall[name] = {"mean": sum(out[c][name]["mean"] for c in cats) / len(cats),
                         "stderr": sum(out[c][name]["stderr"] ** 2 for c in cats) ** 0.5 / len(cats)}
    out["overall (mean of categories)"] = overall
    return out


__all__ = ["category_stats", "paired_gains"]
