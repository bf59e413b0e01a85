"""How well sharpened foreground maps find the true foreground (datasets with known masks).

For each image, the prediction is the top-``ratio`` cells of its soft map (the same
:func:`~backmix_vlm.augment.mask_bank.topk_foreground` BackMix masks with), upsampled
(nearest) to the true mask's resolution.  Reported, as means over images:

* ``precision``: the share of predicted pixels that are foreground (what BackMix needs: the
  pixels it blanks out should be object, not background);
* ``iou``: intersection over union with the true mask;
* ``random_precision`` / ``random_iou``: the same for a uniformly random top-k of the cells
  (one fixed draw), the chance level;
* ``centre_precision`` / ``centre_iou``: for the top-k of a centred Gaussian map, the
  "objects are in the middle" prior a map must beat to be worth anything.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..augment.mask_bank import topk_foreground


def upsample_nearest(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, h, w) -> (N, H, W) by nearest neighbour (pixel row ``y`` reads cell ``y * h // H``),
    the rule BackMix pastes with."""
    n, h, w = masks.shape
    rows = torch.arange(size[0], device=masks.device) * h // size[0]
    cols = torch.arange(size[1], device=masks.device) * w // size[1]
    return masks[:, rows][:, :, cols]


def precision_iou(pred: Tensor, true: Tensor) -> tuple[float, float]:
    """Mean per-image precision and IoU of boolean masks (N, H, W); images whose prediction is
    empty count as precision 0."""
    pred, true = pred.bool(), true.bool()
    inter = (pred & true).flatten(1).sum(1).float()
    npred = pred.flatten(1).sum(1).float()
    union = (pred | true).flatten(1).sum(1).float()
    precision = torch.where(npred > 0, inter / npred.clamp_min(1), torch.zeros_like(inter))
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))
    return float(precision.mean()), float(iou.mean())


def centre_prior(size: tuple[int, int], sigma: float = 0.25) -> Tensor:
    """A centred isotropic Gaussian over an (h, w) grid (sigma in fractions of the side)."""
    h, w = size
    y = (torch.arange(h, dtype=torch.float32) + 0.5) / h - 0.5
    x = (torch.arange(w, dtype=torch.float32) + 0.5) / w - 0.5
    return torch.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma ** 2))


@torch.no_grad()
def mask_quality(maps: Tensor, true_masks: Tensor, ratio: float, *, seed: int = 0,
                 chunk: int = 4096) -> dict[str, float]:
    """Precision / IoU of the top-``ratio`` cells of ``maps`` (N, h, w) against ``true_masks``
    (N, H, W) in the same (canonical) frame, with the random and centre-prior references."""
    if maps.shape[0] != true_masks.shape[0]:
        raise ValueError(f"mask_quality: {maps.shape[0]} maps but {true_masks.shape[0]} true masks")
    n, h, w = maps.shape
    size = tuple(true_masks.shape[-2:])
    gen = torch.Generator().manual_seed(seed)
    centre = centre_prior((h, w))
    sums = {k: 0.0 for k in ("precision", "iou", "random_precision", "random_iou", "centre_precision", "centre_iou")}
    for start in range(0, n, chunk):
        part = slice(start, min(start + chunk, n))
        true = true_masks[part].to(maps.device).bool()
        m = true.shape[0]
        candidates = {
            "": maps[part].float(),
            "random_": torch.rand(m, h, w, generator=gen).to(maps.device),
            "centre_": centre.to(maps.device).expand(m, h, w),
        }
        for prefix, soft in candidates.items():
            pred = upsample_nearest(topk_foreground(soft, ratio), size) > 0
            p, i = precision_iou(pred, true)
            sums[f"{prefix}precision"] += p * m
            sums[f"{prefix}iou"] += i * m
    return {k: v / n for k, v in sums.items()}
