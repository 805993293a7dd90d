"""The reward server's time per request and peak memory, against the bound its limits imply.

    python scripts/bench_reward_server.py            # about a minute on two cores

Each scenario starts ``python -m rewards.server`` in its own process (a trivial numpy scorer: mean brightness),
sends requests from client threads, and reads the server's peak RSS (VmHWM in /proc/<pid>/status). The memory
scenarios send ``max_inflight + 2`` requests at once, each at the request-pixel limit, so every slot is full and
the others queue: the peak is compared with ``Limits.memory_bound()`` plus the idle process.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rewards.server import encode_png  # noqa: E402
from rewards.server_limits import Limits  # noqa: E402
from rewards.transport import RetryPolicy, request_json  # noqa: E402


def brightness(images, prompts, metadata):
    return {"score": (images.mean(axis=(1, 2, 3)) / 255).tolist()}


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class Server:
    def __init__(self, flags: list[str]):
        env = {**os.environ, "PYTHONPATH": f"{ROOT / 'scripts'}:{ROOT}", "OMP_NUM_THREADS": "1"}
        env.pop("FLOWRL_REWARD_SECRET", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "rewards.server", "--scorer",
                                      "bench_reward_server:brightness", "--port", "0", *flags], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.url = self.proc.stdout.readline().strip().rsplit(" ", 1)[1]
        self.idle_kb = status_kb(self.proc.pid, "VmRSS")

    def peak_kb(self) -> int:
        return status_kb(self.proc.pid, "VmHWM")

    def close(self):
        self.proc.terminate()
        self.proc.wait(10)


def payload(n: int, size: int, noise: bool, seed: int = 0) -> bytes:
    """n images of size x size: smooth gradients (small PNGs: pixels dominate) or noise (the body dominates);
    one image encoded and repeated, the server decodes each anyway."""
    rng = np.random.default_rng(seed)
    if noise:
        a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    else:
        ramp = np.linspace(0, 255, size, dtype=np.float32)
        a = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size))],
                     axis=-1).astype(np.uint8)
    text = encode_png(a)
    return json.dumps({"images": [text] * n, "prompts": ["p"] * n, "metadata": [{}] * n}).encode()


def timing(n: int, size: int, requests: int) -> dict:
    server = Server([])
    data, policy = payload(n, size, noise=True), RetryPolicy(timeout=120.0, retries=0)
    try:
        request_json(f"{server.url}/score", data, policy)  # warm
        t0 = time.perf_counter()
        for _ in range(requests):
            request_json(f"{server.url}/score", data, policy)
        per = (time.perf_counter() - t0) / requests
    finally:
        server.close()
    return {"scenario": f"time: {n} x {size}^2 noise", "body_MB": len(data) / 2**20, "ms_per_request": per * 1e3}


def memory(limits: Limits, flags: list[str], n: int, size: int, noise: bool) -> dict:
    server = Server(flags)
    data, policy = payload(n, size, noise), RetryPolicy(timeout=600.0, retries=3, backoff=1.0)
    errors = []

    def client():
        try:
            request_json(f"{server.url}/score", data, policy)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    try:
        threads = [threading.Thread(target=client) for _ in range(limits.max_inflight + 2)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        took = time.perf_counter() - t0
        peak, idle = server.peak_kb() * 1024, server.idle_kb * 1024
    finally:
        server.close()
    if errors:
        raise RuntimeError(f"a request failed: {errors[0]}")
    bound = limits.memory_bound()
    return {"scenario": f"memory: {limits.max_inflight + 2} at once, {n} x {size}^2 {'noise' if noise else 'smooth'}",
            "body_MB": len(data) / 2**20, "seconds": took, "idle_MB": idle / 2**20, "peak_MB": peak / 2**20,
            "bound_MB": bound / 2**20, "peak_over_idle_MB": (peak - idle) / 2**20, "within_bound": peak - idle <= bound}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=20, help="requests per timing scenario")
    args = ap.parse_args()
    rows = [timing(16, 32, args.requests * 5), timing(16, 512, args.requests)]
    default = Limits()
    # pixels at the default request limit (64 x 1024^2, smooth: small bodies)
    rows.append(memory(default, [], 64, 1024, noise=False))
    # a body near the default body limit (noise does not compress): 60 x 1024^2 noise, about 240 MB
    rows.append(memory(default, [], 60, 1024, noise=True))
    # tighter limits scale the bound down
    small = Limits(max_inflight=2, max_body_bytes=64 * 2**20, max_request_pixels=16 * 1024**2)
    rows.append(memory(small, ["--max-inflight", "2", "--max-body-bytes", str(small.max_body_bytes),
                               "--max-request-pixels", str(small.max_request_pixels)], 15, 1024, noise=True))
    for row in rows:
        print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}))
    return 0 if all(r.get("within_bound", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
