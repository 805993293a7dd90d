"""The language model's update gradient does not depend on how the global batch is cut: micro-batches of 1, 3
or all sequences, and 1 or 2 processes (accelerate launch, gloo), for token-mean and sequence-mean aggregation
(and the sequence-level GSPO loss), on a fixed batch whose completions have unequal lengths. A local
denominator (a micro-batch's or a process's own token count) fails these: the batches hold different numbers of
tokens."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "lm_grad_worker.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CASES = [("token-mean", "clip"), ("seq-mean-token-mean", "clip"), ("seq-mean-token-mean", "gspo"),
         ("seq-mean-token-sum-norm", "clip")]


def _grads(tmp_path, cases: list[str], processes: int) -> dict:
    out = tmp_path / f"grads_{processes}.pt"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              str(_port())]
    res = subprocess.run(launch + [str(WORKER), str(out), *cases], cwd=ROOT, env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(out)


def _close(a, b, what):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{what}, {k}: {m}")


@pytest.fixture(scope="module")
def grads(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grads")
    sys.path.insert(0, str(WORKER.parent))
    import lm_grad_worker  # one process: in this one, which saves an interpreter start

    lm_grad_worker.main(str(tmp / "grads_1.pt"), [f"{a}:{m}:{loss}" for a, loss in CASES for m in (0, 1, 3)])
    one = torch.load(tmp / "grads_1.pt")
    two = _grads(tmp, [f"{a}:3:{loss}" for a, loss in CASES], 2)
    return one, two


@pytest.mark.parametrize("aggregation,loss", CASES)
def test_gradient_is_the_same_for_any_micro_batch_and_process_count(grads, aggregation, loss):
    one, two = grads
    whole = one[f"{aggregation}:0:{loss}"]
    assert sum(float(g.abs().sum()) for g in whole.values()) > 0
    for micro in (1, 3):
        _close(one[f"{aggregation}:{micro}:{loss}"], whole, f"micro-batch {micro}")
    _close(two[f"{aggregation}:3:{loss}"], whole, "2 processes")


def test_a_local_denominator_would_differ(grads):
    """The check has teeth: token-mean and sequence-mean give different gradients on this batch (its sequences
    have unequal lengths), so a micro-batch-local normaliser could not pass the test above."""
    a, b = grads[0]["token-mean:0:clip"], grads[0]["seq-mean-token-mean:0:clip"]
    assert max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-4
