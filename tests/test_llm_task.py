"""The arithmetic task, its character tokenizer, the shipped tiny base and deterministic pretraining."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import flowrl.llm.pretrain as pretrain_module  # noqa: E402
from flowrl.llm import task  # noqa: E402
from flowrl.llm.pretrain import PretrainConfig, encode_examples, evaluate, pretrain  # noqa: E402
from flowrl.llm.tiny import char_tokenizer, tiny_lm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "flowrl" / "data" / "prompts"
BASE = ROOT / "flowrl" / "llm" / "base"


def _pairs(split):
    return {tuple(map(int, p["prompt"][:-1].split("+"))) for p in task.problems(split)}


def test_split_is_fixed_disjoint_and_well_formed():
    train, heldout = task.problems("train"), task.problems("heldout")
    assert (len(train), len(heldout)) == (task.TRAIN_SIZE, task.HELDOUT_SIZE) == (5000, 500)
    assert task.problems("heldout") == heldout and task.problems("train", 7) == train[:7]
    assert not _pairs("train") & _pairs("heldout")
    assert len(_pairs("train")) == len(train)
    for p in train + heldout:
        a, b = map(int, p["prompt"][:-1].split("+"))
        assert p["answer"] == str(a + b) and 2 <= len(p["answer"]) <= 4
        assert p["tag"] == f"carry{task.carries(a, b)}"
    assert {p["tag"] for p in heldout} == {"carry0", "carry1", "carry2", "carry3"}
    with pytest.raises(ValueError):
        task.problems("test")


def test_carries():
    assert [task.carries(*ab) for ab in [(123, 456), (5, 5), (999, 1), (95, 7), (450, 550)]] == [0, 1, 3, 2, 2]


def test_shipped_prompt_files_match_the_generator(tmp_path):
    for path in task.write_prompt_files(tmp_path):
        assert path.read_text() == (PROMPTS / path.name).read_text(), path.name


def test_parse_answer_format_rule():
    assert task.parse_answer("1258") == "1258"
    assert task.parse_answer("  471\n") == "471"
    for bad in ["", "  ", "12a", "1 2", "-5", "+12", "12=", "1.0", "\u0661\u0662"]:  # the last: Arabic-Indic digits
        assert task.parse_answer(bad) is None, bad


def test_char_tokenizer_round_trips(tmp_path):
    tok = char_tokenizer()
    ids = tok("864+394=").input_ids
    assert ids[0] == tok.bos_token_id and len(ids) == 9 and tok.eos_token_id not in ids
    tok.save_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    assert tok2.padding_side == "left"
    assert (tok2.bos_token, tok2.eos_token, tok2.pad_token, tok2.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    enc = tok2(["1+2=", "864+394="], return_tensors="pt", padding=True)
    assert enc.input_ids.tolist() == tok(["1+2=", "864+394="], return_tensors="pt", padding=True).input_ids.tolist()
    assert enc.attention_mask[0].tolist() == [0] * 4 + [1] * 5  # left padded
    assert tok2.batch_decode(enc.input_ids, skip_special_tokens=True) == ["1+2=", "864+394="]
    assert tok2.decode(tok2("12 - 3*4=").input_ids + [tok2.eos_token_id], skip_special_tokens=True) == "12 - 3*4="
    unk = tok2("7a\n").input_ids
    assert unk == [tok2.bos_token_id, tok2.convert_tokens_to_ids("7"), tok2.unk_token_id, tok2.unk_token_id]


def test_encode_examples_masks_the_prompt():
    tok = char_tokenizer()
    ids, labels = encode_examples(tok, [{"prompt": "1+2=", "answer": "3"}, {"prompt": "10+20=", "answer": "30"}])
    assert tok.decode(ids[0]) == "<s>1+2=3</s><pad><pad><pad>"
    assert tok.decode(labels[0][labels[0] >= 0]) == "3</s>"
    assert tok.decode(labels[1][labels[1] >= 0]) == "30</s>"


def test_tiny_lm_reloads_and_generates(tmp_path, one_thread):
    tok = char_tokenizer()
    model = tiny_lm(tok, seed=0, hidden=32, layers=1, heads=2)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert (again.config.pad_token_id, again.config.bos_token_id, again.config.eos_token_id) == (0, 1, 2)
    sd, sd2 = model.state_dict(), again.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    r = evaluate(again, tok, task.problems("heldout", 8), greedy=False, k=2, seed=0)
    assert r["n"] == 8 and 0 <= r["accuracy"] <= 1


def test_shipped_base_is_in_the_target_band(one_thread):
    tok = AutoTokenizer.from_pretrained(BASE)
    model = AutoModelForCausalLM.from_pretrained(BASE)
    assert sum(f.stat().st_size for f in BASE.iterdir()) < 5e6
    r = evaluate(model, tok, task.problems("heldout", 100))
    # Undertrained on purpose: RL must have room to raise it (the acceptance band is 15-50%).
    assert 0.15 <= r["accuracy"] <= 0.5, r


def test_pretraining_is_deterministic():
    cfg = PretrainConfig(steps=20, batch=16, hidden=32, layers=1, heads=2, train_size=200, warmup=5)
    sd1 = pretrain(cfg)[0].state_dict()
    sd2 = pretrain(cfg)[0].state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    init = tiny_lm(char_tokenizer(), seed=0, hidden=32, layers=1, heads=2).state_dict()
    assert not torch.equal(init["model.embed_tokens.weight"], sd1["model.embed_tokens.weight"])  # it trained


def test_target_accuracy_stops_at_the_first_check_that_reaches_it(monkeypatch):
    accs = iter([0.1, 0.2, 0.35, 0.9])
    monkeypatch.setattr(pretrain_module, "evaluate", lambda *a, **k: {"accuracy": next(accs)})
    cfg = PretrainConfig(steps=100, batch=8, hidden=32, layers=1, heads=2, train_size=50, warmup=1,
                         target_accuracy=0.3, check_every=3, probe_n=10)
    hist = pretrain(cfg)[2]
    assert hist["steps"] == 9 and hist["probe"] == [[3, 0.1], [6, 0.2], [9, 0.35]]
