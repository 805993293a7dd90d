"""Benchmark tables from per-image result rows ({"index", "sample", "prompt", "tag"?, score keys...}).

``geneval_summary`` is what GenEval's ``evaluation/summary_scores.py`` prints: images, prompts, the share of
correct images, the share of prompts with at least one correct image, each task's share of correct images (tasks
in order of first appearance, as its ``groupby(sort=False)``) and the overall score, the mean over tasks.
"""
from __future__ import annotations

import math


def _by_prompt(rows: list[dict], key: str) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for r in rows:
        out.setdefault(r["index"], []).append(float(r[key]))
    return out


def score_table(rows: list[dict], keys: list[str]) -> dict:
    """Per score: mean over images, std over images, and the standard error of the mean clustered by prompt (a
    prompt's images share its difficulty, so they are not independent draws); images and prompts counted."""
    table = {}
    for k in keys:
        x = [float(r[k]) for r in rows]
        n = len(x)
        mean = sum(x) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in x) / (n - 1)) if n > 1 else 0.0
        per_prompt = [sum(v) / len(v) for v in _by_prompt(rows, k).values()]
        m = len(per_prompt)
        se = (math.sqrt(sum((v - mean) ** 2 for v in per_prompt) / (m - 1)) / math.sqrt(m)) if m > 1 else 0.0
        table[k] = {"mean": mean, "std": std, "stderr": se, "images": n, "prompts": m}
    return table


def geneval_summary(rows: list[dict], key: str) -> dict:
    """GenEval's summary of the 0/1 verdicts ``row[key]`` (see the module docstring)."""
    tasks: dict[str, list[float]] = {}
    for r in rows:
        tasks.setdefault(r["tag"], []).append(float(r[key]))
    per_prompt = _by_prompt(rows, key)
    table = {tag: {"accuracy": sum(v) / len(v), "correct": int(sum(v)), "images": len(v)} for tag, v in tasks.items()}
    return {"images": len(rows), "prompts": len(per_prompt),
            "correct_images": sum(float(r[key]) for r in rows) / len(rows),
            "correct_prompts": sum(any(v) for v in per_prompt.values()) / len(per_prompt),
            "tasks": table, "overall": sum(t["accuracy"] for t in table.values()) / len(table)}


def format_geneval(summaries: dict[str, dict]) -> list[str]:
    """One markdown table: a row per task, a column per verdict (e.g. strict, then GenEval's rule)."""
    names = list(summaries)
    first = summaries[names[0]]
    lines = ["| task | " + " | ".join(names) + " | images |", "|---|" + "---:|" * (len(names) + 1)]
    for tag in first["tasks"]:
        cells = [f"{s['tasks'][tag]['accuracy']:.2%} ({s['tasks'][tag]['correct']} / {s['tasks'][tag]['images']})"
                 for s in summaries.values()]
        lines.append(f"| {tag} | " + " | ".join(cells) + f" | {first['tasks'][tag]['images']} |")
    overall = " | ".join(f"**{s['overall']:.5f}**" for s in summaries.values())
    lines.append(f"| **overall (mean over tasks)** | {overall} | {first['images']} |")
    lines.append("| correct images | " + " | ".join(f"{s['correct_images']:.2%}" for s in summaries.values()) + " | |")
    lines.append("| prompts with a correct image | " + " | ".join(f"{s['correct_prompts']:.2%}"
                                                           for s in summaries.values()) + " | |")
    return lines


def format_scores(table: dict) -> list[str]:
    lines = ["| score | mean | std | stderr (by prompt) | images | prompts |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {k} | {r['mean']:.4f} | {r['std']:.4f} | {r['stderr']:.4f} | {r['images']} | {r['prompts']} |"
              for k, r in table.items()]
    return lines


def format_gains(gains: dict, baseline: str) -> list[str]:
    names = list(gains["overall"])
    lines = [f"Gain over {baseline} (same prompts, samples and seeds; standard errors clustered by prompt):", "",
             "| category | prompts | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for cat, row in gains.items():
        lines.append(f"| {cat} | {row[names[0]]['prompts']} | "
                     + " | ".join(f"{row[k]['gain']:+.4f} ± {row[k]['stderr']:.4f}" for k in names) + " |")
    return lines


__all__ = ["format_gains", "format_geneval", "format_scores", "geneval_summary", "score_table"]
