"""One Flow-GRPO iteration at a published recipe's batch on real model shapes: seconds and peak memory per phase,
against bare model calls.

    python scripts/bench_gpu.py                 # one GPU: SD3.5-Medium and FLUX.1-dev shapes, bf16, LoRA
    python scripts/bench_gpu.py --tiny          # the tiny pipelines on CPU (the test that keeps this script alive)

Each model is the published transformer config with random weights (nothing is downloaded), LoRA from the recipe
(rank, targets), conditioning as random text embeddings of the real shapes (text encoders and the VAE are not
part of the timing: their cost is one pass per prompt / image, small beside the transformer's NFE). Phases of
one iteration of ``configs/sd3_flowgrpo_pickscore.yaml`` / ``configs/flux_flowgrpo_pickscore.yaml``:

- rollout: G samples of one prompt with the trainer's own ``rollout`` (Flow SDE on the window, ODE elsewhere,
  CFG as the recipe says), in chunks of ``sampling.max_batch``;
- re-score: every stored SDE step of the window through the GRPO objective's loss with grad (micro-batches of
  ``training.micro_batch_size``), backward;
- optimizer: one AdamW step on the LoRA parameters.

Each phase is printed with the bare cost of its model calls (NFE x the measured time of one bare forward, or of
one forward + backward, at the same batch) and the ratio, then the largest micro-batch whose forward + backward
fits (doubling until out of memory).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# the published transformer configs (transformer/config.json of the hub repos)
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                   dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
FLUX1_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                 axes_dims_rope=(16, 56, 56))
TEXT_TOKENS = {"sd3": 77 + 256, "flux": 512}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak(device) -> str:
    return f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if device.type == "cuda" else "-"


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def build(family: str, tiny: bool, dtype, device):
    """(pipeline, max_sequence_length): the tiny pipeline, or one holding the full-size random transformer."""
    from flowrl.models.tiny import build_tiny

    if tiny:
        return build_tiny(family, seed=0, dtype=dtype).to(device), 32
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    with torch.device(device):
        if family == "sd3":
            transformer = SD3Transformer2DModel(**SD35_MEDIUM).to(dtype)
            sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
            pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=sched, vae=None, text_encoder=None,
                                            tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                            text_encoder_3=None, tokenizer_3=None)
        else:
            transformer = FluxTransformer2DModel(**FLUX1_DEV).to(dtype)
            sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
            pipe = FluxPipeline(transformer=transformer, scheduler=sched, vae=None, text_encoder=None, tokenizer=None,
                                text_encoder_2=None, tokenizer_2=None)
    return pipe, TEXT_TOKENS[family]


def random_conditioning(policy, family: str, n: int, tokens: int, dtype, device, cfg: bool):
    """Text embeddings of the real shapes (random): what the encoders would hand the transformer."""
    from flowrl.sampling.policy import Conditioning

    den = policy.denoiser.config
    g = torch.Generator(device="cpu").manual_seed(0)

    def rows():
        return {"encoder_hidden_states": torch.randn(n, tokens, den.joint_attention_dim, generator=g).to(device, dtype),
                "pooled_projections": torch.randn(n, den.pooled_projection_dim, generator=g).to(device, dtype)}

    shared = {"txt_ids": torch.zeros(tokens, 3, device=device, dtype=dtype)} if family == "flux" else {}
    return Conditioning(cond=rows(), uncond=rows() if cfg else None, shared=shared)


def timed(fn, device, repeats: int = 1) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats


def bench_family(family: str, args, device, dtype) -> list[str]:
    from flowrl.models import policy_from_pipeline
    from flowrl.sampling import rollout
    from flowrl.train import builders
    from flowrl.train.config import load_config
    from flowrl.train.finetune import add_lora
    from flowrl.train.objectives import GRPO
    from flowrl.train.units import aggregation
    from flowrl.train.weights import WeightViews

    recipe = ROOT / "configs" / ("sd3_flowgrpo_pickscore.yaml" if family == "sd3" else "flux_flowgrpo_pickscore.yaml")
    # the recipe's sampling and training settings; its model and reward are not loaded (built here / not timed)
    sets = [f"model.path=tiny:{family}", "rewards.components=brightness", "rewards.kwargs={}",
            "data.train_prompts=prompts:tiny_train", "data.eval_prompts=null", "eval.every=0"]
    if args.tiny:  # the tiny pipelines: small images, a small group, the recipe's structure
        sets += ["model.height=64", "model.width=64", "sampling.plan={name: flat, G: 4}", "sampling.max_batch=4",
                 "training.micro_batch_size=4", "model.max_sequence_length=32"]
    c = load_config(recipe, sets)
    pipe, tokens = build(family, args.tiny, dtype, device)
    policy = policy_from_pipeline(pipe, **({"max_sequence_length": tokens} if not args.tiny else {}))
    den = policy.denoiser
    add_lora(den, family, rank=c.finetune.lora_rank, alpha=c.finetune.lora_alpha,
             targets=c.finetune.lora_target_modules)
    den.to(device)
    params = [p for p in den.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=c.training.lr)
    s = c.sampling
    cfg_on = family == "sd3" and s.guidance_scale > 1
    cond = random_conditioning(policy, family, 1, tokens if not args.tiny else c.model.max_sequence_length, dtype,
                               device, cfg_on)
    kernel, plan, schedule, _ = builders.make_sampler(c)
    G = plan.G
    H, W = c.model.height, c.model.width

    def do_rollout():
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            return rollout(policy, ["p"], plan=plan, kernel=kernel, schedule=schedule, num_steps=s.num_steps,
                           guidance_scale=s.guidance_scale, height=H, width=W, cond=cond, max_batch=s.max_batch)

    do_rollout()  # warm-up (kernels, allocator)
    reset_peak(device)
    out = []
    t_roll = timed(lambda: out.append(do_rollout()), device)
    forest, m_roll = out[0], peak(device)
    # the trainer's weight views (the KL reference: the adapter off), on one process
    views = WeightViews(policy, den, lambda m: m, params)
    objective = GRPO(c, policy, views=views)
    units = objective.units(forest, torch.randn(G, device=device), torch.zeros(G, dtype=torch.long), 0)
    mb = c.training.micro_batch_size

    def rescore():
        for start in range(0, len(units), mb):
            ids = torch.arange(start, min(start + mb, len(units)))
            weights, denom = aggregation(units, ids, "token-mean")
            with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                loss, _ = objective.loss(forest, units, ids)
            ((loss * weights.to(loss)).sum() / denom).backward()

    rescore()
    opt.zero_grad(set_to_none=True)
    reset_peak(device)
    t_train = timed(rescore, device)
    m_train = peak(device)
    t_opt = timed(opt.step, device)
    opt.zero_grad(set_to_none=True)

    # bare calls at the same batches: one forward of the rollout's chunk, one forward + backward of a micro-batch
    shape = policy.latent_shape(H, W)

    def bare(batch: int, grad: bool):
        """The adapter's raw network call on ``batch`` states ([uncond; cond] rows under CFG): one model call."""
        idx = torch.zeros(batch, dtype=torch.long, device=device)
        rows = policy.rows(cond, idx, s.guidance_scale)
        n = batch * (2 if cfg_on else 1)
        x = torch.randn(n, *shape, device=device, dtype=dtype)
        t = torch.full((n,), 500.0, device=device)

        def call():
            with torch.set_grad_enabled(grad), torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                out = policy.forward(x, t, rows, cond.shared, s.guidance_scale)
                if grad:
                    out.float().mean().backward()
        return call

    nfe_roll = forest.nfe
    calls_roll = -(-G // s.max_batch) * s.num_steps
    t_fwd = timed(bare(min(s.max_batch, G), False), device, args.repeats)
    t_fb = timed(bare(min(mb, len(units)), True), device, args.repeats)
    calls_train = -(-len(units) // mb)
    biggest = largest_batch(bare, device, limit=args.max_batch)
    name = f"{'tiny ' if args.tiny else ''}{family} {H}x{W} G={G}, {s.num_steps} steps, LoRA r{c.finetune.lora_rank}"
    return [
        f"| {name} | rollout | {t_roll:.2f} | {m_roll} | {calls_roll} x {t_fwd:.3f} = {calls_roll * t_fwd:.2f} "
        f"| {t_roll / (calls_roll * t_fwd):.2f} | NFE {nfe_roll} |",
        f"| | re-score + backward | {t_train:.2f} | {m_train} | {calls_train} x {t_fb:.3f} = "
        f"{calls_train * t_fb:.2f} | {t_train / (calls_train * t_fb):.2f} | {len(units)} stored steps |",
        f"| | optimizer | {t_opt:.3f} | | | | {sum(p.numel() for p in params) / 1e6:.1f} M LoRA parameters |",
        f"| | largest micro-batch (fwd + bwd) | | | | | {biggest} |",
    ]


def largest_batch(bare, device, limit: int) -> str:
    """Doubling the forward + backward batch until it runs out of memory (or reaches ``limit``)."""
    fits, b = 0, 1
    while b <= limit:
        try:
            bare(b, True)()
            fits = b
        except torch.OutOfMemoryError:
            break
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        b *= 2
    return f"{fits}" + (" (the limit)" if fits == limit or b > limit else "")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="the tiny pipelines on CPU (checks the script runs)")
    ap.add_argument("--models", nargs="+", default=["sd3", "flux"], choices=["sd3", "flux"])
    ap.add_argument("--repeats", type=int, default=3, help="bare calls timed per measurement")
    ap.add_argument("--max-batch", type=int, default=64, help="stop the largest-batch search here")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if not args.tiny and device.type != "cuda":
        raise SystemExit("bench_gpu: no GPU here; --tiny runs the same measurement on the tiny pipelines")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    lines = [f"bench_gpu on {gpu}, {dtype}", "",
             "| model | phase | seconds | peak GiB | bare calls (count x s = s) | ratio | |",
             "|---|---|---:|---:|---:|---:|---|"]
    for family in args.models:
        lines += bench_family(family, args, device, dtype)
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
