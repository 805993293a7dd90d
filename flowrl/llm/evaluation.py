"""Held-out evaluation of a language model: greedy accuracy with its standard error, and pass@k from k samples.

A prompt counts as solved when the metric reward (``eval.metric``; default the recipe's first reward component)
scores at least 1 - 1e-6, the verdict of a 0 / 1 checker such as ``exact_answer``.
"""
from __future__ import annotations

import math

import torch

from flowrl.llm.model import format_prompts
from flowrl.llm.rollout import completion_mask, sampling_config

SOLVED = 1 - 1e-6


def with_lengths(metadata: list[dict], lengths: list[int], truncated: list[bool]) -> list[dict]:
    """The fields the trainer adds to every sample's metadata before rewards see it (rewards.text)."""
    return [{**m, "completion_tokens": int(n), "truncated": bool(t)} for m, n, t in zip(metadata, lengths, truncated)]


def complete(model, tokenizer, texts: list[str], max_new: int, device, *, sample: bool = False, k: int = 1,
             temperature: float = 1.0, seed: int = 0, batch_size: int = 256):
    """(completions, lengths, truncated) for every text, k per text in order when sampling, greedy otherwise."""
    outs, lengths, cut = [], [], []
    per = max(1, batch_size // k)
    for start in range(0, len(texts), per):
        enc = tokenizer(texts[start:start + per], return_tensors="pt", padding=True)
        ids = enc["input_ids"].repeat_interleave(k, 0).to(device)
        mask = enc["attention_mask"].repeat_interleave(k, 0).to(device)
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed + start)
            config = sampling_config(tokenizer, max_new, temperature if sample else None)
            seq = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        completion = seq[:, ids.shape[1]:].cpu()
        cmask, truncated = completion_mask(completion, tokenizer.eos_token_id)
        outs += tokenizer.batch_decode(completion, skip_special_tokens=True)
        lengths += cmask.sum(1).tolist()
        cut += truncated.tolist()
    return outs, lengths, cut


def _rate(solved: torch.Tensor) -> tuple[float, float]:
    p, n = float(solved.float().mean()), solved.numel()
    return p, math.sqrt(max(p * (1 - p), 0.0) / max(n - 1, 1))


def evaluate(model, tokenizer, prompts: list[str], metadata: list[dict], reward, metric: str, *, max_new: int,
             chat_template: bool, device, pass_k: int = 0, temperature: float = 1.0, seed: int = 1234,
             per_prompt: bool = False):
    """Greedy accuracy (``eval/accuracy`` and ``eval/accuracy_se``), every reward's greedy mean, and with
    ``pass_k`` the fraction of prompts solved by at least one of k samples (``eval/pass@k``). With
    ``per_prompt``: (that row, each prompt's greedy verdict as 0. / 1.)."""
    texts = format_prompts(tokenizer, prompts, chat_template)
    out, n, cut = complete(model, tokenizer, texts, max_new, device)
    scores = reward(out, list(prompts), with_lengths(metadata, n, cut))
    row = {f"eval/{k}_mean": float(v.mean()) for k, v in scores.items()}
    greedy = scores[metric] >= SOLVED
    row["eval/accuracy"], row["eval/accuracy_se"] = _rate(greedy)
    if pass_k:
        out, n, cut = complete(model, tokenizer, texts, max_new, device, sample=True, k=pass_k,
                               temperature=temperature, seed=seed)
        rep = [p for p in prompts for _ in range(pass_k)]
        meta = with_lengths([m for m in metadata for _ in range(pass_k)], n, cut)
        solved = (reward(out, rep, meta)[metric] >= SOLVED).reshape(len(prompts), pass_k)
        row[f"eval/pass@{pass_k}"], row[f"eval/pass@{pass_k}_se"] = _rate(solved.any(1))
        row["eval/sampled_accuracy"] = float(solved.float().mean())
    return (row, greedy.float().tolist()) if per_prompt else row
