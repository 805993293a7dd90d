"""The reward interface and the registry by name.

A reward maps a batch of decoded images and their prompts to one or more named scores:

    reward(images (N,3,H,W) float in [0,1], prompts: list[str], metadata: list[dict] | None,
           groups: LongTensor (N,) | None) -> dict[str, Tensor]

Rewards on language-model completions (rewards.text.TextReward, ``modality = "text"``) take a list of N
completion strings in place of the images; everything else below is the same.

Video. Text-to-video policies decode clips (N, F, 3, H, W). An image reward (``modality = "image"``) scores
such a batch frame-wise: every ``frame_stride``-th frame is scored as an image with its clip's prompt and
metadata, and each score is the mean over the clip's scored frames. A reward that judges the whole clip sets
``modality = "video"`` and gets the 5-D batch itself. ``frame_stride`` is an instance attribute (default 1),
set from the reward's kwargs like any other option (``rewards.kwargs: {ocr: {frame_stride: 4}}``).

``groups`` says which samples are compared with each other (the trainer passes each sample's prompt slot).
Pointwise rewards ignore it; a reward that ranks samples within their group (Pref-GRPO's pairwise win rate)
sets ``uses_groups = True``, gets it as a fourth argument of ``score`` and refuses a call without it.

Score naming. A subclass's ``score`` returns either one Tensor (its main score) or a dict of *local*
keys that must contain the class's ``main_key``. ``__call__`` renames them globally: the main score
becomes ``reward.name`` and every extra ``k`` becomes ``f"{reward.name}/{k}"``. So a MultiReward's
output has one key per component (the one its weight applies to) plus ``component/sub`` extras that
are only logged. Names therefore must not contain "/" (nor "," or ":", used by the spec syntax).

Scores are float32, shape (N,), on the CPU or on the images' device, and finite: a NaN/inf raises
``RewardOutputError`` with the offending indices, so the trainer decides what to do; nothing here
replaces bad values.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

# Decoders clamp to [0,1] but a bf16 -> fp32 round trip or a resize can step a hair outside.
RANGE_TOL = 1e-3
_FORBIDDEN = ("/", ",", ":")


class RewardOutputError(ValueError):
    """A reward returned a malformed or non-finite score; ``reward``, ``key`` and ``indices`` say where."""

    def __init__(self, message: str, reward: str, key: str, indices: list[int] | None = None):
        super().__init__(message)
        self.reward, self.key, self.indices = reward, key, list(indices or [])


class Reward:
    """Base class: subclasses set ``main_key`` if they return a dict, and implement ``score``."""

    name: str = ""            # set by @register; build_reward sets it on the instance too
    main_key: str = "score"   # local key of the score a weight applies to
    needs_grad: bool = False  # False: __call__ runs score under torch.no_grad
    uses_groups: bool = False  # True: score(images, prompts, metadata, groups) and groups are required
    modality: str = "image"    # what score() takes: decoded images, clips ("video") or completions ("text")
    frame_stride: int = 1      # clips scored by an image reward: every frame_stride-th frame

    def score(self, images: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor | dict[str, Tensor]:
        raise NotImplementedError

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Reward":
        return self

    def close(self) -> None:
        """Release models, sessions or connections; a no-op for stateless rewards."""

    @property
    def label(self) -> str:
        return self.name or type(self).__name__

    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Sequence[dict] | None = None,
                 groups: Tensor | None = None) -> dict[str, Tensor]:
        n = self._check_samples(images)
        prompts, metadata = self._check_context(prompts, metadata, n)
        groups = self._check_groups(groups, n)
        if self.modality == "image" and images.dim() == 5:
            return self._frame_wise(images, prompts, metadata, groups)
        with torch.set_grad_enabled(self.needs_grad and torch.is_grad_enabled()):
            if self.uses_groups:
                raw = self.score(images, prompts, metadata, groups)
            else:
                raw = self.score(images, prompts, metadata)
        return self._check_outputs(raw, n, images.device if isinstance(images, Tensor) else torch.device("cpu"))

    def _frame_wise(self, clips: Tensor, prompts: list[str], metadata: list[dict], groups) -> dict[str, Tensor]:
        """An image reward on clips: the mean of its scores over each clip's frames (every frame_stride-th)."""
        if self.uses_groups:
            raise ValueError(f"reward {self.label!r} ranks images within groups; frames of one clip would be "
                             "ranked against each other: score clips with a video reward (modality 'video')")
        frames = clips[:, ::self.frame_stride]
        n, f = frames.shape[:2]
        out = self(frames.flatten(0, 1), [p for p in prompts for _ in range(f)],
                   [m for m in metadata for _ in range(f)])
        return {k: v.view(n, f).mean(1) for k, v in out.items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.label!r})"

    # -- validation ---------------------------------------------------------------------------------
    def _check_samples(self, images) -> int:
        """Validate what is scored (here: decoded images) and return the batch size."""
        who = f"reward {self.label!r}"
        if not isinstance(images, Tensor):
            raise ValueError(f"{who}: images must be a torch.Tensor, got {type(images).__name__}")
        if self.modality == "video" and (images.dim() != 5 or images.shape[2] != 3):
            raise ValueError(f"{who}: scores clips of shape (N, frames, 3, H, W), got {tuple(images.shape)}")
        if images.dim() not in (4, 5) or images.shape[-3] != 3:
            raise ValueError(f"{who}: images must have shape (N, 3, H, W), got {tuple(images.shape)} (clips: "
                             "(N, frames, 3, H, W))")
        if not images.is_floating_point():
            raise ValueError(f"{who}: images must be floating point in [0, 1], got dtype {images.dtype}")
        n = images.shape[0]
        if n == 0:
            raise ValueError(f"{who}: got an empty batch of images")
        pixels = images.detach()
        if not torch.isfinite(pixels).all():
            raise ValueError(f"{who}: images contain NaN or inf")
        lo, hi = (float(v) for v in torch.aminmax(pixels))
        if lo < -RANGE_TOL or hi > 1 + RANGE_TOL:
            raise ValueError(f"{who}: image values must lie in [0, 1], got range [{lo:.4g}, {hi:.4g}] "
                             "(decode to [0, 1], not [-1, 1] or [0, 255])")
        return n

    def _check_context(self, prompts, metadata, n: int) -> tuple[list[str], list[dict]]:
        who, what = f"reward {self.label!r}", "images" if self.modality == "image" else "completions"
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise ValueError(f"{who}: prompts must be a list of str, got {type(prompts).__name__}")
        if len(prompts) != n:
            raise ValueError(f"{who}: got {len(prompts)} prompts for {n} {what}")
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        if bad:
            raise ValueError(f"{who}: prompts must be str; not at indices {bad[:10]}")
        if metadata is None:
            metadata = [{} for _ in range(n)]
        elif isinstance(metadata, Mapping) or not isinstance(metadata, Sequence):
            raise ValueError(f"{who}: metadata must be a list of dicts (one per sample) or None, "
                             f"got {type(metadata).__name__}")
        elif len(metadata) != n:
            raise ValueError(f"{who}: got {len(metadata)} metadata entries for {n} {what}")
        elif not all(isinstance(m, Mapping) for m in metadata):
            raise ValueError(f"{who}: every metadata entry must be a dict")
        return list(prompts), list(metadata)

    def _check_groups(self, groups, n: int) -> Tensor | None:
        who = f"reward {self.label!r}"
        if groups is None:
            if self.uses_groups:
                raise ValueError(f"{who} compares samples within groups: pass groups= (one group id per image, "
                                 "e.g. its prompt index)")
            return None
        if not isinstance(groups, Tensor) or groups.dtype != torch.long or groups.shape != (n,):
            raise ValueError(f"{who}: groups must be a LongTensor of shape ({n},), got "
                             f"{getattr(groups, 'dtype', type(groups).__name__)} {tuple(getattr(groups, 'shape', ()))}")
        return groups.cpu()

    def _check_outputs(self, raw, n: int, device: torch.device) -> dict[str, Tensor]:
        who = self.label
        if isinstance(raw, Tensor):
            raw = {self.main_key: raw}
        if not isinstance(raw, Mapping):
            raise RewardOutputError(f"reward {who!r}: score() must return a Tensor or a dict of Tensors, "
                                    f"got {type(raw).__name__}", who, "")
        if self.main_key not in raw:
            raise RewardOutputError(f"reward {who!r}: score() returned keys {sorted(raw)} without its main key "
                                    f"{self.main_key!r}", who, self.main_key)
        out: dict[str, Tensor] = {}
        for key, value in raw.items():
            full = who if key == self.main_key else f"{who}/{key}"
            if not isinstance(key, str) or not key or any(c in key for c in _FORBIDDEN):
                raise RewardOutputError(f"reward {who!r}: bad score key {key!r} (non-empty str without "
                                        f"{'/'.join(_FORBIDDEN)})", who, str(key))
            if not isinstance(value, Tensor) or not value.is_floating_point():
                raise RewardOutputError(f"reward {who!r}: score {full!r} must be a floating-point Tensor, got "
                                        f"{getattr(value, 'dtype', type(value).__name__)}", who, full)
            if value.shape != (n,):
                raise RewardOutputError(f"reward {who!r}: score {full!r} has shape {tuple(value.shape)}, "
                                        f"expected ({n},)", who, full)
            if value.device.type != "cpu" and value.device != device:
                raise RewardOutputError(f"reward {who!r}: score {full!r} is on {value.device}, expected cpu or "
                                        f"the samples' device {device}", who, full)
            bad = (~torch.isfinite(value)).nonzero().flatten().tolist()
            if bad:
                more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
                raise RewardOutputError(f"reward {who!r}: score {full!r} is NaN/inf at sample indices "
                                        f"{bad[:10]}{more}", who, full, bad)
            out[full] = value.to(torch.float32)
        return out


# -- registry ---------------------------------------------------------------------------------------
REWARDS: dict[str, type[Reward]] = {}


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not name.strip() or name != name.strip() or any(c in name for c in _FORBIDDEN):
        raise ValueError(f"bad reward name {name!r}: a non-empty str without spaces at the ends or "
                         f"{', '.join(repr(c) for c in _FORBIDDEN)}")


def register(name: str) -> Callable[[type[Reward]], type[Reward]]:
    """Class decorator: ``@register("brightness")`` adds the class to REWARDS and sets its ``name``."""
    _check_name(name)

    def wrap(cls: type[Reward]) -> type[Reward]:
        if not (isinstance(cls, type) and issubclass(cls, Reward)):
            raise TypeError(f"@register({name!r}) needs a Reward subclass, got {cls!r}")
        old = REWARDS.get(name)
        # the same class re-imported (module reload) may re-register; a different one may not
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"reward name {name!r} is already registered to {old.__module__}.{old.__qualname__}")
        REWARDS[name] = cls
        cls.name = name
        return cls

    return wrap


def _unknown(name: str) -> ValueError:
    return ValueError(f"unknown reward {name!r}; known rewards: {sorted(REWARDS)}")


def build_reward(name: str, **kwargs) -> Reward:
    """Instantiate a registered reward; loads nothing until the reward's own constructor does."""
    if name not in REWARDS:
        raise _unknown(name)
    cls = REWARDS[name]
    stride = kwargs.pop("frame_stride", 1)  # the base class's option, not the constructor's
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"reward {name!r}: frame_stride must be an int >= 1, got {stride!r}")
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as e:
        params = [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
        unexpected = [k for k in kwargs if k not in params]
        what = f"unexpected argument(s) {unexpected}" if unexpected else str(e)
        raise ValueError(f"reward {name!r}: {what}; accepted arguments: {params + ['frame_stride']}") from None
    reward = cls(**kwargs)
    reward.name = name
    reward.frame_stride = stride
    return reward


# -- specs ------------------------------------------------------------------------------------------
def _weight(name: str, w: Any) -> float:
    if isinstance(w, bool):
        raise ValueError(f"reward {name!r}: weight must be a number, got {w!r}")
    try:
        f = float(w)
    except (TypeError, ValueError):
        raise ValueError(f"reward {name!r}: weight must be a number, got {w!r}") from None
    if f != f or f in (float("inf"), float("-inf")):
        raise ValueError(f"reward {name!r}: weight must be finite, got {w!r}")
    return f


def parse_reward_spec(spec: str | Sequence[str] | Mapping[str, float]) -> dict[str, float]:
    """``"a:1.0,b:0.5"`` / ``["a:1", "b"]`` / ``{"a": 1.0}`` -> {name: weight}; a missing weight is 1.0.

    A weight of 0 keeps a reward computed and logged but out of the advantage; negative weights penalise.
    """
    if isinstance(spec, Mapping):
        items = list(spec.items())
    else:
        if isinstance(spec, str):
            entries = spec.split(",")
        elif isinstance(spec, Sequence):
            entries = list(spec)
        else:
            raise ValueError(f"reward spec must be a str, list or dict, got {type(spec).__name__}")
        items = []
        for e in entries:
            if not isinstance(e, str) or not e.strip():
                raise ValueError(f"bad reward spec entry {e!r} in {spec!r}: expected 'name' or 'name:weight'")
            name, sep, w = e.strip().partition(":")
            items.append((name.strip(), w.strip() if sep else 1.0))
    if not items:
        raise ValueError("reward spec is empty: name at least one reward")
    out: dict[str, float] = {}
    for name, w in items:
        if not isinstance(name, str) or name not in REWARDS:
            raise _unknown(name)
        if name in out:
            raise ValueError(f"reward {name!r} appears twice in spec {spec!r}")
        out[name] = _weight(name, w)
    return out
