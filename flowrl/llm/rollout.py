"""Rollouts of a causal LM and the token log-probs training needs: the text counterpart of flowrl.sampling.

A rollout is a ``TextBatch``: each prompt repeated G times (left-padded), its sampled completion (right-padded,
the mask covering the tokens up to and including eos), and the sampler's own log-probs. The policy trained is
``softmax(logits / temperature)`` over the full vocabulary, as trl and verl train it; with top-k / top-p the
sampler draws from a truncated distribution, whose log-probs the batch records (``logp_rollout``) so that
``generation.mismatch`` can weight the difference (flowrl.core.mismatch_weights).

Seeding: one generator per (run seed, iteration, process, draw, chunk), so a rollout repeats exactly on resume.
Unlike the image rollouts, noise is not keyed by prompt: ``generate`` draws for the whole batch at once.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import GenerationConfig

from flowrl.sampling.seeding import derive_seed


@dataclass
class TextBatch:
    prompt_ids: Tensor        # (N, Lp) left-padded prompt tokens, one row per completion
    prompt_mask: Tensor       # (N, Lp)
    completion_ids: Tensor    # (N, Lc) right-padded
    completion_mask: Tensor   # (N, Lc) 1 on the generated tokens up to and including eos
    truncated: Tensor         # (N,) bool: hit the length limit without eos
    prompt: Tensor            # (N,) local prompt position
    logp_rollout: Tensor      # (N, Lc) the sampler's log-probs of its tokens (0 on padding)

    def __len__(self) -> int:
        return int(self.prompt.shape[0])

    @property
    def lengths(self) -> Tensor:
        return self.completion_mask.sum(1)

    def take(self, idx: Tensor) -> "TextBatch":
        return TextBatch(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})


def _pad_right(x: Tensor, width: int, value) -> Tensor:
    return F.pad(x, (0, width - x.shape[1]), value=value) if x.shape[1] < width else x


def concat(batches: list[TextBatch], pad_id: int) -> TextBatch:
    """Batches of one process joined; prompts left-padded and completions right-padded to common widths."""
    lp = max(b.prompt_ids.shape[1] for b in batches)
    lc = max(b.completion_ids.shape[1] for b in batches)

    def left(x, value):
        return F.pad(x, (lp - x.shape[1], 0), value=value)

    return TextBatch(
        prompt_ids=torch.cat([left(b.prompt_ids, pad_id) for b in batches]),
        prompt_mask=torch.cat([left(b.prompt_mask, 0) for b in batches]),
        completion_ids=torch.cat([_pad_right(b.completion_ids, lc, pad_id) for b in batches]),
        completion_mask=torch.cat([_pad_right(b.completion_mask, lc, 0) for b in batches]),
        truncated=torch.cat([b.truncated for b in batches]),
        prompt=torch.cat([b.prompt for b in batches]),
        logp_rollout=torch.cat([_pad_right(b.logp_rollout, lc, 0.0) for b in batches]))


def completion_mask(completion_ids: Tensor, eos_id: int) -> tuple[Tensor, Tensor]:
    """(mask over the tokens up to and including the first eos, truncated: no eos at all)."""
    is_eos = completion_ids == eos_id
    has_eos = is_eos.any(1)
    none = torch.full_like(has_eos, completion_ids.shape[1], dtype=torch.long)
    first = torch.where(has_eos, is_eos.int().argmax(1), none)
    pos = torch.arange(completion_ids.shape[1], device=completion_ids.device)
    return (pos[None] <= first[:, None]).long(), ~has_eos


def sampling_config(tokenizer, max_new: int, temperature: float | None = None, top_p: float = 1.0,
                    top_k: int = 0) -> GenerationConfig:
    """The whole generation config, built here: a model's own generation_config.json (Qwen's sets top_p 0.8,
    top_k 20, repetition_penalty 1.05) would otherwise change the sampling policy behind the trainer's back.
    ``temperature=None``: greedy."""
    common = {"max_new_tokens": max_new, "pad_token_id": tokenizer.pad_token_id,
              "eos_token_id": tokenizer.eos_token_id, "repetition_penalty": 1.0}
    if temperature is None:
        return GenerationConfig(do_sample=False, **common)
    return GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k, **common)


def generate(model, tokenizer, texts: list[str], prompt_index: list[int], G: int, gen, max_new: int, seed: int,
             device) -> TextBatch:
    """G sampled completions per text with transformers ``generate`` (``gen``: the generation section)."""
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    ids = enc["input_ids"].repeat_interleave(G, 0).to(device)
    mask = enc["attention_mask"].repeat_interleave(G, 0).to(device)
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=mask, return_dict_in_generate=True, output_scores=True,
                             generation_config=sampling_config(tokenizer, max_new, gen.temperature, gen.top_p,
                                                               gen.top_k))
    completion = out.sequences[:, ids.shape[1]:]
    cmask, truncated = completion_mask(completion, tokenizer.eos_token_id)
    # the sampler's distribution: scores after temperature and top-k / top-p, one (N, V) per generated position
    scores = torch.stack(out.scores, 1).float()
    logp = torch.log_softmax(scores, -1).gather(-1, completion[..., None]).squeeze(-1)
    logp = torch.where(cmask.bool(), logp, torch.zeros_like(logp))
    prompt = torch.tensor(prompt_index).repeat_interleave(G)
    return TextBatch(ids.cpu(), mask.cpu(), completion.cpu(), cmask.cpu(), truncated.cpu(), prompt, logp.cpu())


def rollout(model, tokenizer, texts: list[str], G: int, gen, max_new: int, *, seed: int, iteration: int, rank: int,
            draw: int = 0, device=None, offset: int = 0) -> TextBatch:
    """Completions of every text in chunks of ``gen.max_batch`` sequences (whole prompts per chunk)."""
    device = device or torch.device("cpu")
    per = max(1, (gen.max_batch or G * len(texts)) // G)
    parts = []
    for c, start in enumerate(range(0, len(texts), per)):
        parts.append(generate(model, tokenizer, texts[start:start + per],
                              list(range(offset + start, offset + min(start + per, len(texts)))), G, gen, max_new,
                              derive_seed(seed, iteration, rank, draw, c, "generate"), device))
    return concat(parts, tokenizer.pad_token_id)


def token_logprobs(model, batch: TextBatch, temperature: float, device, entropy: bool = False):
    """Log-probs of the completion tokens under ``softmax(logits / temperature)``, (N, Lc) float32, and the mean
    token entropy when asked. Positions count from the first real prompt token (as ``generate`` counts them
    with left padding), so the values are the sampler's up to float rounding."""
    lc = int(batch.completion_mask.sum(1).max()) if len(batch) else 0
    lc = max(lc, 1)
    ids = torch.cat([batch.prompt_ids, batch.completion_ids[:, :lc]], 1).to(device)
    attn = torch.cat([batch.prompt_mask, batch.completion_mask[:, :lc]], 1).to(device)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=lc + 1).logits
    logits = logits[:, :-1].float() / temperature
    logp_all = torch.log_softmax(logits, -1)
    tokens = batch.completion_ids[:, :lc].to(device)
    logp = logp_all.gather(-1, tokens[..., None]).squeeze(-1)
    width = batch.completion_ids.shape[1]
    logp = F.pad(logp, (0, width - lc))
    if not entropy:
        return logp
    m = batch.completion_mask[:, :lc].to(device).float()
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, ((ent * m).sum() / m.sum().clamp(min=1)).detach()
