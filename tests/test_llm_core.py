"""The core entries the language-model side added, against hand values and closed forms: GSPO's sequence ratio,
GMPO's sign-aware geometric mean, CISPO's capped weight, RLOO and REINFORCE++-baseline advantages, mismatch
weights, the text rewards, the algorithm presets; and both trainers resolving every name to the same objects."""
import ast
import math
from pathlib import Path

import pytest
import torch

import rewards
from flowrl.core import (
    ADVANTAGE_ESTIMATORS,
    AGGREGATION_WEIGHTS,
    KL_FORMS,
    POLICY_LOSSES,
    group_advantages,
    mismatch_weights,
)
from flowrl.train.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _seq_batch():
    # two sequences of 3 and 2 tokens, flattened
    seq = torch.tensor([0, 0, 0, 1, 1])
    old = torch.tensor([-1.0, -2.0, -0.5, -1.5, -0.7], dtype=torch.float64)
    delta = torch.tensor([0.3, -0.1, 0.4, -0.6, 0.2], dtype=torch.float64)  # log w per token
    return seq, old, delta


def test_gspo_is_one_clipped_ratio_per_sequence():
    seq, old, delta = _seq_batch()
    logp = (old + delta).requires_grad_()
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    loss, _ = POLICY_LOSSES["gspo"](logp, old, adv, eps_low=0.1, eps_high=0.15, seq_ids=seq)
    s0, s1 = math.exp(0.6 / 3), math.exp(-0.4 / 2)  # 1.2214 (clipped at 1.15 for A > 0), 0.8187 (< 0.9: A < 0 clips)
    want = torch.tensor([-1.15] * 3 + [0.9] * 2, dtype=torch.float64)
    torch.testing.assert_close(loss, want)
    assert s0 > 1.15 and s1 < 0.9
    loss.sum().backward()
    assert torch.equal(logp.grad, torch.zeros_like(logp))  # both sequences clipped: no gradient at all
    # inside the range every token of the sequence shares the sequence's gradient s_i * A / |o_i|
    logp2 = (old + delta / 10).requires_grad_()
    loss2, _ = POLICY_LOSSES["gspo"](logp2, old, adv, eps_low=0.1, seq_ids=seq)
    loss2.sum().backward()
    s0 = math.exp(0.06 / 3)
    torch.testing.assert_close(logp2.grad[:3], torch.full((3,), -s0 * 3 / 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="seq_ids"):
        POLICY_LOSSES["gspo"](logp2, old, adv, eps_low=0.1)


def test_gmpo_clips_sign_aware_before_the_geometric_mean():
    seq, old, delta = _seq_batch()
    logp = (old + delta).requires_grad_()
    adv = torch.tensor([2.0, 2.0, 2.0, -1.0, -1.0], dtype=torch.float64)
    loss, stats = POLICY_LOSSES["gmpo"](logp, old, adv, eps_low=0.25, eps_high=0.35, seq_ids=seq)
    # A > 0: only the upper bound binds (0.4 -> 0.35, -0.1 stays); A < 0: only the lower one (-0.6 -> -0.25)
    r0 = math.exp((0.3 - 0.1 + 0.35) / 3)
    r1 = math.exp((-0.25 + 0.2) / 2)
    torch.testing.assert_close(loss, torch.tensor([-2 * r0] * 3 + [r1] * 2, dtype=torch.float64))
    loss.sum().backward()
    # d/dlogp_t of -A exp(mean) summed over the sequence's |o| copies = -A r (clipped tokens: 0)
    want = torch.tensor([-2 * r0, -2 * r0, 0.0, 0.0, r1], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, want)
    torch.testing.assert_close(stats["clip_frac"], torch.tensor(2 / 5, dtype=torch.float64))
    # the arithmetic mean of the same clipped ratios (a sign or reduction slip) would differ
    assert abs(r0 - sum(math.exp(x) for x in (0.3, -0.1, 0.35)) / 3) > 1e-3


def test_cispo_caps_the_weight_and_keeps_the_gradient():
    old = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
    w = torch.tensor([0.5, 1.2, 9.0], dtype=torch.float64)
    logp = (old + w.log()).requires_grad_()
    adv = torch.tensor([1.0, -2.0, 1.0], dtype=torch.float64)
    loss, stats = POLICY_LOSSES["cispo"](logp, old, adv, eps_low=0.0, eps_high=4.0)
    capped = torch.tensor([0.5, 1.2, 5.0], dtype=torch.float64)
    torch.testing.assert_close(loss, -capped * adv * logp.detach())
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, -capped * adv)  # the capped token still learns (PPO's clip drops it)
    torch.testing.assert_close(stats["clip_frac"], torch.tensor(1 / 3, dtype=torch.float64))


def test_rloo_is_the_leave_one_out_baseline():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 3.0, 0.5, 0.2, 0.9])
    g = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2])
    adv = ADVANTAGE_ESTIMATORS["rloo"](r, g, eps=1e-4, clip=None)
    want = torch.stack([r[i] - (r[g == g[i]].sum() - r[i]) / ((g == g[i]).sum() - 1) for i in range(len(r))])
    want[4:6] = 0.0  # zero-variance group
    torch.testing.assert_close(adv, want)


def test_reinforce_pp_baseline_whitens_group_centred_rewards_over_the_batch():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 3.0, 1.0])
    g = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    adv = ADVANTAGE_ESTIMATORS["reinforce_pp_baseline"](r, g, eps=0.0, clip=None)
    d = r - torch.tensor([0.5] * 4 + [2.0] * 2 + [2.0] * 2)
    torch.testing.assert_close(adv, (d - d.mean()) / d.std(unbiased=False))
    # batch-level scale: unlike grpo, a group with a larger spread keeps larger advantages
    assert adv[6].abs() > adv[0].abs()
    grpo = group_advantages(r, g, std="group", clip=None)
    torch.testing.assert_close(grpo[6].abs(), grpo[0].abs(), atol=1e-3, rtol=0)


def test_mismatch_weights_truncate_and_mask():
    train = torch.tensor([0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    roll = torch.tensor([-0.1, -2.0, 0.3, 0.1], dtype=torch.float64)  # rho = e^0.1, e^2, e^-0.3, e^-0.1
    seq = torch.tensor([0, 0, 1, 1])
    w, _ = mismatch_weights(train, roll, level="token", mode="truncate", clip_max=3.0)
    torch.testing.assert_close(w, torch.tensor([math.exp(0.1), 3.0, math.exp(-0.3), math.exp(-0.1)],
                                               dtype=torch.float64))
    w, stats = mismatch_weights(train, roll, seq, level="sequence", mode="mask", clip_max=3.0)
    torch.testing.assert_close(w, torch.tensor([0.0, 0.0, math.exp(-0.4), math.exp(-0.4)], dtype=torch.float64))
    assert float(stats["is_outside_frac"]) == 0.5


def test_text_rewards():
    scores = rewards.MultiReward("exact_answer:1.0,answer_format:0.1,overlong:1.0",
                                 {"overlong": {"max_length": 8, "cache": 4}})(
        ["168", " 12 ", "1 2", "99"], ["a"] * 4,
        [{"answer": "168", "completion_tokens": 4, "truncated": False},
         {"answer": 12, "completion_tokens": 6, "truncated": True},
         {"answer": "12", "completion_tokens": 8, "truncated": False},
         {"answer": "9", "completion_tokens": 9, "truncated": True}])
    assert scores["exact_answer"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert scores["answer_format"].tolist() == [1.0, 0.0, 0.0, 0.0]  # truncated or malformed
    assert scores["overlong"].tolist() == [0.0, -0.5, -1.0, -1.0]
    with pytest.raises(ValueError, match="needs metadata\\['answer'\\]"):
        rewards.build_reward("exact_answer")(["1"], ["p"], [{}])
    with pytest.raises(ValueError, match="score different things"):
        rewards.MultiReward("exact_answer,brightness")


def test_algorithm_presets_fill_only_what_the_recipe_leaves_out():
    from flowrl.llm.algorithms import ALGORITHMS, apply_algorithm

    out = apply_algorithm({"training": {"algorithm": "dapo", "clip_eps_high": 0.3}})
    assert out["training"]["clip_eps_high"] == 0.3 and out["training"]["clip_eps_low"] == 0.2
    assert out["training"]["aggregation"] == "token-mean" and out["data"]["dynamic_sampling"] is True
    for name, preset in ALGORITHMS.items():  # every preset names registered parts
        assert preset["advantages"]["estimator"] in ADVANTAGE_ESTIMATORS, name
        assert preset["training"]["policy_loss"] in POLICY_LOSSES, name
        assert preset["training"]["aggregation"] in AGGREGATION_WEIGHTS, name
    with pytest.raises(ConfigError, match="training.algorithm"):
        apply_algorithm({"training": {"algorithm": "ppo2"}})


def test_both_trainers_resolve_every_name_to_the_same_objects():
    """Shared means shared: the image objective and the LLM update look names up in the very same registries."""
    import flowrl.llm.update as lm_update
    import flowrl.train.objectives.grpo as image_grpo
    import flowrl.train.scoring as image_scoring
    import flowrl.train.units as image_units
    from flowrl.core import advantages as core_advantages

    for name in POLICY_LOSSES:
        assert image_grpo.POLICY_LOSSES[name] is lm_update.POLICY_LOSSES[name]
    for name in KL_FORMS:
        assert image_grpo.KL_FORMS[name] is lm_update.KL_FORMS[name]
    for name in AGGREGATION_WEIGHTS:
        assert image_units.AGGREGATION_WEIGHTS[name] is lm_update.AGGREGATION_WEIGHTS[name]
    # both trainers compute advantages through the one Scorer, which resolves estimators in core
    from flowrl.llm import trainer as lm_trainer

    assert lm_trainer.Scorer is image_scoring.Scorer
    assert image_scoring.combine_rewards.__module__ == core_advantages.__name__


def test_core_imports_no_model_library():
    """flowrl/core is tensor math: no torch.nn modules, transformers, diffusers, accelerate or peft."""
    banned = ("transformers", "diffusers", "accelerate", "peft", "torch.nn", "flowrl.train", "flowrl.llm",
              "flowrl.sampling", "flowrl.models")
    for path in sorted((ROOT / "flowrl" / "core").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for n in names:
                assert not n.startswith(banned) or n == "torch.nn.functional", f"{path.name} imports {n}"
