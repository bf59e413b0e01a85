"""BackMix (Wang et al., Eq. 3): paste a foreground-masked background patch onto each image.

For each target image TI in the batch a background image BI is picked from the same batch,
and

    x~ = M ⊙ (1 − C_B) ⊙ x_B + (1 − M) ⊙ x_T,        y~ = y_T

* ``C_B``: BI's bank map sharpened to its top ``mask_ratio`` cells (k), upsampled (nearest)
  to the image size.  Foreground pixels of the pasted patch become ``fill`` (0.0 in
  normalised space, i.e. the dataset mean: grey).
* ``M``: a fixed-size box whose AREA is ``cut_area`` (s) of the image: side
  ``round(sqrt(s) * H)`` x ``round(sqrt(s) * W)``, placed uniformly at random fully inside the
  image (CutMix clips its box at the border; we keep the whole box so the area is exactly s).
  The paper uses s = 0.25 (a 0.5 x 0.5 box); the official code pastes a 0.25 x 0.25 box
  (s = 1/16).
* ``same_location=True`` (paper): the patch comes from the same place in BI.  False (official
  code): an independent, uniformly random source box in BI.
* The label is TI's alone: no label mixing (``MixResult.lam == 1``).

Everything is batched tensor work on the batch's device (no per-sample loop, no PIL), and
all randomness comes from ``generator`` (or torch's global RNG when None).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import check_choice
from .base import MixResult, box_mask, check_fraction, rand, randint, randperm
from .factory import MIXERS
from .mask_bank import MaskBank

PAIRINGS = ("random", "different_class")


def box_side(cut_area: float, size: tuple[int, int]) -> tuple[int, int]:
    """Box (height, width) with area fraction ``cut_area``: ``round(sqrt(s) * H)`` (half up)."""
    r = math.sqrt(cut_area)
    return int(r * size[0] + 0.5), int(r * size[1] + 0.5)


def random_partners(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """A random permutation without fixed points: every image is some other image's BI once.

    The batch is shuffled into one random cycle and each image takes the previous one in the
    cycle (a batch of one pairs with itself).
    """
    order = randperm(n, generator, device)
    partner = torch.empty_like(order)
    partner[order] = order.roll(1)
    return partner


def different_class_partners(labels: Tensor, generator: torch.Generator | None) -> Tensor:
    """For each sample, a uniformly random batch member of a DIFFERENT class.

    Vectorised: random scores over the (B, B) candidate matrix, invalid pairs set to -1,
    argmax per row.  Backgrounds may be reused (sampling with replacement, like the official
    code's random background).  A sample whose class fills the whole batch falls back to any
    other sample (itself only in a batch of one).
    """
    n = labels.shape[0]
    valid = labels[:, None] != labels[None, :]
    others = ~torch.eye(n, dtype=torch.bool, device=labels.device) if n > 1 else torch.ones(1, 1, dtype=torch.bool, device=labels.device)
    valid = torch.where(valid.any(dim=1, keepdim=True), valid, others)
    scores = rand((n, n), generator, labels.device).masked_fill(~valid, -1.0)
    return scores.argmax(dim=1)


@MIXERS.register("backmix")
class BackMix:
    """Batched BackMix over a :class:`MaskBank`; see the module docstring for the maths."""

    def __init__(self, bank: MaskBank, cut_area: float = 0.25, mask_ratio: float = 0.25,
                 same_location: bool = True, pairing: str = "random",
                 generator: torch.Generator | None = None, fill: float = 0.0) -> None:
        self.bank = bank
        self.cut_area = check_fraction(cut_area, "cut_area")
        self.mask_ratio = check_fraction(mask_ratio, "mask_ratio")
        self.same_location = bool(same_location)
        check_choice(pairing, PAIRINGS, "backmix.pairing")
        self.pairing = pairing
        self.generator = generator
        self.fill = float(fill)

    def __repr__(self) -> str:
        return (f"BackMix(cut_area={self.cut_area}, mask_ratio={self.mask_ratio}, "
                f"same_location={self.same_location}, pairing={self.pairing!r}, fill={self.fill})")

    def partners(self, labels: Tensor) -> Tensor:
        """Index (within the batch) of each sample's background image."""
        if self.pairing == "different_class":
            return different_class_partners(labels, self.generator)
        return random_partners(labels.shape[0], self.generator, labels.device)

    @torch.no_grad()
    def __call__(self, images: Tensor, labels: Tensor, indices: Tensor,
                 return_masks: bool = False) -> MixResult:
        """Mix a normalised batch (B, C, H, W); ``indices`` are the samples' bank rows."""
        b, c, h, w = images.shape
        device = images.device
        labels = labels.to(device)
        partner = self.partners(labels)
        box_h, box_w = box_side(self.cut_area, (h, w))
        top = randint(h - box_h + 1, b, self.generator, device)
        left = randint(w - box_w + 1, b, self.generator, device)
        if self.same_location:
            src_top, src_left = top, left
        else:
            src_top = randint(h - box_h + 1, b, self.generator, device)
            src_left = randint(w - box_w + 1, b, self.generator, device)

        # BI with its estimated foreground blanked out, in BI's own coordinates.
        fg = self.bank.foreground(indices.to(device)[partner], self.mask_ratio)
        fg = F.interpolate(fg[:, None].to(device), size=(h, w), mode="nearest")[:, 0].bool()
        background = images[partner].masked_fill(fg[:, None], self.fill)
        if not self.same_location:  # move each source box onto its target box
            background, fg = _shift(background, fg, src_top - top, src_left - left)

        box = box_mask(top, left, box_h, box_w, (h, w))
        mixed = torch.where(box[:, None], background, images)
        extras = {}
        if return_masks:
            extras = {
                "partner": partner,
                "box_mask": box,                     # M, target coordinates
                "fg_mask": fg,                       # C_B moved to target coordinates
                "pasted_fg": box & fg,               # pixels set to `fill`
                "box": torch.stack([top, left, src_top, src_left], dim=1),
            }
        return MixResult(mixed, labels, None, 1.0, extras)


def _shift(images: Tensor, masks: Tensor, dy: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample translation: ``out[b, :, y, x] = in[b, :, y + dy[b], x + dx[b]]`` (edge-clamped).

    One gather over flattened pixel indices; inside the target box the source index is
    never clamped because both boxes lie fully inside the image.
    """
    b, c, h, w = images.shape
    rows = (torch.arange(h, device=images.device) + dy[:, None]).clamp_(0, h - 1)
    cols = (torch.arange(w, device=images.device) + dx[:, None]).clamp_(0, w - 1)
    flat = (rows[:, :, None] * w + cols[:, None, :]).view(b, 1, h * w)
    moved = images.flatten(2).gather(2, flat.expand(b, c, h * w)).view(b, c, h, w)
    moved_masks = masks.flatten(1).gather(1, flat[:, 0]).view(b, h, w)
    return moved, moved_masks
