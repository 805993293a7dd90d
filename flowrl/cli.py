"""``flowrl train | plan | sample | eval``.

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

    trainer = Trainer(cfg, resume=resume)
    stopped = trainer.train()
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


def _load_policy(args):
    """A pipeline from --model (folder, hub id or tiny:<family>), with --lora applied the plain-diffusers way."""
    import torch

    from flowrl.models import DTYPES, load_pipeline, policy_from_pipeline
    from flowrl.train.builders import model_family
    from flowrl.train.config import ConfigError

    family = model_family(args.model)
    if args.mix_steps is not None and (not args.lora or not 0 <= args.mix_steps <= args.steps):
        raise ConfigError(f"--mix-steps {args.mix_steps}: needs --lora and 0 <= N <= --steps ({args.steps}): the "
                          "first N steps sample with the LoRA, the rest with the base")
    if args.lora and not (Path(args.lora) / "pytorch_lora_weights.safetensors").is_file():
        raise ConfigError(f"--lora: {args.lora} holds no pytorch_lora_weights.safetensors")
    pipe = load_pipeline(args.model, DTYPES[args.dtype])
    if args.lora:
        pipe.load_lora_weights(args.lora)
    pipe.to("cuda" if torch.cuda.is_available() else "cpu")  # weights already in --dtype
    kw = {} if family == "sd" else {"max_sequence_length": args.max_sequence_length}
    return policy_from_pipeline(pipe, **kw), family


def _prompts(args):
    from flowrl.train.builders import load_prompts

    if args.prompt:
        return [args.prompt], [{}]
    ps = load_prompts(args.prompts, "--prompts")
    n = args.num_prompts or len(ps)
    return ps.prompts[:n], ps.metadata[:n]


def _sample_images(policy, family, prompts, args, per_prompt: int, sde: bool):
    import torch

    from flowrl.sampling import Constant, DDIMEta, Flat, FlowSDE, rollout

    kernel = DDIMEta(eta=1.0) if family == "sd" else FlowSDE(a=args.noise_level)
    before_step = None
    if args.mix_steps is not None:  # MixGRPO's hybrid sampling: the trained LoRA for the first steps, then the base
        pipe = policy.pipe
        before_step = lambda k: pipe.enable_lora() if k < args.mix_steps else pipe.disable_lora()  # noqa: E731
    images = []
    for i in range(0, len(prompts), args.batch_size):
        chunk = prompts[i:i + args.batch_size]
        forest = rollout(policy, chunk, plan=Flat(per_prompt), kernel=kernel,
                         schedule=Constant(1.0 if sde else 0.0), num_steps=args.steps,
                         guidance_scale=args.guidance, height=args.height, width=args.width, seed=args.seed,
                         prompt_ids=list(range(i, i + len(chunk))), before_step=before_step)
        images.append(policy.decode(forest.latents[forest.leaves()]))
    if before_step is not None:
        policy.pipe.enable_lora()
    return torch.cat(images)


def _sample(args) -> None:
    from flowrl.train.images import save_grid

    prompts, _ = _prompts(args)
    policy, family = _load_policy(args)
    images = _sample_images(policy, family, prompts, args, args.num, args.sde)
    out = Path(args.out)
    grid = save_grid(images, out / "grid.png", cols=args.num if args.num > 1 else 8)
    from PIL import Image

    for i, img in enumerate((images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()):
        Image.fromarray(img).save(out / f"{i // args.num:04d}_{i % args.num:02d}.png")
    print(f"flowrl: {len(images)} images in {out} (grid: {grid})")


def _eval(args) -> None:
    import torch

    import rewards

    if args.baseline_differs and not args.baseline:
        raise ValueError("--baseline-differs needs --baseline (the eval.json it differs from)")
    prompts, metadata = _prompts(args)
    from flowrl.llm.cli_eval import eval_lm, is_language_model

    if is_language_model(args.model):
        return eval_lm(args, prompts, metadata)
    reward = rewards.MultiReward(args.rewards, json.loads(args.reward_kwargs) if args.reward_kwargs else None)
    expanded = [p for p in prompts for _ in range(args.num)]
    baseline = _load_baseline(args.baseline, expanded, args) if args.baseline else None  # before any sampling
    policy, family = _load_policy(args)
    images = _sample_images(policy, family, prompts, args, args.num, sde=False)
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


def paired_gains(scores: dict, baseline: dict, prompts: list[str], tags: list[str] | None) -> dict:
    """Mean score differences against a baseline scored on the same prompts and seeds, per category (when
    ``tags``) and overall (GenEval's mean of category means). Standard errors are clustered by prompt: a
    prompt's images share its difficulty, so they are not independent draws."""
    import torch

    keys = [k for k in scores if k in baseline]
    index = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
    pid = torch.tensor([index[p] for p in prompts])
    cats = sorted(set(tags)) if tags else ["all"]
    labels = tags if tags else ["all"] * len(prompts)

    def stats(d: torch.Tensor, mask: torch.Tensor) -> dict:
        ids, inverse = torch.unique(pid[mask], return_inverse=True)
        per_prompt = torch.zeros(len(ids), dtype=torch.float64).index_add_(0, inverse, d[mask])
        per_prompt /= torch.bincount(inverse, minlength=len(ids)).double()
        se = float(per_prompt.std() / len(ids) ** 0.5) if len(ids) > 1 else 0.0
        return {"gain": float(d[mask].mean()), "stderr": se, "prompts": len(ids)}

    out = {}
    for c in cats:
        mask = torch.tensor([t == c for t in labels])
        out[c] = {k: stats(scores[k].double() - baseline[k].double(), mask) for k in keys}
    out["overall"] = {k: {"gain": sum(out[c][k]["gain"] for c in cats) / len(cats),
                          "stderr": sum(out[c][k]["stderr"] ** 2 for c in cats) ** 0.5 / len(cats),
                          "prompts": len(index)} for k in keys}
    return out


def category_stats(scores: dict, tags: list[str]) -> dict:
    """Per-category mean and standard error of every score, and GenEval's overall figure: the mean of the
    category means, its standard error combined from the categories' (images treated as independent)."""
    import torch

    cats = sorted(set(tags))
    out = {}
    for c in cats:
        mask = torch.tensor([t == c for t in tags])
        out[c] = {"n": int(mask.sum())}
        for name, v in scores.items():
            x = v[mask].double()
            out[c][name] = {"mean": float(x.mean()), "stderr": float(x.std() / len(x) ** 0.5) if len(x) > 1 else 0.0}
    overall = {"n": len(tags)}
    for name in scores:
        overall[name] = {"mean": sum(out[c][name]["mean"] for c in cats) / len(cats),
                         "stderr": sum(out[c][name]["stderr"] ** 2 for c in cats) ** 0.5 / len(cats)}
    out["overall (mean of categories)"] = overall
    return out


def _plan(args) -> None:
    from flowrl.train.config import load_config
    from flowrl.train.dry_run import report

    print(report(load_config(args.config, args.set), args.iterations))


def _common(p):
    p.add_argument("--model", required=True, help="diffusers folder, hub id, toy:shapes (the shipped "
                   "shapes-world base) or tiny:<sd3|flux|sd>")
    p.add_argument("--lora", default=None, help="a LoRA folder (e.g. RUN_DIR/lora), loaded with load_lora_weights")
    p.add_argument("--mix-steps", type=int, default=None, metavar="N", help="hybrid sampling (MixGRPO's released "
                   "model): the first N steps with --lora, the rest with the base weights")
    p.add_argument("--prompt", default=None)
    p.add_argument("--prompts", default=None, help=".txt or .jsonl prompt file")
    p.add_argument("--num-prompts", type=int, default=0, help="first N prompts of the file (0: all)")
    p.add_argument("--num", type=int, default=1, help="images per prompt")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=4.5)
    p.add_argument("--noise-level", type=float, default=0.7, help="SDE noise level a (with --sde)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per sampling call")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--max-sequence-length", type=int, default=256)
    p.add_argument("--out", required=True)


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
                        "(to extend), checkpoint / logging / eval cadence and reward retry settings may change")
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
