"""BackMix (Wang et al., Eq. 3): paste a foreground-masked background patch onto each image.

For each target image TI in the batch a background image BI is picked from the same batch,
and

    x~ = M ⊙ (1 − C_B) ⊙ x_B + (1 − M) ⊙ x_T,        y~ = y_T

* ``C_B``: BI's bank map sharpened to its top ``mask_ratio`` cells (k, see
  :func:`~backmix_vlm.augment.mask_bank.topk_foreground`), upsampled (nearest) to the image.  Foreground pixels of the pasted patch become ``fill`` (0.0 in
  normalised space, i.e. the dataset mean: grey).
* ``M``: a fixed-size box whose AREA is ``cut_area`` (s) of the image: side
  ``round(sqrt(s) * H)`` x ``round(sqrt(s) * W)``, placed uniformly at random fully inside the
  image (CutMix clips its box at the border; we keep the whole box so the area is exactly s).
  The paper uses s = 0.25 (a 0.5 x 0.5 box); the official code pastes a 0.25 x 0.25 box
  (s = 1/16).
* ``same_location=True`` (paper): the patch comes from the same place in BI.  False (official
  code): an independent, uniformly random source box in BI.
* The label is TI's alone: no label mixing (``MixResult.lam == 1``).
* Frames: with a ``geometry`` (each batch image's random view of its canonical image, see
  :mod:`~backmix_vlm.augment.geometry`), BI's bank row is mapped into BI's *current view*
  before sharpening, so C_B lies on BI's object as it appears in the batch.
* ``mask_source``: where C_B comes from — ``bank`` (the method), ``random`` (a uniformly random
  top-k of the bank's cells: an ablation) or ``oracle`` (the true foreground masks of a
  dataset that has them, ``true_masks`` (N, H, W) in the canonical frame: the best the
  mechanism can do).

Everything is batched tensor work on the batch's device (no per-sample loop, no PIL), and
all randomness comes from ``generator`` (or torch's global RNG when None).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..config import MASK_SOURCES, PAIRINGS
from ..errors import ConfigError
from ..validation import check_choice
from .base import Mixer, MixerSetup, MixResult, box_mask, check_fraction, rand, randint, randperm
from .factory import MIXERS
from .mask_bank import MaskBank, topk_foreground


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
class BackMix(Mixer):
    """Batched BackMix over a :class:`MaskBank`; see the module docstring for the maths.

    ``bank`` (and ``generator``, ``true_masks``) may be left out and handed over by :meth:`setup`
    (what the trainer does: it owns the bank and the random stream).
    """

    needs_bank = True
    options = ("fill",)
    label = "BackMix"

    def __init__(self, bank: MaskBank | None = None, cut_area: float = 0.25, mask_ratio: float = 0.25,
                 same_location: bool = True, pairing: str = "random",
                 generator: torch.Generator | None = None, fill: float = 0.0,
                 mask_source: str = "bank", true_masks: Tensor | None = None) -> None:
        self.bank = bank
        check_choice(mask_source, MASK_SOURCES, "backmix.mask_source")
        self.mask_source = mask_source
        self.true_masks = true_masks
        self.cut_area = check_fraction(cut_area, "cut_area")
        self.mask_ratio = check_fraction(mask_ratio, "mask_ratio")
        self.same_location = bool(same_location)
        check_choice(pairing, PAIRINGS, "backmix.pairing")
        self.pairing = pairing
        self.generator = generator
        self.fill = float(fill)

    @classmethod
    def from_config(cls, options: dict[str, Any], backmix: Any) -> "BackMix":
        """The ``backmix`` section's mixing keys (the others configure the bank and the engine)."""
        return cls(cut_area=backmix.cut_area, mask_ratio=backmix.mask_ratio, same_location=backmix.same_location,
                   pairing=backmix.pairing, mask_source=backmix.mask_source, **options)

    def setup(self, inputs: MixerSetup) -> None:
        """The trainer's bank and random stream; the true masks (moved to the batches' device)."""
        self.generator, self.bank = inputs.generator, inputs.bank
        if self.mask_source == "oracle":
            if inputs.true_masks is None:
                raise ConfigError("backmix.mask_source: 'oracle' needs a training set with foreground masks "
                                  "(e.g. the bgshift datasets); this one has none")
            self.true_masks = inputs.true_masks.to(inputs.device)

    def __repr__(self) -> str:
        return (f"BackMix(cut_area={self.cut_area}, mask_ratio={self.mask_ratio}, "
                f"same_location={self.same_location}, pairing={self.pairing!r}, fill={self.fill}, "
                f"mask_source={self.mask_source!r})")

    def partners(self, labels: Tensor) -> Tensor:
        """Index (within the batch) of each sample's background image."""
        if self.pairing == "different_class":
            return different_class_partners(labels, self.generator)
        return random_partners(labels.shape[0], self.generator, labels.device)

    def foreground(self, indices: Tensor, geometry: Any = None) -> Tensor:
        """C_B (B, h', w') bool for the images ``indices`` (bank rows), in their views."""
        if self.mask_source == "oracle":
            if self.true_masks is None:
                raise ConfigError("backmix.mask_source: 'oracle' needs the true foreground masks of the training "
                                  "set (a dataset with foreground masks, e.g. bgshift)")
            masks = self.true_masks.index_select(0, indices.to(self.true_masks.device)).to(indices.device).float()
            if geometry is not None:
                masks = geometry.to(indices.device).to_view(masks)
            return masks >= 0.5
        if self.bank is None:
            raise ConfigError("BackMix has no mask bank: pass bank=MaskBank(num_samples, cam_size) or call setup()")
        if self.mask_source == "random":
            n, (h, w) = indices.shape[0], self.bank.size
            return topk_foreground(rand((n, h, w), self.generator, indices.device), self.mask_ratio) > 0
        return self.bank.view_foreground(indices, self.mask_ratio, geometry).to(indices.device) > 0

    @torch.no_grad()
    def __call__(self, images: Tensor, labels: Tensor, indices: Tensor, *,
                 geometry: Any = None, return_masks: bool = False) -> MixResult:
        """Mix a normalised batch (B, C, H, W); ``indices`` are the samples' bank rows,
        ``geometry`` (optional) the views the batch images are of.

        Only the boxes are computed: all source patches are read from the BIs with one
        ``index_select`` on flat pixel indices, their foreground pixels (C_B upsampled by
        nearest neighbour: pixel row ``y`` reads bank cell ``y * h // H``) are set to ``fill``,
        and one ``index_copy_`` writes them into a copy of the batch at the target boxes.
        ``return_masks=True`` adds ``partner``, ``box_mask`` (M), ``fg_mask`` (C_B at image size,
        BI coordinates), ``fg_cells`` (C_B at its own resolution: the bank's cells), ``pasted_fg`` (pixels set to ``fill``) and ``box`` (top, left,
        src_top, src_left) to ``MixResult.extras``.
        """
        b, _, h, w = images.shape
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

        fg = self.foreground(indices.to(device)[partner], None if geometry is None else geometry[partner])  # C_B
        fh, fw = fg.shape[-2:]
        ar_h, ar_w = torch.arange(box_h, device=device), torch.arange(box_w, device=device)
        rows, cols = (src_top[:, None] + ar_h)[:, :, None], (src_left[:, None] + ar_w)[:, None, :]
        dst_rows, dst_cols = (top[:, None] + ar_h)[:, :, None], (left[:, None] + ar_w)[:, None, :]
        batch = torch.arange(b, device=device)
        images = images.contiguous()
        patch = images.view(-1).index_select(0, _flat_index(images.shape, partner, rows, cols))
        patch_fg = fg[batch[:, None, None], rows * fh // h, cols * fw // w]  # (B, box_h, box_w)
        patch = patch.view(b, -1, box_h, box_w).masked_fill(patch_fg[:, None], self.fill)
        mixed = images.clone()
        mixed.view(-1).index_copy_(0, _flat_index(images.shape, batch, dst_rows, dst_cols), patch.view(-1))

        extras = {}
        if return_masks:
            pasted = torch.zeros(b, h, w, dtype=torch.bool, device=device)
            pasted[batch[:, None, None], dst_rows, dst_cols] = patch_fg
            full_r = (torch.arange(h, device=device) * fh // h)[None, :, None]
            full_c = (torch.arange(w, device=device) * fw // w)[None, None, :]
            extras = {
                "partner": partner,
                "box_mask": box_mask(top, left, box_h, box_w, (h, w)),
                "fg_mask": fg[batch[:, None, None], full_r, full_c],
                "fg_cells": fg,
                "pasted_fg": pasted,
                "box": torch.stack([top, left, src_top, src_left], dim=1),
            }
        return MixResult(mixed, labels, None, 1.0, extras)


def _flat_index(shape: torch.Size, batch: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Flat indices into a contiguous (B, C, H, W) tensor of the pixels ``(batch[i], :, rows, cols)``.

    ``rows`` (B, bh, 1) and ``cols`` (B, 1, bw) give each sample's box; the result is ordered
    (B, C, bh, bw), so one ``index_select`` / ``index_copy_`` moves all boxes at once.
    """
    _, c, h, w = shape
    chan = torch.arange(c, device=batch.device)[None, :, None, None]
    return ((batch[:, None, None, None] * c + chan) * (h * w) + (rows * w + cols)[:, None]).reshape(-1)
