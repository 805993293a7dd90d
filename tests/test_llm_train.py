"""The LLM trainer end to end on a random tiny LM: it runs and writes what the image trainer writes, resumes
exactly, keeps exactly the informative groups under DAPO's dynamic sampling, samples with log-probs training
reproduces, and refuses bad input (long prompts, tokenizers without pad token or chat template, rewards of the
wrong length) with one error naming it, or skips a NaN reward's update as the image trainer does."""
import json
from pathlib import Path

import pytest
import torch

from flowrl.llm.config import load_llm_config
from flowrl.llm.tiny import char_tokenizer, tiny_lm
from flowrl.train.config import ConfigError
from flowrl.train.guards import TrainingError

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "llm_toy_grpo.yaml"


def _register_length_reward():
    """A reward a random model's completions differ on (the checker gives them all 0: no advantage, no update)."""
    import rewards
    from rewards.text import TextReward

    @rewards.register("test_length")
    class Length(TextReward):
        def score(self, completions, prompts, metadata):
            return torch.tensor([float(len(c)) for c in completions])


_register_length_reward()


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("lm")
    tok = char_tokenizer()
    model = tiny_lm(tok, seed=0, hidden=32, layers=1, heads=2, max_positions=24)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _cfg(lm_dir, run, *sets):
    return load_llm_config(RECIPE, [f"model.path={lm_dir}", f"run.output_dir={run}", "run.progress=false",
                                    "run.iterations=2", "data.prompts_per_iteration=4", "generation.G=4",
                                    "eval.every=0", "training.micro_batch_size=8", "model.max_completion_tokens=6",
                                    *sets])


def _train(cfg, resume=None):
    from flowrl.llm.trainer import LMTrainer

    trainer = LMTrainer(cfg, resume=resume)
    trainer.train()
    return trainer


def _rows(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def test_trains_writes_and_resumes_exactly(lm_dir, tmp_path, one_thread):
    """4 iterations straight, and 2 + a resume to 4 (two updates per rollout, so old log-probs and the Adam state
    matter): the same metrics and bit-identical weights. LoRA output loads with peft."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    sets = ["finetune.mode=lora", "finetune.lora_rank=4", "training.updates_per_epoch=2", "training.lr=1e-2",
            "eval.every=2", "eval.num_prompts=8", "run.save_every=2"]
    straight = tmp_path / "straight"
    _train(_cfg(lm_dir, straight, "run.iterations=4", *sets))
    halves = tmp_path / "halves"
    _train(_cfg(lm_dir, halves, *sets))
    _train(_cfg(lm_dir, halves, "run.iterations=4", *sets), resume="latest")
    a, b = _rows(straight), _rows(halves)
    assert [r["iteration"] for r in b] == [0, 1, 2, 3]
    for ra, rb in zip(a, b):
        for k in ("reward/mean", "loss", "grad_norm", "eval/accuracy"):
            assert ra.get(k) == rb.get(k), (ra["iteration"], k)
    wa = load_file(str(straight / "lora" / "adapter_model.safetensors"))
    wb = load_file(str(halves / "lora" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(float(v.abs().max()) > 0 for k, v in wa.items() if "lora_B" in k)  # it trained
    assert (straight / "reward_curve.png").is_file() and (straight / "eval_before.json").is_file()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lm_dir), straight / "lora")
    assert model.generate(torch.tensor([[1, 5, 14]]), max_new_tokens=2).shape == (1, 5)


def test_dynamic_sampling_keeps_exactly_the_informative_groups(lm_dir, tmp_path, one_thread):
    """Same seed, same first rollout: without the filter the zero-advantage groups are counted, with it (one
    draw, so no refill) exactly those groups are dropped and none of the trained groups has zero advantages."""
    import rewards
    from rewards.text import TextReward

    @rewards.register("test_half_constant")
    class HalfConstant(TextReward):  # groups of prompts with an even answer agree, the others spread
        def score(self, completions, prompts, metadata):
            return torch.tensor([1.0 if int(m["answer"]) % 2 == 0 else float(len(c)) for c, m in
                                 zip(completions, metadata)])

    sets = ["run.iterations=1", "data.prompts_per_iteration=8", "rewards.components=test_half_constant:1.0",
            "training.algorithm=dapo", "data.max_draws=1"]
    _train(_cfg(lm_dir, tmp_path / "off", *sets, "data.dynamic_sampling=false"))
    _train(_cfg(lm_dir, tmp_path / "on", *sets))
    off, on = _rows(tmp_path / "off")[0], _rows(tmp_path / "on")[0]
    assert off["groups/kept"] == 8 and 0 < off["adv/zero_groups"] < 8, off
    assert on["groups/drawn"] == 8 and on["groups/kept"] == 8 - off["adv/zero_groups"]
    assert on["adv/zero_groups"] == 0 and on["groups/trained"] == on["groups/kept"]


def test_rollout_log_probs_are_what_training_computes(lm_dir, one_thread):
    from transformers import AutoModelForCausalLM

    from flowrl.llm.config import GenerationConfig
    from flowrl.llm.model import load_tokenizer
    from flowrl.llm.rollout import rollout, token_logprobs

    tok = load_tokenizer(str(lm_dir))
    model = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    # a model's own generation defaults must not change the sampling policy (Qwen's file sets top_k, top_p and a
    # repetition penalty): the rollout builds its whole generation config
    model.generation_config.top_k, model.generation_config.repetition_penalty = 2, 3.0
    texts = ["1+2=", "123+456=", "9+99="]  # unequal prompt lengths: left padding must not shift positions
    for gen in (GenerationConfig(G=3), GenerationConfig(G=3, temperature=0.6)):
        batch = rollout(model, tok, texts, 3, gen, 6, seed=0, iteration=0, rank=0)
        with torch.no_grad():
            logp = token_logprobs(model, batch, gen.temperature, torch.device("cpu"))
        m = batch.completion_mask.bool()
        torch.testing.assert_close(logp[m], batch.logp_rollout[m], atol=1e-5, rtol=0)
        again = rollout(model, tok, texts, 3, gen, 6, seed=0, iteration=0, rank=0)
        assert torch.equal(again.completion_ids, batch.completion_ids)  # seeded by identity


def test_bad_input_fails_before_generation(lm_dir, tmp_path, one_thread):
    from flowrl.llm.trainer import LMTrainer

    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "1" * 40 + "+1=", "answer": "2"}) + "\n")
    with pytest.raises(ConfigError, match="prompt 0 has 44 tokens, above model.max_prompt_tokens"):
        LMTrainer(_cfg(lm_dir, tmp_path / "a", f"data.train_prompts={long}"))
    with pytest.raises(ConfigError, match="exceeds the model's context"):
        LMTrainer(_cfg(lm_dir, tmp_path / "b", "model.max_prompt_tokens=20"))
    with pytest.raises(ConfigError, match="has no chat template"):
        LMTrainer(_cfg(lm_dir, tmp_path / "c", "model.chat_template=true"))
    nopad = tmp_path / "nopad"
    tok = char_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(nopad)
    (nopad / "config.json").write_text((lm_dir / "config.json").read_text())
    with pytest.raises(ConfigError, match="has no pad token"):
        LMTrainer(_cfg(nopad, tmp_path / "d"))
    with pytest.raises(ConfigError, match="scores images"):
        _cfg(lm_dir, tmp_path / "e", "rewards.components=brightness:1.0")
    with pytest.raises(ConfigError, match="generation.G: a group needs at least 2"):
        _cfg(lm_dir, tmp_path / "f", "generation.G=1")
    for run in "abcd":
        assert not (tmp_path / run).exists()  # refused before a run folder was made


def test_bad_reward_output_is_named_or_skipped(lm_dir, tmp_path, one_thread, monkeypatch):
    import rewards
    from rewards.text import TextReward

    @rewards.register("test_short_text")
    class Short(TextReward):
        def score(self, completions, prompts, metadata):
            return torch.zeros(len(completions) - 1)

    @rewards.register("test_nan_text")
    class Nan(TextReward):
        def score(self, completions, prompts, metadata):
            return torch.full((len(completions),), float("nan"))

    with pytest.raises(TrainingError, match="test_short_text.*has shape \\(15,\\), expected \\(16,\\)"):
        _train(_cfg(lm_dir, tmp_path / "short", "rewards.components=test_short_text:1.0"))
    with pytest.raises(TrainingError, match="2 iterations in a row skipped"):
        _train(_cfg(lm_dir, tmp_path / "nan", "rewards.components=test_nan_text:1.0", "run.iterations=3",
                    "training.max_consecutive_skips=2"))
    rows = _rows(tmp_path / "nan")
    assert [r["skipped"] for r in rows] == ["reward", "reward"] and rows[0]["skipped_prompts"]


def test_two_processes_train_together(lm_dir, tmp_path):
    """accelerate launch with 2 (gloo) processes and DAPO's refills: the collectives line up (draws gathered,
    stats of unequal token counts reduced), metrics written once, every trained batch whole groups."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), "-m", "flowrl.cli", "train", str(RECIPE), "--set", f"model.path={lm_dir}", "--set",
           f"run.output_dir={run}", "--set", "run.iterations=2", "--set", "eval.every=2", "--set",
           "eval.num_prompts=8", "--set", "run.progress=false", "--set", "training.algorithm=dapo", "--set",
           "rewards.components=answer_format:1.0", "--set", "model.max_completion_tokens=6"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = _rows(run)
    assert [r["world_size"] for r in rows] == [2, 2] and "eval/accuracy" in rows[-1]
    assert all(r["groups/trained"] % 2 == 0 and r["groups/trained"] <= r["groups/kept"] for r in rows)
    assert (run / "model" / "config.json").is_file()


@pytest.mark.parametrize("sets,expect", [
    # KL in the loss: k3 against the adapter-off base, k2 against a frozen copy; the second update sees a moved
    # policy, so the KL must be positive (a reference that is the trained model would give exactly 0)
    (["training.algorithm=grpo", "training.kl_beta=0.04", "training.updates_per_epoch=2", "training.lr=1e-2",
      "rewards.components=test_length:1.0"], "kl"),
    (["training.algorithm=dr_grpo"], "loss"), (["training.algorithm=gspo", "training.updates_per_epoch=2"], "loss"),
    (["training.algorithm=gmpo"], "loss"), (["training.algorithm=cispo"], "loss"),
    (["training.algorithm=rloo"], "loss"),
    (["training.algorithm=reinforce_pp_baseline", "finetune.mode=full", "training.kl_beta=0.001",
      "training.updates_per_epoch=2", "training.lr=1e-2", "rewards.components=test_length:1.0"], "kl"),
    (["training.kl_beta=0.1", "training.kl_in_reward=true", "training.kl=k1", "finetune.mode=full"], "loss"),
    (["generation.mismatch={level: token, mode: truncate, clip_max: 2.0}", "generation.top_k=5"], "is_weight_mean"),
    (["training.mask_truncated=true"], "loss"),
    (["finetune.gradient_checkpointing=true", "rewards.components=test_length:1.0"], "loss"),  # LoRA grads flow
], ids=lambda s: " ".join(s) if isinstance(s, list) else s)
def test_every_named_part_trains(lm_dir, tmp_path, one_thread, sets, expect):
    _train(_cfg(lm_dir, tmp_path / "run", "finetune.mode=lora", "finetune.lora_rank=4", "run.iterations=1", *sets))
    row = _rows(tmp_path / "run")[0]
    assert "skipped" not in row and row["grad_norm"] == row["grad_norm"], row  # an update happened, finite
    if "rewards.components=test_length:1.0" in sets:
        assert row["grad_norm"] > 0
    assert expect in row and row[expect] == row[expect]
    if expect == "kl":
        assert row["kl"] > 0
    if expect == "is_weight_mean":  # top-k truncates the sampler: weights differ from 1, the ratio does not
        assert 0 < row["is_weight_mean"] and row["ratio_mean"] == pytest.approx(1.0, abs=1e-5)


def test_flowrl_eval_on_a_language_model(lm_dir, tmp_path, capsys, one_thread):
    """``flowrl eval`` takes a causal LM (a folder, or a peft adapter on one): greedy accuracy, pass@k, and the
    paired gain over a baseline eval on the same prompts; another prompt set is refused as a baseline."""
    from flowrl.cli import main
    from flowrl.llm.cli_eval import is_language_model

    assert is_language_model(str(lm_dir)) and is_language_model("toy:arith") and not is_language_model("tiny:sd3")
    run = tmp_path / "run"
    _train(_cfg(lm_dir, run, "finetune.mode=lora", "finetune.lora_rank=4", "run.iterations=1"))
    prompts = str(ROOT / "flowrl" / "data" / "prompts" / "arith_heldout.jsonl")
    common = ["--prompts", prompts, "--num-prompts", "12", "--rewards", "exact_answer", "--max-new-tokens", "6"]
    assert main(["eval", "--model", str(lm_dir), *common, "--num", "3", "--out", str(tmp_path / "base")]) == 0
    assert "pass@3:" in capsys.readouterr().out
    assert main(["eval", "--model", str(lm_dir), "--lora", str(run / "lora"), *common, "--out", str(tmp_path / "b"),
                 "--baseline", str(tmp_path / "base" / "eval.json")]) == 0
    out = json.loads((tmp_path / "b" / "eval.json").read_text())
    assert len(out["solved"]) == 12 and "gain_over_baseline" in out
    assert main(["eval", "--model", str(lm_dir), *common[:2], "--num-prompts", "5", *common[4:], "--out",
                 str(tmp_path / "c"), "--baseline", str(tmp_path / "base" / "eval.json")]) == 2
    assert "measured on other prompts" in capsys.readouterr().err


def test_a_non_finite_loss_skips_the_update_naming_its_prompt(lm_dir, tmp_path, one_thread, monkeypatch):
    from flowrl import core

    def nan_first(logp, logp_old, adv, *, seq_ids=None, **kw):  # NaN on the first sequence of each micro-batch
        loss, stats = core.POLICY_LOSSES["clip"](logp, logp_old, adv, seq_ids=seq_ids, **kw)
        return torch.where(seq_ids == seq_ids.min(), torch.full_like(loss, float("nan")), loss), stats

    nan_first.requires, nan_first.sequence_level = (), False
    monkeypatch.setitem(core.POLICY_LOSSES, "test_nan_first", nan_first)
    with pytest.raises(TrainingError, match="1 iterations in a row skipped"):
        _train(_cfg(lm_dir, tmp_path / "run", "training.policy_loss=test_nan_first", "run.iterations=2",
                    "training.max_consecutive_skips=1", "training.micro_batch_size=16"))
    row = _rows(tmp_path / "run")[0]
    assert row["skipped"] == "loss" and len(row["skipped_prompts"]) == 1  # one micro-batch, one sequence, one prompt
    assert (tmp_path / "run" / "checkpoints").is_dir()
