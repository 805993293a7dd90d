"""The weight views of one training run, as one object: which weights the policy computes with inside a block.

    views.use("train")      the (DDP-)wrapped model that gradients flow through (the pipeline keeps the plain one)
    views.use("sampling")   rollouts: the soft-updated sampling policy when an objective keeps one, merged into the
                            base weights under finetune.merged_sampling
    views.use("merged")     gradient-free forwards through the LoRA merged into the base (or the weights as they are)
    views.use("reference")  the base model: the LoRA adapter off, or a frozen copy of the initial weights
    views.use("eval")       the EMA of the trained weights when kept, merged like "sampling"
    views.use("ema")        the EMA of the trained weights when kept (what the run saves)

Every view restores what it changed on exit, in reverse order, whatever happens inside.
"""
from __future__ import annotations

import contextlib

from flowrl.train import finetune


class WeightViews:
    def __init__(self, policy, model, unwrap, params, *, ema=None, reference=None, merged_sampling=False,
                 autocast=contextlib.nullcontext):
        self.policy, self.model, self.params = policy, model, params
        self.unwrap = unwrap                # accelerate's unwrap_model
        self.ema = ema                      # diffusers EMAModel or None
        self.reference_copy = reference     # frozen copy (full fine-tuning with KL) or None (LoRA: adapter off)
        self.merged_sampling = merged_sampling
        self.sampling_policy = None         # an objective's soft-updated policy (``active(params)``), or None
        self.autocast = autocast

    def use(self, view: str):
        parts = {"train": (self._train,), "sampling": (self._soft, self._merged), "merged": (self._merged,),
                 "reference": (self._reference,), "eval": (self._ema, self._merged),
                 "ema": (self._ema,)}
        if view not in parts:
            raise ValueError(f"unknown weight view {view!r}; known: {sorted(parts)}")
        return self._stack(parts[view])

    @contextlib.contextmanager
    def _stack(self, parts):
        with contextlib.ExitStack() as stack:
            for part in parts:
                stack.enter_context(part())
            yield

    @contextlib.contextmanager
    def _train(self):
        plain, self.policy.denoiser = self.policy.denoiser, self.model
        try:
            yield
        finally:
            self.policy.denoiser = plain

    def _soft(self):
        if self.sampling_policy is None:
            return contextlib.nullcontext()
        return self.sampling_policy.active(self.params)

    def _merged(self):
        if not self.merged_sampling:
            return contextlib.nullcontext()
        return finetune.merged_lora(self.unwrap(self.model))

    @contextlib.contextmanager
    def _reference(self):
        if self.reference_copy is None:
            with finetune.base_weights(self.unwrap(self.model)):
                yield
            return
        trained, self.policy.denoiser = self.policy.denoiser, self.reference_copy
        try:
            yield
        finally:
            self.policy.denoiser = trained

    @contextlib.contextmanager
    def _ema(self):
        if self.ema is None:
            yield
            return
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.ema.restore(self.params)
