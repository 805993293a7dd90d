"""GSM8K's released jsonl (``{"question": ..., "answer": "... #### 42"}``, e.g. openai/grade-school-math's
``train.jsonl`` / ``test.jsonl``, downloaded by you) -> flowrl prompt files: ``{"prompt": question + the answer
format instruction, "answer": "42"}``, the format configs/llm_gsm8k_*.yaml read.

    python scripts/prepare_gsm8k.py path/to/gsm8k/train.jsonl data/gsm8k/train.jsonl
    python scripts/prepare_gsm8k.py path/to/gsm8k/test.jsonl data/gsm8k/test.jsonl
"""
import argparse
import json
from pathlib import Path

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def convert(row: dict, line: int) -> dict:
    if "question" not in row or "####" not in row.get("answer", ""):
        raise ValueError(f"line {line}: not a GSM8K row (needs 'question' and an 'answer' with '####')")
    answer = row["answer"].rsplit("####", 1)[1].strip().replace(",", "")
    return {"prompt": f"{row['question'].strip()}\n{INSTRUCTION}", "answer": answer}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source")
    ap.add_argument("out")
    args = ap.parse_args()
    rows = [convert(json.loads(line), i) for i, line in enumerate(Path(args.source).read_text().splitlines(), 1)
            if line.strip()]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(rows)} prompts -> {out}")


if __name__ == "__main__":
    main()
