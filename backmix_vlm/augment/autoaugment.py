"""RandAugment / TrivialAugment on the batch's device: each sample its own op, no PIL.

torchvision's ``RandAugment`` / ``TrivialAugmentWide`` draw one op for a whole tensor, so a
per-sample policy would need a Python call per image.  Here every sample draws its op (and, for
TrivialAugment, its magnitude bin and sign) from the run's generator; samples that drew the same
(op, magnitude) are transformed together with torchvision's functional op, so each image gets
exactly the pixels torchvision's transform gives it for that draw (tested).

The ops that move pixels (shear, translate, rotate) change an image's frame: such samples are
reported in ``frame_kept`` so that BackMix's mask bank does not average their CAMs into the
canonical frame (``docs/methods.md``).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from ..errors import ConfigError

#: op -> (magnitudes(num_bins, height, width) or None, signed): RandAugment's space (Cubuk et al. 2020,
#: as torchvision defines it)
RANDAUGMENT_SPACE: dict[str, tuple[Callable[[int, int, int], Tensor] | None, bool]] = {
    "Identity": (None, False),
    "ShearX": (lambda n, h, w: torch.linspace(0.0, 0.3, n), True),
    "ShearY": (lambda n, h, w: torch.linspace(0.0, 0.3, n), True),
    "TranslateX": (lambda n, h, w: torch.linspace(0.0, 150.0 / 331.0 * w, n), True),
    "TranslateY": (lambda n, h, w: torch.linspace(0.0, 150.0 / 331.0 * h, n), True),
    "Rotate": (lambda n, h, w: torch.linspace(0.0, 30.0, n), True),
    "Brightness": (lambda n, h, w: torch.linspace(0.0, 0.9, n), True),
    "Color": (lambda n, h, w: torch.linspace(0.0, 0.9, n), True),
    "Contrast": (lambda n, h, w: torch.linspace(0.0, 0.9, n), True),
    "Sharpness": (lambda n, h, w: torch.linspace(0.0, 0.9, n), True),
    "Posterize": (lambda n, h, w: (8 - (torch.arange(n) / ((n - 1) / 4))).round().int(), False),
    "Solarize": (lambda n, h, w: torch.linspace(1.0, 0.0, n), False),
    "AutoContrast": (None, False),
    "Equalize": (None, False),
}
#: TrivialAugment's wide space (Müller & Hutter 2021, as torchvision's TrivialAugmentWide defines it)
TRIVIALAUGMENT_SPACE: dict[str, tuple[Callable[[int, int, int], Tensor] | None, bool]] = {
    "Identity": (None, False),
    "ShearX": (lambda n, h, w: torch.linspace(0.0, 0.99, n), True),
    "ShearY": (lambda n, h, w: torch.linspace(0.0, 0.99, n), True),
    "TranslateX": (lambda n, h, w: torch.linspace(0.0, 32.0, n), True),
    "TranslateY": (lambda n, h, w: torch.linspace(0.0, 32.0, n), True),
    "Rotate": (lambda n, h, w: torch.linspace(0.0, 135.0, n), True),
    "Brightness": (lambda n, h, w: torch.linspace(0.0, 0.99, n), True),
    "Color": (lambda n, h, w: torch.linspace(0.0, 0.99, n), True),
    "Contrast": (lambda n, h, w: torch.linspace(0.0, 0.99, n), True),
    "Sharpness": (lambda n, h, w: torch.linspace(0.0, 0.99, n), True),
    "Posterize": (lambda n, h, w: (8 - (torch.arange(n) / ((n - 1) / 6))).round().int(), False),
    "Solarize": (lambda n, h, w: torch.linspace(1.0, 0.0, n), False),
    "AutoContrast": (None, False),
    "Equalize": (None, False),
}
POLICIES = {"randaugment": RANDAUGMENT_SPACE, "trivialaugment": TRIVIALAUGMENT_SPACE}
#: ops that move pixels, so the view's frame is no longer the crop box's
GEOMETRIC_OPS = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"})


def apply_op(images: Tensor, op: str, magnitude: float) -> Tensor:
    """One auto-augment op on a uint8 batch (B, C, H, W), exactly as torchvision's auto-augment
    transforms apply it (nearest interpolation, black fill)."""
    if op == "Identity":
        return images
    if op in ("ShearX", "ShearY"):
        shear = math.degrees(math.atan(magnitude))
        return TF.affine(images, angle=0.0, translate=[0, 0], scale=1.0, center=[0, 0],
                         shear=[shear, 0.0] if op == "ShearX" else [0.0, shear], fill=0)
    if op in ("TranslateX", "TranslateY"):
        shift = [int(magnitude), 0] if op == "TranslateX" else [0, int(magnitude)]
        return TF.affine(images, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0], fill=0)
    if op == "Rotate":
        return TF.rotate(images, angle=magnitude, fill=0)
    if op == "Brightness":
        return TF.adjust_brightness(images, 1.0 + magnitude)
    if op == "Color":
        return TF.adjust_saturation(images, 1.0 + magnitude)
    if op == "Contrast":
        return TF.adjust_contrast(images, 1.0 + magnitude)
    if op == "Sharpness":
        return TF.adjust_sharpness(images, 1.0 + magnitude)
    if op == "Posterize":
        return TF.posterize(images, int(magnitude))
    if op == "Solarize":
        return TF.solarize(images, 255.0 * magnitude)
    if op == "AutoContrast":
        return TF.autocontrast(images)
    if op == "Equalize":
        return TF.equalize(images)
    raise ValueError(f"unknown auto-augment op {op!r}")


class BatchAutoAugment:
    """Per-sample RandAugment (``num_ops`` ops at ``magnitude``) or TrivialAugment (one op, a
    magnitude bin drawn per sample) on a uint8 batch, on its device.

    Returns ``(images, frame_kept)``: ``frame_kept`` (B,) is False for samples that went through a
    geometric op.
    """

    def __init__(self, policy: str = "randaugment", num_ops: int = 2, magnitude: int = 9,
                 num_magnitude_bins: int = 31) -> None:
        if policy not in POLICIES:
            raise ConfigError(f"data.views.options.auto_augment.policy: {policy!r} is not accepted; "
                              f"choose {', '.join(POLICIES)}")
        if policy == "trivialaugment" and num_ops != 1:
            raise ConfigError("data.views.options.auto_augment.num_ops: TrivialAugment applies exactly one op")
        if int(num_ops) < 0 or not 0 <= int(magnitude) < int(num_magnitude_bins):
            raise ConfigError(f"data.views.options.auto_augment: num_ops {num_ops!r} must be >= 0 and magnitude "
                              f"{magnitude!r} in [0, num_magnitude_bins={num_magnitude_bins})")
        self.policy, self.num_ops = policy, int(num_ops)
        self.magnitude, self.num_bins = int(magnitude), int(num_magnitude_bins)
        self.ops = list(POLICIES[policy])

    def __repr__(self) -> str:
        if self.policy == "trivialaugment":
            return "TrivialAugment()"
        return f"RandAugment(num_ops={self.num_ops}, magnitude={self.magnitude})"

    def draw(self, n: int, generator: torch.Generator | None) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per round: op index, magnitude bin and sign (+1 / -1) of each sample (CPU tensors)."""
        rounds = []
        for _ in range(self.num_ops):
            op = torch.randint(len(self.ops), (n,), generator=generator)
            if self.policy == "trivialaugment":
                bins = torch.randint(self.num_bins, (n,), generator=generator)
            else:
                bins = torch.full((n,), self.magnitude, dtype=torch.long)
            sign = torch.where(torch.rand(n, generator=generator) <= 0.5, -1.0, 1.0)
            rounds.append((op, bins, sign))
        return rounds

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        if images.dtype != torch.uint8:
            raise ConfigError("data.views.options.auto_augment works on uint8 batches: set data.cache: memory")
        n, h, w = images.shape[0], images.shape[-2], images.shape[-1]
        frame_kept = torch.ones(n, dtype=torch.bool)
        out = images
        for op_idx, bins, sign in self.draw(n, generator):
            out = out.clone()
            for k in torch.unique(op_idx).tolist():
                name = self.ops[k]
                fn, signed = POLICIES[self.policy][name]
                rows = op_idx == k
                if name in GEOMETRIC_OPS:
                    frame_kept &= ~rows
                if fn is None:
                    groups = [(rows, 0.0)]
                else:
                    mags = fn(self.num_bins, h, w)
                    keys = bins * 2 + (sign < 0).long() if signed else bins * 2
                    groups = []
                    for key in torch.unique(keys[rows]).tolist():
                        m = float(mags[key // 2]) * (-1.0 if key % 2 else 1.0)
                        groups.append((rows & (keys == key), m))
                for sel, m in groups:
                    idx = sel.nonzero().flatten().to(images.device)
                    out[idx] = apply_op(out[idx], name, m)
        return out, frame_kept.to(images.device)
