"""Augmentation baselines from the paper's comparison: Cutout, Mixup, CutMix (and no mixing).

Each is a :class:`~backmix_vlm.augment.base.Mixer` (``indices`` and ``geometry`` unused: no
mask bank), operates on a normalised batch with tensor ops only, and draws all randomness from
``generator`` (torch's global RNG when None).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import Mixer, MixResult, box_mask, check_fraction, rand, randint, randperm, sample_beta
from .factory import MIXERS

_CPU = torch.device("cpu")


def _check_alpha(alpha: float, owner: str) -> float:
    if not float(alpha) > 0:
        raise ConfigError(f"{owner}.alpha: {alpha!r} is not accepted; expected a number > 0")
    return float(alpha)


@MIXERS.register("none")
class NoMix(Mixer):
    """The identity: plain training through the same interface."""

    mixes = False

    def __call__(self, images: Tensor, labels: Tensor, indices: Tensor | None = None, *,
                 geometry: Any = None, return_masks: bool = False) -> MixResult:
        return MixResult(images, labels)


@MIXERS.register("cutout")
class Cutout(Mixer):
    """Cutout (DeVries & Taylor, 2017): zero one square per image, centre anywhere.

    The square's side is ``side`` of the image side (0.5: 16 px at 32 px, the paper's CIFAR
    setting); its centre is uniform over all pixels and it is clipped at the border, so
    boxes near an edge are smaller, as in the original.  Zero in normalised space = the mean.
    """

    options = ("side", "fill")
    label = "Cutout"

    def __init__(self, side: float = 0.5, fill: float = 0.0, generator: torch.Generator | None = None) -> None:
        self.side = check_fraction(side, "side", owner="cutout")
        self.fill = float(fill)
        self.generator = generator

    @torch.no_grad()
    def __call__(self, images: Tensor, labels: Tensor, indices: Tensor | None = None, *,
                 geometry: Any = None, return_masks: bool = False) -> MixResult:
        b, _, h, w = images.shape
        len_h, len_w = int(self.side * h + 0.5), int(self.side * w + 0.5)
        cy = randint(h, b, self.generator, images.device)
        cx = randint(w, b, self.generator, images.device)
        top, left = (cy - len_h // 2).clamp(min=0), (cx - len_w // 2).clamp(min=0)
        bottom, right = (cy - len_h // 2 + len_h).clamp(max=h), (cx - len_w // 2 + len_w).clamp(max=w)
        box = box_mask(top, left, bottom - top, right - left, (h, w))
        out = images.masked_fill(box[:, None], self.fill)
        return MixResult(out, labels, extras={"box_mask": box} if return_masks else {})


@MIXERS.register("mixup")
class Mixup(Mixer):
    """Mixup (Zhang et al., 2018): ``lam*x + (1-lam)*x[perm]``, one λ ~ Beta(α, α) per batch."""

    options = ("alpha",)
    label = "Mixup"

    def __init__(self, alpha: float = 1.0, generator: torch.Generator | None = None) -> None:
        self.alpha = _check_alpha(alpha, "mixup")
        self.generator = generator

    @torch.no_grad()
    def __call__(self, images: Tensor, labels: Tensor, indices: Tensor | None = None, *,
                 geometry: Any = None, return_masks: bool = False) -> MixResult:
        lam = sample_beta(self.alpha, self.generator)
        perm = randperm(images.shape[0], self.generator, images.device)
        mixed = lam * images + (1.0 - lam) * images[perm]
        return MixResult(mixed, labels, labels[perm], lam, {"partner": perm} if return_masks else {})


@MIXERS.register("cutmix")
class CutMix(Mixer):
    """CutMix (Yun et al., 2019), as in the official code: one box and one λ per batch.

    λ ~ Beta(α, α); the box has side ``int(H * sqrt(1 - λ))`` around a uniform centre, clipped
    at the border, and λ is recomputed from the box actually pasted.  ``prob`` is the chance a
    batch is mixed at all (the official CIFAR recipe uses 0.5; default 1.0).
    """

    options = ("alpha", "prob")
    label = "CutMix"

    def __init__(self, alpha: float = 1.0, prob: float = 1.0, generator: torch.Generator | None = None) -> None:
        self.alpha = _check_alpha(alpha, "cutmix")
        self.prob = check_fraction(prob, "prob", owner="cutmix")
        self.generator = generator

    @torch.no_grad()
    def __call__(self, images: Tensor, labels: Tensor, indices: Tensor | None = None, *,
                 geometry: Any = None, return_masks: bool = False) -> MixResult:
        b, _, h, w = images.shape
        if self.prob < 1.0 and float(rand((1,), self.generator, _CPU)) >= self.prob:
            return MixResult(images, labels)
        lam = sample_beta(self.alpha, self.generator)
        perm = randperm(b, self.generator, images.device)
        cut = math.sqrt(1.0 - lam)
        cut_h, cut_w = int(h * cut), int(w * cut)
        cy, cx = int(randint(h, 1, self.generator, _CPU)), int(randint(w, 1, self.generator, _CPU))
        y1, y2 = min(max(cy - cut_h // 2, 0), h), min(max(cy + cut_h // 2, 0), h)
        x1, x2 = min(max(cx - cut_w // 2, 0), w), min(max(cx + cut_w // 2, 0), w)
        mixed = images.clone()
        mixed[:, :, y1:y2, x1:x2] = images[perm, :, y1:y2, x1:x2]
        lam = 1.0 - (y2 - y1) * (x2 - x1) / (h * w)
        extras = {}
        if return_masks:
            top = torch.tensor([y1], device=images.device)
            left = torch.tensor([x1], device=images.device)
            extras = {"partner": perm, "box_mask": box_mask(top, left, y2 - y1, x2 - x1, (h, w)).expand(b, h, w)}
        return MixResult(mixed, labels, labels[perm], lam, extras)
