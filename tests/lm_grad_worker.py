"""One update's gradient of a tiny LM on a fixed global batch, for tests/test_llm_invariance.py: run alone or under
``accelerate launch``; every process takes its share of the batch, rank 0 writes the gradient to OUT.

    python tests/lm_grad_worker.py OUT AGGREGATION:MICRO_BATCH_SIZE:POLICY_LOSS [...]

One process computes every listed case (micro-batch size 0: the whole share) and saves {case: gradient}.
"""
import sys

import torch
from accelerate import Accelerator

from flowrl.llm.config import LLMConfig
from flowrl.llm.rollout import TextBatch
from flowrl.llm.tiny import char_tokenizer, tiny_lm
from flowrl.llm.update import backward_update

N, LP, LC = 12, 5, 7


def fixed_batch(vocab: int) -> tuple[TextBatch, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    prompt_len = torch.randint(2, LP + 1, (N,), generator=g)
    prompt_mask = (torch.arange(LP)[None] >= LP - prompt_len[:, None]).long()  # left padding
    prompt_ids = torch.randint(4, vocab, (N, LP), generator=g) * prompt_mask
    lengths = torch.randint(1, LC + 1, (N,), generator=g)  # completions of 1..LC tokens: unequal lengths
    completion_mask = (torch.arange(LC)[None] < lengths[:, None]).long()
    completion_ids = torch.randint(4, vocab, (N, LC), generator=g) * completion_mask
    adv = torch.randn(N, generator=g)
    noise = 0.3 * torch.randn(N, LC, generator=g)  # the sampling policy differed: ratios away from 1, some clipped
    batch = TextBatch(prompt_ids, prompt_mask, completion_ids, completion_mask, lengths == LC, torch.arange(N),
                      torch.zeros(N, LC))
    return batch, adv, noise


def main(out: str, cases: list[str]) -> None:
    acc = Accelerator(cpu=True)
    tok = char_tokenizer()
    model = tiny_lm(tok, seed=0, hidden=32, layers=2, heads=2, max_positions=16).eval()
    batch, adv, noise = fixed_batch(len(tok))
    from flowrl.llm.rollout import token_logprobs

    with torch.no_grad():
        logp_old = token_logprobs(model, batch, 1.0, torch.device("cpu")) + noise
    wrapped = acc.prepare(model)
    W, r = acc.num_processes, acc.process_index
    share = torch.arange(r * N // W, (r + 1) * N // W)
    grads = {}
    for case in cases:
        aggregation, micro, loss = case.split(":")
        cfg = LLMConfig()
        cfg.training.aggregation, cfg.training.policy_loss, cfg.model.max_completion_tokens = aggregation, loss, LC
        backward_update(wrapped, acc, batch.take(share), adv[share], logp_old[share], share, cfg,
                        int(micro) if int(micro) > 0 else N)
        grads[case] = {n: p.grad.clone() for n, p in acc.unwrap_model(wrapped).named_parameters()}
        wrapped.zero_grad(set_to_none=True)
    if acc.is_main_process:
        torch.save(grads, out)
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
