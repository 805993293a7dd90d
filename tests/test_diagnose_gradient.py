"""scripts/diagnose_gradient.py on the tiny recipe: the trainer's own gradients, recorded without a step."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("diagnose_gradient", ROOT / "scripts" / "diagnose_gradient.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reports_cosines_and_a_line_search_without_moving_the_model(capsys):
    script = _script()
    script.main([str(ROOT / "configs" / "tiny_smoke.yaml"), "--iterations", "3", "--steps", "0,0", "--direction",
                 "sign", "--samples-per-prompt", "2"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    report, *steps = rows
    assert report["iterations"] == 3 and -1 <= report["cosine_mean"] <= 1 and report["cosine_stderr"] >= 0
    assert report["gradient_norm"] > 0  # a real gradient reached the LoRA
    assert len(steps) == 2 and steps[0] == steps[1]  # fixed seeds: the same move gives the same reward


def test_gradients_are_recorded_and_the_weights_never_move(tmp_path):
    import torch

    from flowrl.train.config import load_config
    from flowrl.train.trainer import Trainer

    script = _script()
    cfg = load_config(ROOT / "configs" / "tiny_smoke.yaml", [f"run.output_dir={tmp_path / 'run'}", "eval.every=0",
                                                             "run.progress=false", "training.updates_per_epoch=1"])
    trainer = Trainer(cfg)
    before = torch.nn.utils.parameters_to_vector(trainer.params).detach().clone()
    G = script.gradients(trainer, 3)
    assert G.shape == (3, before.numel()) and bool(torch.isfinite(G).all())
    assert not torch.equal(G[0], G[1])  # independent iterations: other rollouts, other gradients
    assert torch.equal(torch.nn.utils.parameters_to_vector(trainer.params), before)
    trainer.acc.end_training()


def test_needs_three_iterations():
    with pytest.raises(SystemExit):
        _script().main([str(ROOT / "configs" / "tiny_smoke.yaml"), "--iterations", "2"])


def test_agreement_recovers_signal_and_noise():
    """On synthetic estimates g = mu + noise: |E g|^2 unbiased within its standard error, tr Cov and snr close."""
    import torch

    g = torch.Generator().manual_seed(0)
    mu = torch.randn(50, generator=g) * 0.2
    G = mu + 0.5 * torch.randn(400, 50, generator=g)
    r = _script().agreement(G)
    assert abs(r["signal_sq"] - float(mu @ mu)) < 3 * r["signal_sq_stderr"]
    assert abs(r["noise_sq"] - 50 * 0.25) < 0.1 * 50 * 0.25
    assert abs(r["snr"] - float(mu.norm()) / (50 * 0.25) ** 0.5) < 0.05
    pure = _script().agreement(0.5 * torch.randn(400, 50, generator=g))
    assert abs(pure["signal_sq"]) < 3 * pure["signal_sq_stderr"] and abs(pure["cosine_mean"]) < 0.01


def test_samples_per_update_and_per_step(capsys):
    script = _script()
    script.main([str(ROOT / "configs" / "tiny_smoke.yaml"), "--iterations", "3", "--samples", "8,16", "--per-step",
                 "--set", "sampling.schedule={name: window, size: 2, start: 1}"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    whole = [r for r in rows if "step" not in r]
    assert [r["samples"] for r in whole] == [8, 16]
    assert [(r["samples"], r["step"]) for r in rows if "step" in r] == [(8, 1), (8, 2), (16, 1), (16, 2)]
    assert all(r["noise_sq"] > 0 for r in rows)
    with pytest.raises(SystemExit):  # a drawn window has no fixed steps to split by
        script.main([str(ROOT / "configs" / "tiny_smoke.yaml"), "--iterations", "3", "--per-step"])
    with pytest.raises(SystemExit):
        script.main([str(ROOT / "configs" / "tiny_smoke.yaml"), "--iterations", "3", "--samples", "12"])


def test_category_keeps_one_tag(tmp_path):
    script = _script()
    path = script.category_prompts(str(ROOT / "flowrl" / "data" / "prompts" / "toy_train.jsonl"), "counting",
                                   tmp_path / "c.jsonl")
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    assert len(rows) == 54 and {r["tag"] for r in rows} == {"counting"}
    with pytest.raises(SystemExit, match="no prompt"):
        script.category_prompts(str(ROOT / "flowrl" / "data" / "prompts" / "toy_train.jsonl"), "nope",
                                tmp_path / "n.jsonl")
