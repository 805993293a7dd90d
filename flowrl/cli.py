"""``flowrl train | plan | sample | eval | bench``.

Config and input errors are reported as one line (``flowrl: error: ...``) before any model is loaded.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _train(args) -> None:
    from flowrl.llm.config import build_llm_config
    from flowrl.train.config import load_config, read_recipe

    data = read_recipe(args.config, args.set)
    llm = data.get("trainer", "image") == "llm"  # the language-model trainer (flowrl.llm); else the image one
    cfg = build_llm_config(data) if llm else load_config(args.config, args.set)
    resume = None
    if args.resume:
        from flowrl.train.checkpoint import prepare_resume

        resume = prepare_resume(cfg, args.resume)
    if llm:
        from flowrl.llm.trainer import LMTrainer as Trainer
    else:
        from flowrl.train.trainer import Trainer  # heavy imports only after the config is known to be good

    try:
        trainer = Trainer(cfg, resume=resume)
        stopped = trainer.train()
    except RuntimeError as e:  # a process lost or hung: one line naming run.collective_timeout, not a traceback
        from flowrl.train.loop import collective_failure

        lost = collective_failure(e, cfg)
        if lost is None:
            raise
        raise lost from e
    if not trainer.acc.is_main_process:
        return
    if stopped:
        it = trainer.state.iteration
        same = " (with the same --set options)" if args.set else ""
        print(f"flowrl: stopped by {stopped} after {it} of {cfg.run.iterations} iterations; checkpoint "
              f"{trainer.stopped[1]}\nflowrl: continue with: flowrl train {args.config} --resume "
              f"{cfg.run.output_dir}{same}")
        return
    out = "lora" if cfg.finetune.mode == "lora" else "model"
    print(f"flowrl: finished {cfg.run.iterations} iterations; run folder {cfg.run.output_dir} ({out}/, "
          f"metrics.jsonl, {'' if llm else 'samples/, '}checkpoints/, reward_curve.png)")


def _prompts(args):
    from flowrl.train.builders import load_prompts

    if args.prompt:
        return [args.prompt], [{"image": str(Path(args.image).resolve())} if args.image else {}]
    if args.image:
        raise ValueError("--image goes with --prompt; a prompt file names each row's input image in an 'image' field")
    ps = load_prompts(args.prompts, "--prompts")
    n = args.num_prompts or len(ps)
    return ps.prompts[:n], ps.metadata[:n]


def _inputs(policy, metadata):
    """Editing models' input images (the rows' 'image' fields), checked before any sampling."""
    from flowrl.train.builders import prompt_images

    return prompt_images(metadata, "--prompts / --image") if policy.needs_image else None


def _sample(args) -> None:
    from flowrl.bench.sampling import load_policy, sample_images
    from flowrl.train.images import save_clip, save_grid

    prompts, metadata = _prompts(args)
    policy, family = load_policy(args)
    images = sample_images(policy, family, prompts, args, args.num, args.sde, inputs=_inputs(policy, metadata))
    out = Path(args.out)
    grid = save_grid(images, out / "grid.png", cols=args.num if args.num > 1 else 8)
    names = [f"{i // args.num:04d}_{i % args.num:02d}" for i in range(len(images))]
    if policy.video:  # clips: one animated GIF each
        for name, clip in zip(names, images):
            save_clip(clip, out / f"{name}.gif")
    else:
        from PIL import Image

        for name, img in zip(names, (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()):
            Image.fromarray(img).save(out / f"{name}.png")
    print(f"flowrl: {len(images)} {'clips' if policy.video else 'images'} in {out} (grid: {grid})")


def _eval(args) -> None:
    import torch

    import rewards
    from flowrl.bench.sampling import load_policy, sample_images
    from flowrl.bench.stats import category_stats, paired_gains

    if args.baseline_differs and not args.baseline:
        raise ValueError("--baseline-differs needs --baseline (the eval.json it differs from)")
    prompts, metadata = _prompts(args)
    from flowrl.llm.cli_eval import eval_lm, is_language_model

    if is_language_model(args.model):
        return eval_lm(args, prompts, metadata)
    reward = rewards.MultiReward(args.rewards, json.loads(args.reward_kwargs) if args.reward_kwargs else None)
    expanded = [p for p in prompts for _ in range(args.num)]
    baseline = _load_baseline(args.baseline, expanded, args) if args.baseline else None  # before any sampling
    policy, family = load_policy(args)
    images = sample_images(policy, family, prompts, args, args.num, sde=False, inputs=_inputs(policy, metadata))
    meta = [m for m in metadata for _ in range(args.num)]
    groups = torch.arange(len(prompts)).repeat_interleave(args.num)  # a prompt's images: one group (pairwise)
    all_scores = reward(images, expanded, meta, groups=groups)
    verdicts = {k: v for k, v in all_scores.items() if k.endswith(("/correct", "/strict"))}
    scores = {**reward.main_scores(all_scores), **verdicts}
    n = len(images)
    table = {k: {"mean": float(v.mean()), "std": float(v.std()) if n > 1 else 0.0,
                 "stderr": float(v.std() / n**0.5) if n > 1 else 0.0, "n": n} for k, v in scores.items()}
    tags = [m.get("tag") for m in meta]
    categories = category_stats(scores, tags) if all(isinstance(t, str) for t in tags) else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    per_image = {"prompt": expanded, **{k: v.tolist() for k, v in scores.items()}}
    (out / "eval.json").write_text(json.dumps({"model": args.model, "lora": args.lora, "mix_steps": args.mix_steps,
                                               "prompts": len(prompts),
                                               **{k: getattr(args, k) for k in PAIRED_SETTINGS.values()},
                                               "images_per_prompt": args.num, "scores": table,
                                               "categories": categories, "per_image": per_image}, indent=2))
    lines = ["| reward | mean | std | stderr | n |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {r['mean']:.4f} | {r['std']:.4f} | {r['stderr']:.4f} | {r['n']} |" for k, r in table.items()]
    if categories:  # GenEval-style metadata: a table per category
        names = list(scores)
        lines += ["", "| category | n | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for cat, row in categories.items():
            lines.append(f"| {cat} | {row['n']} | "
                         + " | ".join(f"{row[k]['mean']:.4f} ± {row[k]['stderr']:.4f}" for k in names) + " |")
    if baseline is not None:
        gains = paired_gains(scores, {k: torch.tensor(v) for k, v in baseline["per_image"].items() if k in scores},
                             expanded, tags if categories else None)
        differs = {k: {"baseline": baseline.get(k), "this": getattr(args, k)} for k in args.baseline_differs or []}
        (out / "gain.json").write_text(json.dumps({"baseline": args.baseline, "differs": differs, "gains": gains},
                                                  indent=2))
        names = list(gains["overall"])
        changed = "".join(f"; baseline {k} {v['baseline']}, this eval {v['this']}" for k, v in differs.items())
        lines += ["", f"Gain over {args.baseline} (same prompts and seeds{changed}; standard errors clustered by "
                  "prompt):", "",
                  "| category | prompts | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for cat, row in gains.items():
            lines.append(f"| {cat} | {row[names[0]]['prompts']} | "
                         + " | ".join(f"{row[k]['gain']:+.4f} ± {row[k]['stderr']:.4f}" for k in names) + " |")
    (out / "eval.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


# options a paired comparison must share with its baseline (option -> argparse / eval.json key): the seeds, the
# sampling, and what scores the images
PAIRED_SETTINGS = {"--seed": "seed", "--steps": "steps", "--guidance": "guidance", "--height": "height",
                   "--width": "width", "--max-sequence-length": "max_sequence_length", "--dtype": "dtype",
                   "--rewards": "rewards", "--reward-kwargs": "reward_kwargs"}
# sampler settings a comparison may change on purpose (--baseline-differs): the initial noise is the seed's
# whatever they are, so the images stay paired. E.g. a CFG-free RL model (DiffusionNFT) against its base at the
# guidance the base is used with.
SAMPLER_SETTINGS = ("guidance", "steps", "dtype")


def _load_baseline(path: str, expanded: list[str], args) -> dict:
    """A previous eval.json of the same prompts, images per prompt and seed (checked before sampling)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--baseline {path} is not a file (give a previous run's eval.json)")
    base = json.loads(p.read_text())
    if "per_image" not in base:
        raise ValueError(f"--baseline {path} has no per-image scores (re-run that eval)")
    if base.get("images_per_prompt") != args.num:
        raise ValueError(f"--baseline {path} has {base.get('images_per_prompt')} images per prompt, this eval "
                         f"{args.num}: a paired gain needs the same prompts, images per prompt and seed")
    differs = args.baseline_differs or []
    for option, key in PAIRED_SETTINGS.items():
        if key in differs:
            if base.get(key) == getattr(args, key):
                raise ValueError(f"--baseline-differs {key}: the baseline used the same {option} "
                                 f"{getattr(args, key)}; drop it from --baseline-differs")
            continue
        if base.get(key) != getattr(args, key):
            raise ValueError(f"--baseline {path} used {option} {base.get(key)}, this eval {getattr(args, key)}: "
                             "a paired gain needs the same seeds, sampling settings and rewards (a sampler "
                             f"setting changed on purpose goes in --baseline-differs: {', '.join(SAMPLER_SETTINGS)})")
    if base["per_image"]["prompt"] != expanded:
        raise ValueError(f"--baseline {path} scored different prompts (or another order)")
    return base


def _plan(args) -> None:
    from flowrl.train.config import load_config
    from flowrl.train.dry_run import report

    print(report(load_config(args.config, args.set), args.iterations))


def sampling_options(p) -> None:
    """The options that decide a sample: model, weights, sampler settings, seed (flowrl sample, eval, bench)."""
    p.add_argument("--model", required=True, help="diffusers folder, hub id, toy:shapes (the shipped "
                   "shapes-world base) or tiny:<family>")
    p.add_argument("--lora", default=None, help="a LoRA folder (e.g. RUN_DIR/lora), loaded with load_lora_weights")
    p.add_argument("--mix-steps", type=int, default=None, metavar="N", help="hybrid sampling (MixGRPO's released "
                   "model): the first N steps with --lora, the rest with the base weights")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=4.5)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per sampling call")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--max-sequence-length", type=int, default=256)
    p.add_argument("--num-frames", type=int, default=None, help="video models: frames per clip (default: the "
                   "adapter's, Wan 81)")
    p.add_argument("--auto-resize", action=argparse.BooleanOptionalAction, default=True,
                   help="FLUX Kontext: resize input images to its preferred resolutions (as its pipeline does)")
    p.add_argument("--out", required=True)


def _common(p):
    sampling_options(p)
    p.add_argument("--prompt", default=None)
    p.add_argument("--image", default=None, help="editing models: the input image of --prompt")
    p.add_argument("--prompts", default=None, help=".txt or .jsonl prompt file, or a shipped set: prompts:<name>")
    p.add_argument("--num-prompts", type=int, default=0, help="first N prompts of the file (0: all)")
    p.add_argument("--num", type=int, default=1, help="images per prompt")
    p.add_argument("--noise-level", type=float, default=0.7, help="SDE noise level a (with --sde)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="flowrl", description="Group-relative RL for text-to-image flow models.")
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train with a YAML recipe")
    t.add_argument("config")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    t.add_argument("--resume", default=None, metavar="latest|RUN_DIR|CHECKPOINT",
                   help="continue a run from a checkpoint: 'latest' is the newest complete checkpoint in "
                        "run.output_dir (complete: RUN/checkpoints/iter_N/checkpoint.json exists and every file it "
                        "lists has the recorded size; others are skipped), RUN_DIR the same in that run folder, "
                        "RUN_DIR/checkpoints/iter_N exactly that one. Weights, optimizer, LR schedule, EMA, "
                        "random states and metrics.jsonl continue where the checkpoint left them; only run.iterations "
                        "(to extend), checkpoint / logging / eval cadence, reward retry settings and "
                        "run.collective_timeout may change")
    t.set_defaults(fn=_train)
    d = sub.add_parser("plan", help="a recipe's rollout and training cost per iteration (model calls, edges, "
                       "leaves, trained units, training forward passes), without loading a model")
    d.add_argument("config")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    d.add_argument("--iterations", type=int, default=3, help="iterations to show (windows may move)")
    d.set_defaults(fn=_plan)
    s = sub.add_parser("sample", help="sample images from a pipeline (+ optional LoRA)")
    _common(s)
    s.add_argument("--sde", action="store_true", help="sample with the Flow SDE instead of the ODE")
    s.set_defaults(fn=_sample)
    e = sub.add_parser("eval", help="ODE samples on a prompt file, scored by rewards; a table printed and saved "
                       "(for a language model --model: greedy accuracy, pass@--num, paired gain over --baseline)")
    _common(e)
    e.add_argument("--rewards", required=True, help='reward spec, e.g. "brightness:1,jpeg_compressibility:0.5"')
    e.add_argument("--reward-kwargs", default=None, help='JSON: {"reward_name": {"arg": value}}')
    e.add_argument("--baseline", default=None, help="a previous eval.json on the same prompts, images per prompt and "
                   "seed (e.g. the base model's): also report the paired gain per category, with standard errors")
    e.add_argument("--baseline-differs", nargs="+", default=None, choices=SAMPLER_SETTINGS, metavar="SETTING",
                   help=f"sampler settings ({', '.join(SAMPLER_SETTINGS)}) this eval changes on purpose against "
                        "--baseline, e.g. guidance for a CFG-free model against its base at the base's guidance; "
                        "everything else must match")
    e.add_argument("--max-new-tokens", type=int, default=16, help="language models: the completion budget")
    e.add_argument("--chat-template", action="store_true", help="language models: prompts as one user message "
                   "through the tokenizer's chat template")
    e.set_defaults(fn=_eval)
    from flowrl.bench.cli import add_bench_parser

    add_bench_parser(sub, sampling_options, SAMPLER_SETTINGS)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("sample", "eval") and not (args.prompt or args.prompts):
        print("flowrl: error: give --prompt or --prompts", file=sys.stderr)
        return 2
    from flowrl.train.config import ConfigError
    from flowrl.train.guards import TrainingError

    try:
        args.fn(args)
    except (ConfigError, ValueError) as e:
        if os.environ.get("FLOWRL_TRACEBACK"):
            raise
        print(f"flowrl: error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:  # the run started and cannot go on; its last checkpoint is intact
        if os.environ.get("FLOWRL_TRACEBACK"):
            raise
        print(f"flowrl: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
