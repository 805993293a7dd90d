"""``flowrl bench NAME``: draw a benchmark's images into GenEval's folder layout, score them from disk, write the
tables.

Work is split by prompt index in fixed blocks of --batch-size prompts, block b on process b mod W, so every block
is drawn with the same batch whatever the number of processes, and each image is seeded by (seed, prompt index,
sample): one process and eight give the same images and the same scores. A resumed run draws only blocks with a
missing image and writes only the missing files. Scores are computed from the PNGs on disk, the images GenEval's
own script would grade.

Outputs in --out: ``bench.json`` (the sampling settings the images were drawn with: a resume with other settings
is refused), ``results.jsonl`` (one row per image; for geneval the fields GenEval's ``evaluate_images.py`` writes,
so its ``summary_scores.py`` reads it), ``summary.json`` / ``summary.md`` (the tables) and, with --baseline,
``gain.json``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from flowrl.bench import layout, tables
from flowrl.bench.protocols import BENCHMARKS, reward_spec
from flowrl.bench.sampling import check_weights
from flowrl.train.config import ConfigError

# what decides an image: a folder drawn with other values of these is another benchmark run
SAMPLING = ("model", "lora", "mix_steps", "prompts", "images_per_prompt", "seed", "steps", "guidance", "height",
            "width", "dtype", "max_sequence_length")
# what a paired comparison may differ in: the weights (and how they are mixed), the sampler settings named by
# --baseline-differs
WEIGHTS = ("model", "lora", "mix_steps")
ROW_FIELDS = ("index", "sample", "prompt", "filename", "tag")  # a result row's fields besides its scores


def settings_of(args) -> dict:
    return {"model": args.model, "lora": str(Path(args.lora).resolve()) if args.lora else None,
            "mix_steps": args.mix_steps, "prompts": args.prompts, "images_per_prompt": args.num, "seed": args.seed,
            "steps": args.steps, "guidance": args.guidance, "height": args.height, "width": args.width,
            "dtype": args.dtype, "max_sequence_length": args.max_sequence_length}


def check_folder(out: Path, settings: dict) -> None:
    """A folder holding images of other settings is refused before anything is drawn."""
    saved = out / "bench.json"
    # settings bind only once an image exists: a start that failed before drawing leaves nothing to protect
    if not saved.is_file() or not any(out.glob("[0-9]*/samples/*.png")):
        return
    old = json.loads(saved.read_text())["sampling"]
    diff = [k for k in SAMPLING if old.get(k) != settings.get(k)]
    if diff:
        raise ConfigError(f"--out {out} holds images drawn with other settings ("
                          + ", ".join(f"{k}: {old.get(k)!r} there, {settings.get(k)!r} now" for k in diff)
                          + "); give a new --out, or the same settings to resume it")


def blocks(n: int, size: int) -> list[list[int]]:
    return [list(range(s, min(s + size, n))) for s in range(0, n, size)]


def _load_baseline(path: str, settings: dict, differs: list[str]) -> tuple[str, list[dict]]:
    folder = Path(path)
    folder = folder.parent if folder.is_file() else folder
    if not (folder / "results.jsonl").is_file() or not (folder / "bench.json").is_file():
        raise ConfigError(f"--baseline {path}: no results.jsonl and bench.json there (give an earlier bench's --out)")
    old = json.loads((folder / "bench.json").read_text())["sampling"]
    bad = [k for k in SAMPLING if k not in WEIGHTS and k not in differs and old.get(k) != settings.get(k)]
    if bad:
        raise ConfigError(f"--baseline {path} was drawn with other settings ("
                          + ", ".join(f"{k}: {old.get(k)!r} there, {settings.get(k)!r} now" for k in bad)
                          + "): a paired gain needs the same prompts, samples and seeds (a sampler setting changed "
                          "on purpose goes in --baseline-differs)")
    rows = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines() if line.strip()]
    return str(folder), rows


def draw(args, acc, out: Path, prompts, metas, mine: list[list[int]]) -> tuple[int, int]:
    """Sample the blocks of this process that miss an image; returns (images drawn, images found on disk)."""
    from tqdm.auto import tqdm

    from flowrl.bench.sampling import load_policy, sample_images

    num = args.num
    todo = [b for b in mine if any(layout.missing(out, i, num) for i in b)]
    found = sum(num - len(layout.missing(out, i, num)) for b in mine for i in b)
    drawn = 0
    if todo:
        policy, family = load_policy(args, acc.device)
        bar = tqdm(total=sum(len(layout.missing(out, i, num)) for b in todo for i in b), unit="img",
                   desc=f"flowrl bench {args.benchmark}", disable=not acc.is_main_process)
        for b in todo:
            for i in b:
                layout.write_metadata(out, i, prompts[i], metas[i])
            images = sample_images(policy, family, [prompts[i] for i in b], args, num, sde=False, prompt_ids=b)
            for j, i in enumerate(b):
                for k in layout.missing(out, i, num):
                    layout.write_image(layout.sample_path(out, i, k), images[j * num + k])
                    drawn += 1
                    bar.update(1)
        bar.close()
    return drawn, found


def score(args, reward, out: Path, prompts, metas, mine: list[list[int]]) -> list[dict]:
    """Per-image rows of this process's blocks, scored from disk block by block (the same batches on any number
    of processes)."""
    rows = []
    for b in mine:
        pairs = [(i, k) for i in b for k in range(args.num)]
        images = layout.read_images(out, pairs)
        groups = torch.tensor([i for i, _ in pairs])  # a prompt's images: one group (pairwise rewards)
        scores = reward(images, [prompts[i] for i, _ in pairs], [metas[i] for i, _ in pairs], groups=groups)
        for key, v in scores.items():
            bad = [pairs[n] for n in torch.nonzero(~torch.isfinite(v)).flatten().tolist()]
            if bad:
                raise ValueError(f"reward score {key!r} is non-finite for (prompt index, sample) {bad[:8]}: a "
                                 "benchmark is not averaged over broken scores; check the reward")
        for n, (i, k) in enumerate(pairs):
            row = {"index": i, "sample": k, "prompt": prompts[i], "filename": str(layout.sample_path(out, i, k))}
            if "tag" in metas[i]:
                row["tag"] = metas[i]["tag"]
            row.update({key: float(v[n]) for key, v in scores.items()})
            rows.append(row)
    return rows


def _geneval_row(row: dict, meta: dict, verdict: str) -> dict:
    """A results.jsonl row in evaluate_images.py's fields (filename, tag, prompt, correct, reason, metadata as a
    JSON string), with flowrl's scores beside them."""
    return {"filename": row["filename"], "tag": row.get("tag"), "prompt": row["prompt"],
            "correct": bool(row[verdict]), "reason": "", "metadata": json.dumps({**meta, "prompt": row["prompt"]}),
            **{k: v for k, v in row.items() if k not in ("filename", "tag", "prompt")}}


def run_bench(args) -> dict | None:
    """The whole benchmark (see the module docstring). Returns the summary on the main process."""
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    import rewards
    from flowrl.bench.stats import paired_gains
    from flowrl.train.builders import load_prompts

    bench = BENCHMARKS[args.benchmark]
    counts = (("--limit", args.limit, 0), ("--num", args.num, 1), ("--batch-size", args.batch_size, 1))
    for flag, value, least in counts:
        if value is not None and value < least:
            raise ConfigError(f"{flag} must be >= {least}, got {value}")
    if args.baseline_differs and not args.baseline:
        raise ConfigError("--baseline-differs needs --baseline (the earlier bench it differs from)")
    check_weights(args)
    args.prompts = args.prompts or bench.prompts
    args.num = args.num or bench.images_per_prompt
    ps = load_prompts(args.prompts, "--prompts")
    n = min(args.limit, len(ps)) if args.limit else len(ps)
    prompts, metas = ps.prompts[:n], ps.metadata[:n]
    if bench.verdicts and any("tag" not in m or "include" not in m for m in metas):
        raise ConfigError(f"--prompts {args.prompts}: geneval needs GenEval metadata (tag, include) on every prompt")
    spec, kwargs = reward_spec(bench, args.rewards, json.loads(args.reward_kwargs) if args.reward_kwargs else None,
                               args.server)
    if spec is None and not args.no_score:
        raise ConfigError(f"flowrl bench {bench.name}: nothing scores it; give --server URL (its scorer behind "
                          "rewards.server), --rewards SPEC, or --no-score to only draw the images")
    out = Path(args.out)
    settings = settings_of(args)
    check_folder(out, settings)
    differs = args.baseline_differs or []
    baseline = _load_baseline(args.baseline, settings, differs) if args.baseline else None  # before any sampling
    acc = Accelerator(cpu=not torch.cuda.is_available())  # first: it sets each process's CUDA device
    reward = None if args.no_score else rewards.MultiReward(spec, kwargs)  # a server that is down fails here
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"benchmark": bench.name, "sampling": settings, "prompts_in_file": len(ps),
                           "limit": args.limit, "batch_size": args.batch_size}, indent=2)
        layout.replace(out / "bench.json", lambda path: path.write_text(text))  # other processes may be reading it
    acc.wait_for_everyone()
    mine = blocks(n, args.batch_size)[acc.process_index::acc.num_processes]
    drawn, found = draw(args, acc, out, prompts, metas, mine)
    counts = gather_object([(drawn, found)])
    acc.wait_for_everyone()
    drawn, found = sum(c[0] for c in counts), sum(c[1] for c in counts)
    summary = None
    if reward is None:
        if acc.is_main_process:
            print(f"flowrl: {drawn} images drawn, {found} already on disk, in {out} (GenEval's layout; not scored)")
    else:
        rows = sorted(gather_object(score(args, reward, out, prompts, metas, mine)),
                      key=lambda r: (r["index"], r["sample"]))
        reward.close()
        if acc.is_main_process:
            summary = write_results(args, bench, out, rows, metas, reward, settings, (drawn, found), baseline,
                                    paired_gains)
    # every process waits for the results to be written, then the process group is torn down: a process that
    # exits while gloo's threads still serve a live group aborts ("terminate called without an active exception")
    acc.wait_for_everyone()
    acc.end_training()
    return summary


def write_results(args, bench, out, rows, metas, reward, settings, counts, baseline, paired_gains) -> dict:
    keys = [k for k in rows[0] if k not in ROW_FIELDS]
    verdicts = [k for k in keys if k.endswith(("/strict", "/correct"))]
    verdicts.sort(key=lambda k: not k.endswith("/strict"))  # the strict verdict first: it cannot be gamed
    summary = {"benchmark": bench.name, "sampling": settings, "rewards": args.rewards or reward.names,
               "reward_kwargs": args.reward_kwargs, "images_drawn": counts[0], "images_on_disk_before": counts[1],
               "scores": tables.score_table(rows, keys)}
    lines = [f"flowrl bench {bench.name}: {len(rows)} images of {len(metas)} prompts ({counts[0]} drawn now, "
             f"{counts[1]} found on disk), {args.model}" + (f" + {args.lora}" if args.lora else ""), ""]
    if bench.verdicts and verdicts:
        summary["geneval"] = {k: tables.geneval_summary(rows, k) for k in verdicts}
        lines += tables.format_geneval(summary["geneval"]) + [""]
    lines += tables.format_scores(summary["scores"])
    tags = [r.get("tag") for r in rows]
    with (out / "results.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps(_geneval_row(r, metas[r["index"]], verdicts[-1]) if bench.verdicts and verdicts
                               else r) + "\n")
    if baseline is not None:
        folder, old = baseline
        if [(r["index"], r["sample"], r["prompt"]) for r in old] != [(r["index"], r["sample"], r["prompt"])
                                                                    for r in rows]:
            raise ConfigError(f"--baseline {folder} scored other images (prompts, samples or --limit differ)")
        shared = [k for k in keys if k in old[0]]
        if not shared:
            raise ConfigError(f"--baseline {folder} has no score in common with this run (there: "
                              f"{sorted(set(old[0]) - set(ROW_FIELDS))}, here: {keys})")
        gains = paired_gains({k: torch.tensor([r[k] for r in rows]) for k in shared},
                             {k: torch.tensor([r[k] for r in old]) for k in shared},
                             [r["prompt"] for r in rows], tags if all(isinstance(t, str) for t in tags) else None)
        summary["gain"] = {"baseline": folder, "differs": args.baseline_differs or [], "gains": gains}
        (out / "gain.json").write_text(json.dumps(summary["gain"], indent=2))
        lines += [""] + tables.format_gains(gains, folder)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary


__all__ = ["SAMPLING", "blocks", "check_folder", "run_bench", "settings_of"]
