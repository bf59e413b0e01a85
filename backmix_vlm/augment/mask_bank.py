"""The mask bank: one soft foreground estimate per training sample (BackMix, Eq. 4).

The bank ``C`` is an ``N x h x w`` tensor (``h x w`` = the model's CAM resolution) kept as a
buffer of an ``nn.Module``, so ``state_dict()`` carries it into checkpoints and a resumed run
mixes exactly as the interrupted one would have.

* Initialisation: every cell holds the same constant, 0.5 (the paper's "uniform" start; the
  official code uses 0.5 too).  With all cells tied, :func:`topk_foreground` breaks ties by
  raster order, so until a sample's first update its sharpened mask is the first
  ``round(k*h*w)`` cells; the first EMA update with a continuous CAM breaks the ties.
* Update (Eq. 4): ``C[i] <- beta * C_hat + (1 - beta) * C[i]``, ``beta = momentum`` = weight of
  the NEW map (paper: 0.1).  Maps at another resolution are resized first (area when
  shrinking, bilinear when growing).  An index repeated within one update gets ONE EMA step
  with the mean of its new maps, so the result does not depend on batch order.
* Reading (:meth:`MaskBank.get`) returns a copy and never changes the bank (the official code
  normalises bank rows in place every time it samples a background; we do not).
* Frames (issue 7): with a :class:`~backmix_vlm.augment.geometry.ViewGeometry`, maps of a
  random view are mapped back to the image's canonical frame before the update, and only the
  cells the view covered move, each by ``beta * coverage`` (:meth:`MaskBank.update` with
  ``geometry``); :meth:`MaskBank.view_foreground` maps a row into a view before sharpening.
  Without a geometry every map is taken to be in the canonical frame (Eq. 4 exactly).
* Distributed: when ``torch.distributed`` is initialised with world size > 1, :meth:`update`
  all-gathers indices and maps from every rank (in rank order) and applies the same update
  on every copy, so all banks stay identical.  It is a collective: every rank must call it.
  ``keep`` drops maps before the gather (the trainer's use: the distributed sampler's padding).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import BackMixConfig
from ..errors import ConfigError
from ..runtime import distributed_active

INIT_VALUE = 0.5


def topk_foreground(maps: Tensor, ratio: float) -> Tensor:
    """Sharpen soft maps (B, h, w) to binary masks: the top ``round(ratio*h*w)`` cells -> 1.

    Rounding is half-up; ties are broken deterministically by raster order (a stable sort),
    so a constant map masks its first cells.  Returns a float tensor of 0s and 1s.
    """
    if maps.ndim != 3:
        raise ValueError(f"topk_foreground expects (B, h, w) maps, got shape {tuple(maps.shape)}")
    flat = maps.flatten(1)
    k = int(ratio * flat.shape[1] + 0.5)
    out = torch.zeros_like(flat, dtype=torch.float32)
    if k > 0:
        order = torch.sort(flat, dim=1, descending=True, stable=True).indices[:, :k]
        out.scatter_(1, order, 1.0)
    return out.view_as(maps)


def resize_maps(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize (B, h', w') maps to ``size``: area averaging when shrinking, bilinear otherwise."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    x = maps[:, None].float()
    if maps.shape[-2] >= size[0] and maps.shape[-1] >= size[1]:
        x = F.adaptive_avg_pool2d(x, size)
    else:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x[:, 0].to(maps.dtype)


def all_gather_rows(t: Tensor) -> Tensor:
    """Concatenate ``t`` from every rank in rank order (row counts may differ per rank)."""
    world = dist.get_world_size()
    n = torch.tensor([t.shape[0]], device=t.device, dtype=torch.long)
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n)
    sizes = [int(c.item()) for c in counts]
    padded = t.new_zeros((max(sizes), *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)], dim=0)


class MaskBank(nn.Module):
    """Soft foreground estimates for ``num_samples`` images at ``size`` = (h, w).

    The bank lives in the ``bank`` buffer; ``momentum`` (β) is the weight of the new map.
    """

    def __init__(self, num_samples: int, size: tuple[int, int], device: torch.device | str | None = None,
                 momentum: float = 0.1) -> None:
        super().__init__()
        if int(num_samples) < 1:
            raise ConfigError(f"MaskBank: num_samples={num_samples!r}; expected a positive integer")
        h, w = (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))
        if h < 1 or w < 1:
            raise ConfigError(f"MaskBank: size={size!r}; expected two positive integers (h, w)")
        if not 0.0 <= float(momentum) <= 1.0:
            raise ConfigError(f"backmix.momentum: {momentum!r} is not accepted; expected a number in [0, 1]")
        self.size = (h, w)
        self.momentum = float(momentum)
        self.register_buffer("bank", torch.full((int(num_samples), h, w), INIT_VALUE, device=device))
        self.skipped = 0  # maps refused for non-finite values (logged by the trainer)

    @classmethod
    def from_config(cls, cfg: BackMixConfig, num_samples: int, size: tuple[int, int],
                    device: torch.device | str | None = None) -> "MaskBank":
        return cls(num_samples, size, device=device, momentum=cfg.momentum)

    @property
    def num_samples(self) -> int:
        return self.bank.shape[0]

    def extra_repr(self) -> str:
        return f"num_samples={self.num_samples}, size={self.size}, momentum={self.momentum}"

    # ------------------------------------------------------------------ reading
    def get(self, indices: Tensor) -> Tensor:
        """Soft maps (B, h, w) of these samples: a copy; the bank is never modified by reads."""
        indices = self._check_indices(indices)
        return self.bank.index_select(0, indices)

    def foreground(self, indices: Tensor, ratio: float) -> Tensor:
        """Binary foreground masks C_B (B, h, w): the sharpened maps of these samples."""
        return topk_foreground(self.get(indices), ratio)

    def view_foreground(self, indices: Tensor, ratio: float, geometry: Any = None) -> Tensor:
        """C_B in each sample's current view: the canonical row mapped into the view (parts of
        the view outside the image count as background), then sharpened to its top ``ratio``."""
        maps = self.get(indices)
        if geometry is not None:
            maps = geometry.to(maps.device).to_view(maps)
        return topk_foreground(maps, ratio)

    # ------------------------------------------------------------------ writing
    @torch.no_grad()
    def update(self, indices: Tensor, maps: Tensor, distributed: bool | None = None,
               geometry: Any = None, keep: Tensor | None = None) -> None:
        """EMA-update the rows ``indices`` with new foreground maps (B, h', w') in [0, 1].

        ``geometry`` (a :class:`~backmix_vlm.augment.geometry.ViewGeometry`): the maps are of
        these views; they are mapped back to the canonical frame and each cell moves by
        ``momentum * coverage``.  Maps with non-finite values are skipped (their rows keep their
        value) and counted in ``skipped``.  ``keep`` (B booleans): only these maps are used — the
        trainer drops the distributed sampler's padding (repeats of samples that another batch of
        the epoch already holds), so every image gets one update per epoch.
        ``distributed=None`` gathers from all ranks whenever a multi-process group is running;
        pass False to update only this copy (e.g. when maps were already gathered).
        """
        if maps.ndim == 4 and maps.shape[1] == 1:
            maps = maps[:, 0]
        if maps.ndim != 3:
            raise ValueError(f"MaskBank.update expects maps of shape (B, h, w), got {tuple(maps.shape)}")
        indices = indices.reshape(-1).to(device=self.bank.device, dtype=torch.long)
        if maps.shape[0] != indices.shape[0]:
            raise ValueError(f"MaskBank.update: {indices.shape[0]} indices but {maps.shape[0]} maps")
        maps = maps.detach().to(device=self.bank.device, dtype=self.bank.dtype)
        finite = torch.isfinite(maps.flatten(1)).all(dim=1)
        if not bool(finite.all()):  # e.g. an fp16 overflow in a relevance map: never enter the bank
            self.skipped += int((~finite).sum())
            maps = torch.where(finite[:, None, None], maps, torch.zeros_like(maps))
        weights = finite.to(maps.dtype)[:, None, None].expand(-1, *self.size)
        if geometry is not None:
            maps, coverage = geometry.to(maps.device).to_canonical(maps, self.size)
            weights = weights * coverage.to(maps.dtype)
        else:
            maps = resize_maps(maps, self.size)
        if keep is not None:
            keep = keep.reshape(-1).to(device=self.bank.device, dtype=torch.bool)
            indices, maps, weights = indices[keep], maps[keep], weights[keep]
        if distributed is None:
            distributed = distributed_active()
        if distributed:
            indices = all_gather_rows(indices)
            maps = all_gather_rows(maps.contiguous())
            weights = all_gather_rows(weights.contiguous())
        self._ema_rows(self._check_indices(indices), maps, weights)

    def _ema_rows(self, indices: Tensor, maps: Tensor, weights: Tensor) -> None:
        """``C <- C + momentum * w * (new - C)`` per cell; ``w`` = 1 is Eq. 4 exactly."""
        if indices.numel() == 0:
            return
        rows, inverse = torch.unique(indices, sorted=True, return_inverse=True)
        if rows.numel() == indices.numel():  # no duplicates: put the maps in sorted-row order
            new = torch.empty_like(maps).index_copy_(0, inverse, maps)
            weight = torch.empty_like(weights).index_copy_(0, inverse, weights)
        else:  # duplicates: weighted mean of their maps, mean weight (deterministic matmuls)
            onehot = F.one_hot(inverse, rows.numel()).T.to(maps.dtype)  # (U, B)
            mass = onehot @ weights.flatten(1)
            new = (onehot @ (maps * weights).flatten(1)) / mass.clamp_min(1e-12)
            new = new.view(-1, *self.size)
            weight = (mass / onehot.sum(1, keepdim=True)).view(-1, *self.size)
        old = self.bank.index_select(0, rows)
        if bool((weight == 1).all()):  # the exact arithmetic of Eq. 4
            updated = self.momentum * new + (1.0 - self.momentum) * old
        else:
            step = self.momentum * weight
            updated = step * new + (1.0 - step) * old
        self.bank.index_copy_(0, rows, updated)

    def _check_indices(self, indices: Tensor) -> Tensor:
        indices = indices.reshape(-1).to(device=self.bank.device, dtype=torch.long)
        if indices.numel():
            low, high = (int(v) for v in torch.aminmax(indices))
            if low < 0 or high >= self.num_samples:
                raise IndexError(
                    f"MaskBank: sample index out of range [0, {self.num_samples}) (got min {low}, "
                    f"max {high}); the bank must be sized to the dataset being iterated"
                )
        return indices
