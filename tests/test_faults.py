"""Faults a long run meets, end to end through the CLI on the tiny smoke recipe: a lost or hung process in a
2-process run, a full disk while a checkpoint is written, a reward server killed and restarted, data files
edited while a run is paused. Each ends in one line naming the cause, leaves every complete checkpoint as it
was, and a resume ends with the same LoRA tensors, bit for bit, as the run done straight through."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import ENV_FAULTS, RECIPE, ROOT, _free_port, _ranks, _two_processes

from flowrl.train import checkpoint
from flowrl.train.config import ConfigError, load_config, to_dict

FAST = ["run.progress=false", "eval.every=0", "run.save_every=1", "run.keep_checkpoints=0"]


def _cmd(run: Path, sets: list[str], *extra, launcher=None) -> list[str]:
    return ((launcher or [sys.executable, "-m", "flowrl.cli"]) + ["train", str(RECIPE)]
            + [a for s in [*FAST, *sets, f"run.output_dir={run}"] for a in ("--set", s)] + list(extra))


def _start(cmd: list[str], env=ENV_FAULTS) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(cmd: list[str], env=ENV_FAULTS, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _wait(done, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert proc.poll() is None, f"the run ended early ({proc.returncode}): {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.005)


def _complete(run: Path, it: int):
    return lambda: checkpoint.problem(run / "checkpoints" / checkpoint.checkpoint_name(it)) is None


def _lora(run: Path) -> dict:
    return load_file(run / "lora" / "pytorch_lora_weights.safetensors")


def _same_lora(a: Path, b: Path) -> bool:
    x, y = _lora(a), _lora(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _rows(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def _snapshot(run: Path) -> dict:
    """Every complete checkpoint: {name: {file: sha256}}."""
    return {p.name: {f.relative_to(p).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
                     for f in sorted(p.rglob("*")) if f.is_file()}
            for _, p in checkpoint.scan(run / "checkpoints")[0]}


def _error_line(stderr: str) -> str:
    """The one ``flowrl: error:`` line of a failed run (every process prints its own under a launcher)."""
    lines = [line for line in stderr.splitlines() if "flowrl: error:" in line]
    assert lines, stderr[-3000:]
    return lines[0]


# ------------------------------------------------------------------------------------------ lost process


@pytest.mark.slow
def test_killed_process_ends_the_run_and_it_resumes_bit_for_bit(tmp_path):
    """SIGKILL to rank 1 while rank 0 writes or has just written a checkpoint. The launcher (torch elastic)
    SIGTERMs the survivor, whose next collective fails at once (gloo: connection closed by peer): it exits with
    one line naming the cause and run.collective_timeout, the launcher non-zero. Complete checkpoints are left as
    they were, a half-written ``.tmp-`` one is never resumed from, and ``--resume latest`` on 2 processes ends
    with the LoRA of an uninterrupted 2-process run, bit for bit (for 2 processes the DDP all-reduce is one
    addition, which does not depend on the bucket order, and every random draw is seeded by what it draws)."""
    sets = ["run.iterations=5", "run.collective_timeout=20"]
    ref_dir, run = tmp_path / "straight", tmp_path / "killed"
    ref = _start(_cmd(ref_dir, sets, launcher=_two_processes()))
    proc = _start(_cmd(run, sets, launcher=_two_processes()))
    tmp2 = run / "checkpoints" / ".tmp-iter_000002"
    _wait(lambda: _complete(run, 1)() and (tmp2.exists() or _complete(run, 2)()), proc)
    os.kill(_ranks(proc)[1], signal.SIGKILL)
    killed = time.monotonic()
    before = _snapshot(run)
    out, err = proc.communicate(timeout=300)
    assert time.monotonic() - killed < 20 + 40  # the survivor does not hang
    assert proc.returncode != 0
    line = _error_line(err)
    assert "a collective operation failed" in line and "run.collective_timeout (20 s)" in line, line
    assert "--resume latest" in line and "[rank0]: Traceback" not in err
    after = _snapshot(run)
    assert {k: after[k] for k in before} == before  # nothing complete was touched (a newer one may be sealed)
    newest = checkpoint.latest(run)
    assert newest.name == max(after) and checkpoint.read_info(newest)["world_size"] == 2

    res = _run(_cmd(run, sets, "--resume", "latest", launcher=_two_processes()))
    assert res.returncode == 0, res.stderr[-3000:]
    assert ref.communicate(timeout=600) and ref.returncode == 0
    assert _same_lora(run, ref_dir)
    assert _rows(run) == _rows(ref_dir) and [r["world_size"] for r in _rows(run)] == [2] * 5
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith((".tmp-", ".del-"))]  # pruned


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] in "ZX"
    except FileNotFoundError:
        return True


@pytest.mark.slow
def test_hung_process_fails_the_run_within_the_collective_timeout(tmp_path):
    """SIGSTOP to rank 1: it is alive, so the launcher waits, and its socket stays open, so only the timeout ends
    rank 0's wait in the next collective: it exits after run.collective_timeout (not the 600 s default) with one
    line naming it; the launcher then kills the stopped process and exits non-zero."""
    run = tmp_path / "hung"
    proc = _start(_cmd(run, ["run.iterations=5", "run.collective_timeout=12"], launcher=_two_processes()))
    try:
        _wait(_complete(run, 1), proc)
        ranks = _ranks(proc)
        os.kill(ranks[1], signal.SIGSTOP)
        stopped = time.monotonic()
        while not _gone(ranks[0]):
            assert time.monotonic() - stopped < 12 + 60, "rank 0 hangs past run.collective_timeout"
            time.sleep(0.1)
        waited = time.monotonic() - stopped
        out, err = proc.communicate(timeout=120)  # torch elastic gives the stopped one 30 s, then SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            for pid in _ranks(proc).values():
                os.kill(pid, signal.SIGKILL)
    assert waited >= 12 - 1, waited  # it waited for the timeout: the stopped process was not seen as gone
    assert proc.returncode != 0
    line = _error_line(err)
    assert "Timed out" in line and "run.collective_timeout (12 s)" in line, line
    assert checkpoint.latest(run) is not None


def test_collective_timeout_is_checked_and_may_change_on_resume():
    with pytest.raises(ConfigError, match=r"^run.collective_timeout: must be > 0 seconds, got 0.0$"):
        load_config(RECIPE, ["run.collective_timeout=0"])
    saved = to_dict(load_config(RECIPE))
    checkpoint.check_config(saved, to_dict(load_config(RECIPE, ["run.collective_timeout=30"])))


# ------------------------------------------------------------------------------------------ full disk


@pytest.mark.slow
def test_full_disk_while_checkpointing_stops_the_run_and_it_resumes(tmp_path):
    """Every torch.save into iter_000004's folder writes half its bytes, then raises ENOSPC: the run stops with one
    line naming the cause, the checkpoint and the previous complete one; the partial folder is gone and
    iter_000002 is still the newest complete checkpoint, as it was; ``--resume latest`` (disk freed) ends with
    the LoRA of an uninterrupted run."""
    sets = ["run.iterations=5", "run.save_every=2", "rewards.modules=[fault_rewards]"]
    ref_dir, run = tmp_path / "straight", tmp_path / "full"
    ref = _start(_cmd(ref_dir, sets))
    res = _run(_cmd(run, sets), env={**ENV_FAULTS, "FLOWRL_TEST_FULL_DISK": "iter_000004"})
    assert res.returncode == 1, res.stderr[-3000:]
    tmp = run / "checkpoints" / ".tmp-iter_000004"
    assert _error_line(res.stderr) == (
        f"flowrl: error: no space left on device while writing checkpoint iter_000004 ({tmp / 'optimizer.bin'}): "
        "the previous checkpoint iter_000002 is the newest complete one (continue with --resume latest once the "
        "cause is fixed)")
    assert "Traceback" not in res.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["iter_000002"]
    assert checkpoint.latest(run).name == "iter_000002" and not (run / "lora").exists()

    res = _run(_cmd(run, sets, "--resume", "latest"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert ref.communicate(timeout=600) and ref.returncode == 0
    assert _same_lora(run, ref_dir) and _rows(run) == _rows(ref_dir)


# ------------------------------------------------------------------------------------------ reward server


class Server:
    """``python -m rewards.server`` with the tests' brightness scorer on a fixed port, (re)startable."""

    def __init__(self, port: int):
        self.port, self.url, self.proc = port, f"http://127.0.0.1:{port}", None

    def start(self) -> "Server":
        self.proc = subprocess.Popen([sys.executable, "-m", "rewards.server", "--scorer", "fault_scorer:brightness",
                                      "--port", str(self.port)], cwd=ROOT, env=ENV_FAULTS,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + 60
        while True:
            try:
                with opener.open(f"{self.url}/health", timeout=2):
                    return self
            except OSError:
                assert self.proc.poll() is None and time.monotonic() < deadline, "the reward server did not start"
                time.sleep(0.05)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def servers():
    started = []

    def make():
        started.append(Server(_free_port()))
        return started[-1]

    yield make
    for s in started:
        if s.proc is not None and s.proc.poll() is None:
            s.kill()


def _remote(server: Server, retries: int, backoff: float) -> list[str]:
    """The recipe with the reward from ``server``: the client retries once quickly, the trainer's guard
    ``retries`` times, waiting ``backoff`` s, then doubling."""
    kwargs = {"remote": {"url": server.url, "timeout": 10.0, "retries": 1, "backoff": 0.2}}
    return ["run.iterations=4", "rewards.components=remote:1.0", "rewards.kwargs=" + json.dumps(kwargs),
            f"rewards.retries={retries}", f"rewards.retry_backoff={backoff}"]


class Lines:
    """A running process's stderr, read as it comes (a full pipe would block it)."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[str] = []
        self.thread = threading.Thread(target=lambda: self.lines.extend(proc.stderr), daemon=True)
        self.thread.start()

    def has(self, text: str) -> bool:
        return any(text in line for line in self.lines)


@pytest.mark.slow
def test_reward_server_restarted_within_the_retries(tmp_path, servers):
    """The server is killed after the first iteration and started again on its port once the trainer has seen a
    failed call: the retries bridge the gap, the run finishes and equals an uninterrupted one."""
    ref_srv, srv = servers().start(), servers().start()
    ref_dir, run = tmp_path / "straight", tmp_path / "restarted"
    ref = _start(_cmd(ref_dir, _remote(ref_srv, 3, 1.5)))
    proc = _start(_cmd(run, _remote(srv, 3, 1.5)))
    err = Lines(proc)
    _wait(_complete(run, 1), proc)
    srv.kill()
    _wait(lambda: err.has("reward 'remote' failed (RemoteError"), proc)  # a retry is pending
    srv.start()
    assert proc.wait(timeout=600) == 0, "".join(err.lines)[-3000:]
    assert ref.communicate(timeout=600) and ref.returncode == 0
    assert _same_lora(run, ref_dir) and _rows(run) == _rows(ref_dir)


@pytest.mark.slow
def test_reward_server_down_past_the_retries_stops_the_run_and_it_resumes(tmp_path, servers):
    ref_srv, srv = servers().start(), servers().start()
    ref_dir, run = tmp_path / "straight", tmp_path / "down"
    ref = _start(_cmd(ref_dir, _remote(ref_srv, 1, 0.1)))
    proc = _start(_cmd(run, _remote(srv, 1, 0.1)))
    _wait(_complete(run, 1), proc)
    srv.kill()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    line = _error_line(err)
    newest = checkpoint.latest(run)
    assert line.startswith("flowrl: error: reward 'remote' failed 2 time(s); last error: RemoteError: reward "
                           f"'remote' (server {srv.url}, scorer fault_scorer:brightness)"), line
    assert line.endswith(f"the newest complete checkpoint is {newest} (continue with --resume latest once the cause "
                         "is fixed)"), line
    assert "Traceback" not in err and not (run / "lora").exists()
    srv.start()
    res = _run(_cmd(run, _remote(srv, 1, 0.1), "--resume", "latest"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert ref.communicate(timeout=600) and ref.returncode == 0
    assert _same_lora(run, ref_dir) and _rows(run) == _rows(ref_dir)


# ------------------------------------------------------------------------------------------ edited data


def test_edited_eval_prompts_are_refused_on_resume(tmp_path):
    """A run paused after its checkpoint; the eval prompts file edited: --resume refuses in one line naming the
    key and the file, before any model loads. Restored, the run resumes. A checkpoint of an older flowrl, whose
    marker hashes the training prompts alone, resumes too: a file it holds no hash of is not checked."""
    evals = tmp_path / "eval.txt"
    shutil.copy(ROOT / "flowrl" / "data" / "prompts" / "tiny_eval.txt", evals)
    run = tmp_path / "run"
    sets = ["run.iterations=1", f"data.eval_prompts={evals}"]
    res = _run(_cmd(run, sets))
    assert res.returncode == 0, res.stderr[-3000:]
    info = checkpoint.read_info(run / "checkpoints" / "iter_000001")
    assert set(info["data"]) == {"data.train_prompts", "data.eval_prompts"}

    original = evals.read_text()
    evals.write_text(original + "a green triangle\n")
    res = _run(_cmd(run, ["run.iterations=2", f"data.eval_prompts={evals}"], "--resume", "latest"))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"flowrl: error: --resume: data.eval_prompts ({evals}) changed since iter_000001 was written; a resumed "
        "run must read the same data (restore it, or start a new run)"]

    cfg = load_config(RECIPE, [*sets, f"run.output_dir={run}"])
    marker = run / "checkpoints" / "iter_000001" / checkpoint.MARKER
    old = {**info, "data": {"data.train_prompts": info["data"]["data.train_prompts"]}}
    marker.write_text(json.dumps(old))
    cfg.run.iterations = 2
    assert checkpoint.prepare_resume(cfg, "latest").path.name == "iter_000001"  # edited, but unknown to it
    marker.write_text(json.dumps(info))

    evals.write_text(original)
    res = _run(_cmd(run, ["run.iterations=2", f"data.eval_prompts={evals}"], "--resume", "latest"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert [r["iteration"] for r in _rows(run)] == [0, 1]


def test_edited_input_images_are_refused_on_resume(tmp_path):
    """An editing set's input images are part of its data: one changed is named with its prompt file."""
    src = ROOT / "flowrl" / "data" / "prompts"
    shutil.copytree(src / "tiny_edit", tmp_path / "tiny_edit")
    shutil.copy(src / "tiny_edit.jsonl", tmp_path / "edit.jsonl")
    cfg = load_config(RECIPE, [f"data.train_prompts={tmp_path / 'edit.jsonl'}"])
    digests = checkpoint.data_digests(cfg)
    assert set(digests) == {"data.train_prompts", "data.train_prompts:images", "data.eval_prompts"}
    image = sorted((tmp_path / "tiny_edit").iterdir())[0]
    image.write_bytes(image.read_bytes() + b"\0")
    with pytest.raises(ConfigError, match=r"^--resume: an input image named by data.train_prompts \(.*edit.jsonl\) "
                                          r"changed since iter_000003 was written"):
        checkpoint.check_data(digests, cfg, Path("iter_000003"))
    checkpoint.check_data({k: v for k, v in digests.items() if k != "data.train_prompts:images"}, cfg,
                          Path("iter_000003"))
