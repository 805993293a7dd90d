"""Loading a pipeline (+ LoRA) from command-line options and drawing its samples: what ``flowrl sample``,
``flowrl eval`` and ``flowrl bench`` share."""
from __future__ import annotations

from pathlib import Path


def check_weights(args) -> None:
    """--lora and --mix-steps, before anything loads or is written."""
    from flowrl.train.config import ConfigError

    if args.mix_steps is not None and (not args.lora or not 0 <= args.mix_steps <= args.steps):
        raise ConfigError(f"--mix-steps {args.mix_steps}: needs --lora and 0 <= N <= --steps ({args.steps}): the "
                          "first N steps sample with the LoRA, the rest with the base")
    if args.lora and not (Path(args.lora) / "pytorch_lora_weights.safetensors").is_file():
        raise ConfigError(f"--lora: {args.lora} holds no pytorch_lora_weights.safetensors")


def load_policy(args, device=None):
    """A pipeline from --model (folder, hub id or tiny:<family>), with --lora applied the plain-diffusers way,
    on ``device`` (default: CUDA when there is one)."""
    import torch

    from flowrl.models import DTYPES, family_of_pipeline, load_pipeline, policy_from_pipeline
    from flowrl.train.builders import model_family

    family = model_family(args.model)
    check_weights(args)
    pipe = load_pipeline(args.model, DTYPES[args.dtype])
    if args.lora:
        from flowrl.train.finetune import check_lora_fits

        check_lora_fits(pipe, args.lora)  # one line naming a misfit, not peft's traceback (or a silent drop)
        pipe.load_lora_weights(args.lora)
    pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))  # weights already in --dtype
    found = family_of_pipeline(type(pipe).__name__)  # a hub id is only resolved once loaded
    family = found.name if found is not None else family
    # the adapter options this family takes that the command line sets
    kw = {k: getattr(args, k) for k in ("max_sequence_length", "auto_resize", "num_frames")
          if found and k in found.options and getattr(args, k, None) is not None}
    return policy_from_pipeline(pipe, **kw), family


def sample_images(policy, family, prompts, args, per_prompt: int, sde: bool, prompt_ids=None, inputs=None):
    """``per_prompt`` samples of each prompt (ODE, or the SDE with ``sde``), in batches of --batch-size prompts.
    Sample j of a prompt is seeded by (--seed, its prompt id, j): the same image whatever batch or process draws
    it. ``prompt_ids`` default to the prompts' positions; ``inputs``: editing models' input images, one per
    prompt."""
    import torch

    from flowrl.sampling import Constant, DDIMEta, Flat, FlowSDE, rollout

    kernel = DDIMEta(eta=1.0) if policy.family == "ddim" else FlowSDE(a=args.noise_level)
    before_step = None
    if args.mix_steps is not None:  # MixGRPO's hybrid sampling: the trained LoRA for the first steps, then the base
        pipe = policy.pipe
        before_step = lambda k: pipe.enable_lora() if k < args.mix_steps else pipe.disable_lora()  # noqa: E731
    ids = list(range(len(prompts))) if prompt_ids is None else list(prompt_ids)
    images = []
    for i in range(0, len(prompts), args.batch_size):
        chunk = prompts[i:i + args.batch_size]
        forest = rollout(policy, chunk, plan=Flat(per_prompt), kernel=kernel,
                         schedule=Constant(1.0 if sde else 0.0), num_steps=args.steps,
                         guidance_scale=args.guidance, height=args.height, width=args.width, seed=args.seed,
                         prompt_ids=ids[i:i + len(chunk)], before_step=before_step,
                         images=None if inputs is None else inputs[i:i + len(chunk)])
        images.append(policy.decode(forest.latents[forest.leaves()]))
    if before_step is not None:
        policy.pipe.enable_lora()
    return torch.cat(images)


__all__ = ["check_weights", "load_policy", "sample_images"]
