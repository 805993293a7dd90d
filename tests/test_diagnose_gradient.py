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
