"""A character-level tokenizer and a tiny Llama, both built in code, for the arithmetic task on CPU.

The tokenizer adds ``<s>`` in front of every encoded text (a post-processor, as Llama tokenizers do) and never
adds ``</s>``: ``tokenizer(prompts)`` gives the model exactly what it saw in pretraining before the answer, and
generation is stopped by the model emitting ``</s>`` (the model's ``eos_token_id``). Decoding with
``skip_special_tokens=True`` drops ``<s>``, ``</s>`` and ``<pad>`` and joins characters without spaces.
Characters outside the vocabulary encode to ``<unk>`` instead of vanishing, so a malformed prompt is visible.
"""
from __future__ import annotations

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = list("0123456789+-*= ")


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character of ``CHARS``; ids 0-3 are ``SPECIALS``; left padding for batched generation."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # Every character (newlines included) is its own piece, so WordLevel looks up single characters.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="left", model_max_length=64)


def tiny_lm(tokenizer, seed: int = 0, hidden: int = 128, layers: int = 4, heads: int = 4,
            max_positions: int = 32) -> LlamaForCausalLM:
    """A seeded, untrained LlamaForCausalLM over the tokenizer's vocabulary (tied embeddings, SwiGLU of 2x width)."""
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=max_positions, tie_word_embeddings=True,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, attention_dropout=0.0)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model
