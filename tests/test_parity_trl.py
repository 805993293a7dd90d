"""Parity with trl: each of trl's GRPO loss types (grpo, bnpo, dr_grpo, dapo, cispo) and GSPO's sequence-level
importance sampling, with and without the k3 KL, computed by trl's own ``GRPOTrainer._compute_loss`` and by
flowrl's registered losses and aggregations, agree to 1e-6 in value and gradient (scripts/parity_trl.py). Runs
only where trl is installed: ``pip install -e ".[test,trl]"``, then ``pytest -m trl``."""
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import parity_trl  # noqa: E402

pytestmark = pytest.mark.trl


@pytest.mark.parametrize("case", parity_trl.CASES, ids=lambda c: c[0])
def test_loss_and_gradient_match_trl(case):
    batch = parity_trl.fixed_batch(case[2] == "sequence")
    (a, ga), (b, gb) = parity_trl.trl_loss(case, *batch), parity_trl.flowrl_loss(case, *batch)
    assert abs(float(a) - float(b)) <= 1e-6 and float((ga - gb).abs().max()) <= 1e-6
    assert float(ga.abs().max()) > 0  # the gradient is not trivially zero


def test_the_batch_clips_on_both_sides():
    """The comparison covers the clipped branches: some tokens outside [1 - eps_low, 1 + eps_high] each way."""
    import torch

    logp, old, _, adv, mask = parity_trl.fixed_batch(False)
    ratio = torch.exp(logp - old)[mask.bool()]
    assert bool((ratio > 1.28).any()) and bool((ratio < 0.8).any())
