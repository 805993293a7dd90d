"""``flowrl eval`` for a language model: held-out greedy accuracy with its standard error, pass@k from ``--num``
samples, and with ``--baseline`` the paired gain over another eval on the same prompts. ``flowrl eval`` comes
here when ``--model`` is a causal LM (``toy:arith`` or a transformers folder); ``--lora`` is a peft adapter
folder (a run's ``lora/``), a full fine-tune's ``model/`` folder goes in ``--model``."""
from __future__ import annotations

import json
import math
from pathlib import Path

from flowrl.llm.model import TOY_LM, resolve
from flowrl.train.config import ConfigError


def is_language_model(path: str) -> bool:
    if path == TOY_LM:
        return True
    p = Path(path)
    if not (p / "config.json").is_file() or (p / "model_index.json").is_file():
        return False
    arch = json.loads((p / "config.json").read_text()).get("architectures") or []
    return any(a.endswith("ForCausalLM") for a in arch)


def _paired(now: list[float], base: list[float]) -> tuple[float, float]:
    d = [a - b for a, b in zip(now, base)]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / max(n - 1, 1)
    return mean, math.sqrt(var / n)


def eval_lm(args, prompts: list[str], metadata: list[dict]) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    import rewards
    from flowrl.llm.evaluation import evaluate
    from flowrl.llm.model import load_tokenizer

    baseline = json.loads(Path(args.baseline).read_text()) if args.baseline else None
    if baseline is not None and baseline.get("prompts") != prompts:
        raise ConfigError(f"--baseline: {args.baseline} was measured on other prompts")
    reward = rewards.MultiReward(args.rewards, json.loads(args.reward_kwargs) if args.reward_kwargs else None)
    metric = reward.names[0]
    source = args.lora or args.model
    tok = load_tokenizer(source if args.lora else args.model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(resolve(args.model)).to(device).eval()
    if args.lora:
        from peft import PeftModel

        if not (Path(args.lora) / "adapter_config.json").is_file():
            raise ConfigError(f"--lora: {args.lora} holds no peft adapter (adapter_config.json)")
        model = PeftModel.from_pretrained(model, args.lora).to(device).eval()
    row, solved = evaluate(model, tok, prompts, metadata, reward, metric, max_new=args.max_new_tokens,
                           chat_template=args.chat_template, device=device, pass_k=args.num if args.num > 1 else 0,
                           seed=args.seed, per_prompt=True)
    out = {"model": args.model, "lora": args.lora, "prompts": prompts, "metric": metric, "num": args.num,
           "seed": args.seed, "scores": row, "solved": solved}
    lines = [f"accuracy (greedy, {metric}): {100 * row['eval/accuracy']:.1f} ± {100 * row['eval/accuracy_se']:.1f} "
             f"over {len(prompts)} prompts"]
    if args.num > 1:
        lines.append(f"pass@{args.num}: {100 * row[f'eval/pass@{args.num}']:.1f} ± "
                     f"{100 * row[f'eval/pass@{args.num}_se']:.1f}; sampled accuracy "
                     f"{100 * row['eval/sampled_accuracy']:.1f}")
    if baseline is not None:
        gain, se = _paired(solved, baseline["solved"])
        out["gain_over_baseline"] = {"mean": gain, "stderr": se}
        lines.append(f"gain over {args.baseline}: {100 * gain:+.1f} ± {100 * se:.1f} points (paired by prompt)")
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "eval.json").write_text(json.dumps(out, indent=1))
    print("\n".join(lines) + f"\nflowrl: saved {folder / 'eval.json'}")
