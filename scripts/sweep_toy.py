"""The shapes-world recipe sweep behind the README's findings: many variants of configs/toy_flowgrpo.yaml in
parallel (on a GPU machine, where 16 fit at once), each at the iteration count that fits 15 minutes on 2 CPU
cores (measured s/it per variant), each evaluated with `flowrl eval --num 8` on the held-out prompts against a
base eval made on the same device; the best few are then resumed to 3.1x their length and evaluated again.

    python scripts/sweep_toy.py                        # the 16 Flow-GRPO variants
    SWEEP_SET=nft python scripts/sweep_toy.py          # the 14 DiffusionNFT variants
    SWEEP_SET=strict python scripts/sweep_toy.py       # CFG-free configs/toy_nft.yaml with the strict reward
    SWEEP_ONLY=pub,w2_lr1e3 SWEEP_SCALE=0.02 SWEEP_NP=24 python scripts/sweep_toy.py   # a quick CPU check

Environment knobs: OUT (results: sweep.log, results.json, curves.json, runs.tgz), SWEEP_RUNS (run folders),
SWEEP_DEADLINE (seconds; runs still going are stopped), SWEEP_TOP (how many to resume), SWEEP_SCALE (iteration
multiplier), SWEEP_NP (first N held-out prompts; 0 = all), SWEEP_EBS (eval batch size), SWEEP_ONLY (names).
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # flowrl, for summary(), when run as a script
T0 = time.time()
DEADLINE = float(os.environ.get("SWEEP_DEADLINE", "520"))
OUT = Path(os.environ.get("OUT", "/tmp/out"))
RUNS = Path(os.environ.get("SWEEP_RUNS", "/tmp/sweep"))
SCALE = float(os.environ.get("SWEEP_SCALE", "1.0"))   # iterations multiplier (CPU test: tiny)
TOP = int(os.environ.get("SWEEP_TOP", "5"))
PY = [sys.executable, "-m", "flowrl.cli"]
CFG = "configs/toy_flowgrpo.yaml"
HELD = "flowrl/data/prompts/toy_heldout.jsonl"
EVAL = ["eval", "--model", "toy:shapes", "--prompts", HELD, "--rewards", "shapes", "--num", "8", "--steps", "10",
        "--guidance", "4.5", "--max-sequence-length", "16", "--batch-size", str(os.environ.get("SWEEP_EBS", "256")),
        "--num-prompts", os.environ.get("SWEEP_NP", "0")]


def W(size, start=0):
    return f"sampling.schedule={{name: window, size: {size}, start: {start}}}"


def P(G, shared=False):
    return f"sampling.plan={{name: flat, G: {G}, shared_noise: {str(shared).lower()}}}"


U1 = "training.updates_per_epoch=1"
# name: (short iterations, overrides); long = 3.1x short. Iterations: 800 s over the variant's CPU s/it on 2 cores.
CONFIGS = {
    "pub": (170, []),
    "pub_lr1e3": (170, ["training.lr=1e-3"]),
    "w2_lr1e3": (240, [W(2), U1, "training.lr=1e-3"]),
    "w2_lr3e3": (240, [W(2), U1, "training.lr=3e-3"]),
    "w2_lr1e3_b98": (240, [W(2), U1, "training.lr=1e-3", "training.adam_betas=[0.98, 0.999]"]),
    "w2s_lr1e3": (240, [W(2), U1, "training.lr=1e-3", P(8, True)]),
    "w1s_G16_lr1e3": (300, [W(1), U1, "training.lr=1e-3", P(16, True), "data.prompts_per_iteration=4"]),
    "w1s_G16_lr3e3": (300, [W(1), U1, "training.lr=3e-3", P(16, True), "data.prompts_per_iteration=4"]),
    "w1s_G32_lr1e3": (300, [W(1), U1, "training.lr=1e-3", P(32, True), "data.prompts_per_iteration=2"]),
    "w2_a1_lr1e3": (240, [W(2), U1, "training.lr=1e-3", "sampling.kernel={name: flow_sde, a: 1.0}"]),
    "w2_grp_lr1e3": (240, [W(2), U1, "training.lr=1e-3", "advantages.std=group"]),
    "w2_p16G4_lr1e3": (240, [W(2), U1, "training.lr=1e-3", P(4), "data.prompts_per_iteration=16"]),
    "w4_lr1e3": (205, [W(4), U1, "training.lr=1e-3"]),
    "w2mid_lr1e3": (240, [W(2, 2), U1, "training.lr=1e-3"]),
    "w6s_lr1e3": (210, [U1, "training.lr=1e-3", P(8, True)]),
    "w2_lr3e4": (240, [W(2), U1, "training.lr=3e-4"]),
}
LORA_GUIDANCE = "4.5"   # the LoRAs are evaluated at the guidance they were trained under; the base always at 4.5
NFT = ["training.objective=nft", "sampling.schedule={name: constant, scale: 0.0}", U1]


def N(*extra):
    return NFT + list(extra)


if os.environ.get("SWEEP_SET") == "nft":
    CONFIGS = {
        "nft_lr3e4": (380, N("training.lr=3e-4")),
        "nft_lr1e3": (380, N("training.lr=1e-3")),
        "nft_lr3e3": (380, N("training.lr=3e-3")),
        "nft_lr1e3_u2": (350, N("training.lr=1e-3", "training.updates_per_epoch=2")),
        "nft_lr1e3_u4": (350, N("training.lr=1e-3", "training.updates_per_epoch=4")),
        "nft_lr1e3_u4_b01": (350, N("training.lr=1e-3", "training.updates_per_epoch=4", "training.nft_beta=0.1")),
        "nft_lr3e4_u4": (350, N("training.lr=3e-4", "training.updates_per_epoch=4")),
        "nft_lr1e3_K4": (310, N("training.lr=1e-3", "training.nft_timesteps=4")),
        "nft_lr1e3_noad": (380, N("training.lr=1e-3", "training.nft_adaptive_weight=false")),
        "nft_lr1e3_G16": (380, N("training.lr=1e-3", P(16), "data.prompts_per_iteration=4")),
        "nft_lr1e3_sde": (380, N("training.lr=1e-3") + [W(6)]),
        "nft_lr1e3_grp": (380, N("training.lr=1e-3", "advantages.std=group")),
        "nft_lr1e3_c2": (380, N("training.lr=1e-3", "advantages.clip=2.0")),
        "nft_lr1e3_e2": (300, N("training.lr=1e-3", "training.inner_epochs=2", "training.updates_per_epoch=2")),
    }
# configs/toy_nft.yaml now ships the winner (strict soft reward, soft update): each variant states its reward and
# its soft update, so the set reruns as measured
STRICT = "rewards.kwargs={shapes: {strict: true}}"
DENSE = "rewards.kwargs={}"
ETA = ["training.nft_eta_max=0.5", "training.nft_eta_rate=0.001"]
NO_ETA = ["training.nft_eta_max=0.0"]
if os.environ.get("SWEEP_SET") == "strict":   # variants of configs/toy_nft.yaml (CFG-free, 480 its on 2 cores)
    CFG, LORA_GUIDANCE = "configs/toy_nft.yaml", "1.0"
    CONFIGS = {
        "dense": (480, [DENSE] + NO_ETA),
        "strict": (480, [STRICT] + NO_ETA),
        "strict_eta": (480, [STRICT] + ETA),
        "strict_lr1e3": (480, [STRICT, "training.lr=1e-3"] + NO_ETA),
        "strict_lr1e3_eta": (480, [STRICT, "training.lr=1e-3"] + ETA),
        "strict_soft_eta": (480, ["rewards.kwargs={shapes: {strict: true, mode: soft}}"] + ETA),
        "strict_bin_eta": (480, ["rewards.kwargs={shapes: {strict: true, mode: binary}}"] + ETA),
        "strict_eta3": (480, [STRICT, "training.nft_eta_max=0.5", "training.nft_eta_rate=0.003"]),
        "strict_b01_eta": (480, [STRICT, "training.nft_beta=0.1"] + ETA),
        "strict_G16_eta": (480, [STRICT, P(16), "data.prompts_per_iteration=4"] + ETA),
        "strict_grp_eta": (480, [STRICT, "advantages.std=group"] + ETA),
        "strict_u8_eta": (400, [STRICT, "training.updates_per_epoch=8", "training.micro_batch_size=32"] + ETA),
    }
if os.environ.get("SWEEP_ONLY"):
    CONFIGS = {k: CONFIGS[k] for k in os.environ["SWEEP_ONLY"].split(",")}


def log(msg):
    line = f"[{time.time() - T0:6.1f}s] {msg}"
    print(line, flush=True)
    with open(OUT / "sweep.log", "a") as f:
        f.write(line + "\n")


def train_cmd(name, its, over):
    sets = [f"run.output_dir={RUNS / name}", "run.progress=false", "eval.every=0", f"run.iterations={its}"] + over
    return PY + ["train", CFG] + [a for s in sets for a in ("--set", s)]


def start(cmd, logfile):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, stdout=open(logfile, "w"), stderr=subprocess.STDOUT, env=env)


def summary(base, ev):
    import torch

    from flowrl.bench.stats import paired_gains
    b, e = json.loads(Path(base).read_text()), json.loads(Path(ev).read_text())
    tags = [json.loads(line).get("tag") for line in open(HELD)]
    tags = [t for t in tags for _ in range(8)][:len(e["per_image"]["prompt"])]
    keys = [k for k in ("shapes", "shapes/correct", "shapes/strict") if k in e["per_image"] and k in b["per_image"]]
    g = paired_gains({k: torch.tensor(e["per_image"][k]) for k in keys},
                     {k: torch.tensor(b["per_image"][k]) for k in keys}, e["per_image"]["prompt"], tags)
    return {c: tuple(round(100 * v[k][s], 1) for k in keys[1:] for s in ("gain", "stderr")) + (
        round(100 * v["shapes"]["gain"], 1),) for c, v in g.items()}


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    RUNS.mkdir(parents=True, exist_ok=True)
    procs = {}
    base_ev = RUNS / "base_ev"
    pb = start(PY + EVAL + ["--out", str(base_ev)], RUNS / "base_ev.log")
    for name, (its, over) in CONFIGS.items():
        n = max(2, int(its * SCALE))
        procs[name] = ("short", start(train_cmd(name, n, over), RUNS / f"{name}.short.log"), n, over)
    evals, results, longs = {}, {}, {}
    waiting_long = []
    while time.time() - T0 < DEADLINE:
        time.sleep(2)
        for name, (phase, p, n, over) in list(procs.items()):
            rc = p.poll()
            if rc is None:
                continue
            del procs[name]
            if rc != 0:
                log(f"{name} {phase} FAILED rc={rc}: " + (RUNS / f"{name}.{phase}.log").read_text()[-1500:])
                continue
            lora = RUNS / name / f"lora_{phase}"
            shutil.copytree(RUNS / name / "lora", lora, dirs_exist_ok=True)
            log(f"{name} {phase} done ({n} its)")
            ev = [a if a != "4.5" else LORA_GUIDANCE for a in EVAL]
            evals[(name, phase)] = start(PY + ev + ["--lora", str(lora), "--out", str(RUNS / name / f"ev_{phase}")],
                                         RUNS / f"{name}.ev_{phase}.log")
        for key, p in list(evals.items()):
            if p.poll() is None or pb.poll() is None:
                continue
            del evals[key]
            name, phase = key
            if p.returncode != 0:
                log(f"{name} eval {phase} FAILED: " + (RUNS / f"{name}.ev_{phase}.log").read_text()[-1500:])
                continue
            s = summary(base_ev / "eval.json", RUNS / name / f"ev_{phase}" / "eval.json")
            results[key] = s
            per_cat = " ".join(f"{c[:6]} {v[0]:+.1f}" + (f"/{v[2]:+.1f}" if len(v) == 5 else "") for c, v in s.items()
                               if c != "overall")
            o = s["overall"]
            strict = f", strict {o[2]:+.1f} ± {o[3]:.1f}" if len(o) == 5 else ""
            log(f"RESULT {name} {phase}: overall {o[0]:+.1f} ± {o[1]:.1f}{strict} (dense {o[-1]:+.1f}) | {per_cat}")
            (OUT / "results.json").write_text(json.dumps({f"{k[0]}.{k[1]}": v for k, v in results.items()}, indent=1))
            if phase == "short":
                waiting_long.append((s["overall"][0], name))
        # once every short result is in (or time is getting short), resume the best few to the long length
        shorts_pending = any(ph == "short" for ph, *_ in procs.values()) or any(k[1] == "short" for k in evals)
        if waiting_long and (not shorts_pending or time.time() - T0 > DEADLINE * 0.55) and not longs:
            for gain, name in sorted(waiting_long, reverse=True)[:TOP]:
                its, over = CONFIGS[name]
                n = max(3, int(3.1 * its * SCALE))
                cmd = train_cmd(name, n, over) + ["--resume", str(RUNS / name)]
                procs[name] = ("long", start(cmd, RUNS / f"{name}.long.log"), n, over)
                longs[name] = n
                log(f"resume {name} (short gain {gain:+.1f}) to {n} its")
        if not procs and not evals and pb.poll() is not None and (longs or not waiting_long or TOP == 0):
            break
    for name, (phase, p, n, over) in procs.items():
        p.kill()
        try:  # how far did it get?
            rows = (RUNS / name / "metrics.jsonl").read_text().splitlines()
            log(f"{name} {phase} killed at deadline after {len(rows)} rows of {n}")
        except OSError:
            log(f"{name} {phase} killed at deadline")
    for p in evals.values():
        p.kill()
    # curves: mean training reward per tenth of the run
    curves = {}
    for name in CONFIGS:
        try:
            rows = [json.loads(line) for line in (RUNS / name / "metrics.jsonl").read_text().splitlines()]
        except OSError:
            continue
        k = max(1, len(rows) // 10)
        curves[name] = [round(sum(r["reward/mean"] for r in rows[i:i + k]) / len(rows[i:i + k]), 3)
                        for i in range(0, len(rows), k)]
        log(f"curve {name}: {curves[name]}")
    (OUT / "curves.json").write_text(json.dumps(curves))
    subprocess.run(f"tar czf {OUT}/runs.tgz --exclude=checkpoints --exclude=samples --exclude='*.png' "
                   f"-C {RUNS} .", shell=True)
    log("end")


if __name__ == "__main__":
    main()
