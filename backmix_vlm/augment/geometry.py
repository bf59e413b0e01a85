"""Random crop / flip as a batched operation on the batch's device, with the geometry kept.

Why this module exists (issue 7): BackMix keeps one foreground estimate per training image in
a mask bank.  When crop and flip run in DataLoader workers, every step sees another random
view of an image, so a bank row would average maps of different frames and its top-k mask
would be applied to yet another view.  Here the loader returns each image in its
*canonical frame* (decoded and resized, nothing random), and the trainer draws each sample's
view here, on the device, knowing its geometry:

* :class:`ViewGeometry` holds, per sample, the crop box in canonical coordinates and a flip
  flag; it warps images into their views (:meth:`ViewGeometry.warp_images`), canonical maps
  into views (:meth:`ViewGeometry.to_view`, used for the background image's bank row before
  top-k masking) and view maps back to the canonical frame with the fraction of each
  canonical cell the view covered (:meth:`ViewGeometry.to_canonical`, used for the bank's EMA
  update, which only moves covered cells).
* Samplers draw geometries: :class:`RandomCropFlip` (CIFAR: zero-padded random crop +
  horizontal flip, exact pixel copies) and :class:`RandomResizedCropFlip` (CoOp / VPT:
  torchvision's ``RandomResizedCrop`` sampling rule, vectorised, + flip).
* :class:`DeviceViews` = a sampler + the warp + the padding fill: what the trainer calls.

Coordinates: a box is ``(y0, x0, y1, x1)`` in fractions of the canonical image (it may reach
outside [0, 1] for padded crops).  Maps are treated as piecewise constant over their cells
(as BackMix upsamples them, nearest neighbour); resampling a map averages ``supersample²``
nearest-neighbour samples per output cell, i.e. area-weighted resampling, exact for flips and
for cell-aligned shifts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..registry import Registry
from .base import rand

#: samplers by name (``data.views`` in the configs)
VIEW_SAMPLERS: Registry = Registry("view sampler")
#: padding of views that reach outside the image: black; mirrored with the edge pixel repeated
#: (OpenCV's BORDER_REFLECT, grid_sample's "reflection"); mirrored about the edge pixel (OpenCV's
#: BORDER_REFLECT_101, numpy's and ``F.pad``'s "reflect": airbench's translate, whole-pixel shifts only)
PAD_MODES = ("zeros", "reflect", "reflect_101")


@dataclass
class ViewGeometry:
    """Per-sample views of canonical images: ``boxes`` (B, 4) = (y0, x0, y1, x1) in canonical
    fractions, ``flip`` (B,) bool (horizontal flip of the crop)."""

    boxes: Tensor
    flip: Tensor
    shift: Tensor | None = None   # (B, 2) whole-pixel (dy, dx) when every box is a same-size integer shift
    frame_kept: Tensor | None = None  # (B,) bool: False where an auto-augment op moved pixels (no bank update)


    @classmethod
    def identity(cls, n: int, device: torch.device | str | None = None) -> "ViewGeometry":
        boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=device).repeat(n, 1)
        return cls(boxes, torch.zeros(n, dtype=torch.bool, device=device))

    def __len__(self) -> int:
        return self.boxes.shape[0]

    def __getitem__(self, idx: Tensor | slice) -> "ViewGeometry":
        return ViewGeometry(self.boxes[idx], self.flip[idx], None if self.shift is None else self.shift[idx],
                            None if self.frame_kept is None else self.frame_kept[idx])

    def to(self, device: torch.device | str) -> "ViewGeometry":
        shift = None if self.shift is None else self.shift.to(device)
        kept = None if self.frame_kept is None else self.frame_kept.to(device)
        return ViewGeometry(self.boxes.to(device), self.flip.to(device), shift, kept)

    def shift_images(self, images: Tensor, pad_mode: str = "zeros") -> Tensor:
        """The views of whole-pixel shifts (``shift``), by one gather on a padded copy: the same
        pixels as :meth:`warp_images` (zeros or reflect padding), several times faster, and it
        works on uint8; ``reflect_101`` (airbench's padding) exists on this path only."""
        b, c, h, w = images.shape
        p = int(self.shift.abs().max()) if self.shift.numel() else 0
        if p:
            if pad_mode == "zeros":
                padded = F.pad(images, (p, p, p, p))
            else:  # a mirrored index per padded row / column: exact on uint8, no float round trip
                edge = 1 if pad_mode == "reflect" else 0  # reflect repeats the edge pixel, reflect_101 does not
                if pad_mode == "reflect_101" and p >= min(h, w):
                    raise ConfigError(f"views: pad_mode='reflect_101' needs padding < the image size; got {p} px "
                                      f"for {h}x{w} images")
                ar_h = torch.arange(-p, h + p, device=images.device)
                ar_w = torch.arange(-p, w + p, device=images.device)
                rows = torch.where(ar_h < 0, -ar_h - edge, torch.where(ar_h >= h, 2 * h - 2 + edge - ar_h, ar_h))
                cols = torch.where(ar_w < 0, -ar_w - edge, torch.where(ar_w >= w, 2 * w - 2 + edge - ar_w, ar_w))
                padded = images[:, :, rows][:, :, :, cols]
        else:
            padded = images
        hp, wp = h + 2 * p, w + 2 * p
        rows = self.shift[:, :1] + p + torch.arange(h, device=images.device)                # (B, h)
        cols = self.shift[:, 1:] + p + torch.arange(w, device=images.device)                # (B, w)
        cols = torch.where(self.flip[:, None], cols.flip(1), cols)
        index = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
        return padded.reshape(b, c, hp * wp).gather(2, index).view(b, c, h, w)

    # ------------------------------------------------------------------ coordinate maps
    def view_to_canonical(self, u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """View fractions (B, ...) -> canonical fractions; ``u`` vertical, ``v`` horizontal."""
        y0, x0, y1, x1 = (self.boxes[:, i].reshape(-1, *([1] * (u.ndim - 1))) for i in range(4))
        flip = self.flip.reshape(-1, *([1] * (v.ndim - 1)))
        v = torch.where(flip, 1.0 - v, v)
        return y0 + u * (y1 - y0), x0 + v * (x1 - x0)

    def canonical_to_view(self, y: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """Inverse of :meth:`view_to_canonical`."""
        y0, x0, y1, x1 = (self.boxes[:, i].reshape(-1, *([1] * (y.ndim - 1))) for i in range(4))
        flip = self.flip.reshape(-1, *([1] * (x.ndim - 1)))
        u, v = (y - y0) / (y1 - y0), (x - x0) / (x1 - x0)
        return u, torch.where(flip, 1.0 - v, v)

    # ------------------------------------------------------------------ images
    def warp_images(self, images: Tensor, size: tuple[int, int] | None = None,
                    fill: Tensor | Sequence[float] | float = 0.0, mode: str = "bilinear",
                    pad_mode: str = "zeros") -> Tensor:
        """Each image's view at ``size`` (default: the input size); pixels outside the canonical
        image take ``fill`` (per channel).  Integer-pixel crops at the same size are exact copies."""
        if pad_mode == "reflect_101":
            raise ConfigError("views: pad_mode='reflect_101' applies to whole-pixel crops (crop_flip) only; "
                              "use 'reflect' or 'zeros' for resampled views")
        b, c, h, w = images.shape
        oh, ow = size or (h, w)
        dtype = images.dtype if images.is_floating_point() else torch.float32
        u = (torch.arange(oh, device=images.device, dtype=torch.float32) + 0.5) / oh
        v = (torch.arange(ow, device=images.device, dtype=torch.float32) + 0.5) / ow
        y, x = self.view_to_canonical(u.view(1, oh, 1).expand(b, oh, ow), v.view(1, 1, ow).expand(b, oh, ow))
        grid = torch.stack([2 * x - 1, 2 * y - 1], dim=-1)  # grid_sample: (x, y) in [-1, 1], align_corners=False
        fill_t = torch.as_tensor(fill, dtype=dtype, device=images.device).reshape(1, -1, 1, 1)
        src = images.to(dtype) - fill_t  # zero padding of (image - fill) == padding with fill
        padding = "reflection" if pad_mode == "reflect" else "zeros"
        out = F.grid_sample(src, grid.to(dtype), mode=mode, padding_mode=padding, align_corners=False)
        return out + fill_t

    # ------------------------------------------------------------------ maps
    def to_view(self, maps: Tensor, size: tuple[int, int] | None = None, supersample: int = 4,
                outside: float = 0.0) -> Tensor:
        """Canonical maps (B, h, w) -> each sample's view at ``size`` (default (h, w)).

        A view cell averages the canonical cells under it (area-weighted); parts of the view
        outside the canonical image (padding) count as ``outside`` (0: background).
        """
        b, h, w = maps.shape
        oh, ow = size or (h, w)
        u, v = _axis_samples(oh, supersample, maps.device), _axis_samples(ow, supersample, maps.device)
        y, x = self.view_to_canonical(u.expand(b, -1), v.expand(b, -1))
        rows, cols = _axis_weights(y, h, supersample), _axis_weights(x, w, supersample)   # (B, oh, h), (B, ow, w)
        out = rows @ maps.float() @ cols.transpose(1, 2)
        if outside:
            out = out + outside * (1 - rows.sum(-1)[:, :, None] * cols.sum(-1)[:, None, :])
        return out

    def to_canonical(self, maps: Tensor, size: tuple[int, int] | None = None,
                     supersample: int = 4) -> tuple[Tensor, Tensor]:
        """View maps (B, h', w') -> canonical maps at ``size`` and the coverage of each cell.

        Returns ``(maps, coverage)``, both (B, h, w): a canonical cell's value is the mean of
        the view cells over the part of it the view saw, ``coverage`` the fraction it saw
        (0 where the view did not reach: those cells carry no information; 0 everywhere for views
        whose frame an auto-augment op moved).
        """
        b, vh, vw = maps.shape
        h, w = size or (vh, vw)
        y, x = _axis_samples(h, supersample, maps.device), _axis_samples(w, supersample, maps.device)
        u, v = self.canonical_to_view(y.expand(b, -1), x.expand(b, -1))
        rows, cols = _axis_weights(u, vh, supersample), _axis_weights(v, vw, supersample)  # (B, h, vh), (B, w, vw)
        covered = rows.sum(-1)[:, :, None] * cols.sum(-1)[:, None, :]
        if self.frame_kept is not None:
            covered = covered * self.frame_kept.to(covered.dtype)[:, None, None]
        total = rows @ maps.float() @ cols.transpose(1, 2)
        return torch.where(covered > 0, total / covered.clamp_min(1e-12), torch.zeros_like(total)), covered


def _axis_samples(n: int, s: int, device: torch.device) -> Tensor:
    """(1, n*s) sample fractions along one axis: ``s`` evenly spaced points inside each of n cells."""
    return ((torch.arange(n * s, device=device, dtype=torch.float32) + 0.5) / (n * s)).view(1, -1)


def _axis_weights(pos: Tensor, n: int, s: int) -> Tensor:
    """(B, m*s) sample fractions (``s`` per output cell) -> (B, m, n) weights: the share of each
    output cell's samples that falls in each of the ``n`` source cells (0 for samples outside).

    Boxes are axis-aligned and flips act on one axis, so nearest-neighbour sampling of a
    piecewise-constant map is separable: averaging ``s x s`` samples per cell equals
    ``rows @ map @ cols^T`` with these weights (tiny batched matmuls instead of gathers).
    """
    b, ms = pos.shape
    inside = (pos >= 0) & (pos < 1)
    index = (pos * n).floor().long().clamp(0, n - 1)
    onehot = torch.zeros(b, ms, n, device=pos.device).scatter_(2, index[..., None], inside[..., None].float())
    return onehot.view(b, ms // s, s, n).mean(2)


# ----------------------------------------------------------------------------- samplers
def _flips(n: int, p: float, generator: torch.Generator | None, device: torch.device) -> Tensor:
    return rand((n,), generator, device) < p


def alternating_flips(indices: Tensor, epoch: int, seed: int = 0) -> Tensor:
    """airbench's alternating flip: each image gets a fixed random flip bit (a hash of its dataset
    index and ``seed``) in even epochs and the opposite one in odd epochs, so every image is seen both
    ways in any two consecutive epochs (instead of an independent coin per epoch)."""
    x = indices.long() * 0x9E3779B1 + int(seed) * 0x85EBCA77          # a multiplicative hash
    x = (x ^ (x >> 15)) * 0x2C1B3C6D
    x = x ^ (x >> 12)
    return ((x >> 7) & 1).bool() ^ bool(epoch % 2)


#: ``crop_flip``'s flip modes: an independent coin per sample and epoch, or airbench's alternating flip
FLIP_MODES = ("random", "alternate")


@VIEW_SAMPLERS.register("crop_flip")
class RandomCropFlip:
    """CIFAR-style augmentation: pad by ``padding`` px (``pad_mode`` zeros = black, as
    torchvision's RandomCrop; ``reflect``: mirrored at the border, edge pixel repeated; or
    ``reflect_101``: mirrored about the edge pixel, as airbench's translate), random crop back to the image size, horizontal flip with probability ``flip_p``.  Shifts are whole pixels, so the
    warped views are exact pixel copies (as torchvision's ``RandomCrop`` + flip)."""

    def __init__(self, padding: int = 4, flip_p: float = 0.5, pad_mode: str = "zeros",
                 flip: str = "random") -> None:
        if int(padding) < 0:
            raise ConfigError(f"views: padding={padding!r}; expected an integer >= 0")
        if not 0.0 <= float(flip_p) <= 1.0:
            raise ConfigError(f"views: flip_p={flip_p!r}; expected a number in [0, 1]")
        if pad_mode not in PAD_MODES:
            raise ConfigError(f"views: pad_mode={pad_mode!r}; choose {', '.join(PAD_MODES)}")
        if flip not in FLIP_MODES:
            raise ConfigError(f"views: flip={flip!r}; choose {', '.join(FLIP_MODES)}")
        if flip == "alternate" and float(flip_p) != 0.5:
            raise ConfigError(f"views: flip='alternate' flips every image in every other epoch; flip_p={flip_p!r} "
                              "does not apply (leave it at 0.5)")
        self.padding, self.flip_p, self.pad_mode, self.flip = int(padding), float(flip_p), pad_mode, flip

    def __repr__(self) -> str:
        return (f"RandomCropFlip(padding={self.padding}, flip_p={self.flip_p}, pad_mode={self.pad_mode!r}, "
                f"flip={self.flip!r})")

    def __call__(self, n: int, size: tuple[int, int], generator: torch.Generator | None,
                 device: torch.device) -> ViewGeometry:
        h, w = size
        p = self.padding
        # same draw as torchvision: top-left of the crop in the padded image, 0..2p
        dy = (rand((n,), generator, device) * (2 * p + 1)).floor() - p
        dx = (rand((n,), generator, device) * (2 * p + 1)).floor() - p
        boxes = torch.stack([dy / h, dx / w, (dy + h) / h, (dx + w) / w], dim=1)
        return ViewGeometry(boxes, _flips(n, self.flip_p, generator, device), torch.stack([dy, dx], 1).long())


@VIEW_SAMPLERS.register("resized_crop_flip")
class RandomResizedCropFlip:
    """torchvision's ``RandomResizedCrop(scale, ratio)`` sampling, vectorised, + flip.

    Per sample: up to 10 draws of (area fraction ~ U(scale), log aspect ~ U(log ratio)); the
    first that fits inside the image is used, otherwise the central crop of the closest
    allowed aspect ratio (torchvision's fallback).  Boxes are continuous (the warp resamples
    bilinearly), which is what RandomResizedCrop's resize does too.
    """

    def __init__(self, scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                 flip_p: float = 0.5, attempts: int = 10) -> None:
        scale, ratio = tuple(float(s) for s in scale), tuple(float(r) for r in ratio)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ConfigError(f"views: scale={scale!r}; expected (min, max) with 0 < min <= max <= 1")
        if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
            raise ConfigError(f"views: ratio={ratio!r}; expected (min, max) with 0 < min <= max")
        if not 0.0 <= float(flip_p) <= 1.0:
            raise ConfigError(f"views: flip_p={flip_p!r}; expected a number in [0, 1]")
        self.scale, self.ratio, self.flip_p, self.attempts = scale, ratio, float(flip_p), int(attempts)

    def __repr__(self) -> str:
        return f"RandomResizedCropFlip(scale={self.scale}, ratio={self.ratio}, flip_p={self.flip_p})"

    def __call__(self, n: int, size: tuple[int, int], generator: torch.Generator | None,
                 device: torch.device) -> ViewGeometry:
        h, w = size
        k = self.attempts
        area = h * w * (self.scale[0] + rand((n, k), generator, device) * (self.scale[1] - self.scale[0]))
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(lo + rand((n, k), generator, device) * (hi - lo))
        cw = torch.sqrt(area * aspect).round()
        ch = torch.sqrt(area / aspect).round()
        ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
        top = (rand((n, k), generator, device) * (h - ch + 1)).floor()
        left = (rand((n, k), generator, device) * (w - cw + 1)).floor()
        first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1, device=device))
        # fallback: central crop at the closest allowed aspect ratio (torchvision)
        in_ratio = w / h
        if in_ratio < self.ratio[0]:
            fw, fh = w, round(w / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            fh, fw = h, round(h * self.ratio[1])
        else:
            fw, fh = w, h
        pick = first.clamp_min(0)[:, None]
        ch_, cw_ = ch.gather(1, pick)[:, 0], cw.gather(1, pick)[:, 0]
        top_, left_ = top.gather(1, pick)[:, 0], left.gather(1, pick)[:, 0]
        bad = first < 0
        ch_ = torch.where(bad, torch.full_like(ch_, fh), ch_)
        cw_ = torch.where(bad, torch.full_like(cw_, fw), cw_)
        top_ = torch.where(bad, torch.full_like(top_, (h - fh) // 2), top_)
        left_ = torch.where(bad, torch.full_like(left_, (w - fw) // 2), left_)
        boxes = torch.stack([top_ / h, left_ / w, (top_ + ch_) / h, (left_ + cw_) / w], dim=1)
        return ViewGeometry(boxes, _flips(n, self.flip_p, generator, device))


@VIEW_SAMPLERS.register("flip")
class RandomFlip:
    """Horizontal flip only (no crop)."""

    def __init__(self, flip_p: float = 0.5) -> None:
        self.flip_p = float(flip_p)

    def __call__(self, n: int, size: tuple[int, int], generator: torch.Generator | None,
                 device: torch.device) -> ViewGeometry:
        g = ViewGeometry.identity(n, device)
        return ViewGeometry(g.boxes, _flips(n, self.flip_p, generator, device))


class DeviceViews:
    """What the trainer calls: draw each sample's view and warp the canonical batch into it.

    A float batch is taken to be normalised already: pixels outside the canonical image get
    ``fill`` (the normalised black ``-mean / std``, so the views equal torchvision's
    zero-padded crops of the unnormalised image followed by ``Normalize``).  A ``uint8`` batch
    (``data.cache: memory``) is scaled to [0, 1], warped with black padding, then normalised
    with ``mean`` / ``std`` here, on the device.
    """

    def __init__(self, sampler, fill: Sequence[float] | float = 0.0, mode: str = "bilinear",
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 auto_augment: Any = None) -> None:
        self.sampler, self.fill, self.mode = sampler, fill, mode
        self.mean, self.std = mean, std
        self.pad_mode = getattr(sampler, "pad_mode", "zeros")
        self.auto_augment = auto_augment  # a BatchAutoAugment on the uint8 views, or None

    def __repr__(self) -> str:
        extra = f", {self.auto_augment!r}" if self.auto_augment is not None else ""
        return f"DeviceViews({self.sampler!r}{extra})"

    def __call__(self, images: Tensor, generator: torch.Generator | None, indices: Tensor | None = None,
                 epoch: int | None = None, seed: int = 0) -> tuple[Tensor, ViewGeometry]:
        """``indices`` / ``epoch`` / ``seed`` (dataset rows, epoch number, run seed) are used by
        ``flip: alternate`` only."""
        geometry = self.sampler(images.shape[0], tuple(images.shape[-2:]), generator, images.device)
        if getattr(self.sampler, "flip", "random") == "alternate":  # the random draw is kept: crops unchanged
            if indices is None or epoch is None:
                raise ConfigError("views: flip 'alternate' needs each sample's dataset index and the epoch")
            geometry = ViewGeometry(geometry.boxes, alternating_flips(indices.to(images.device), epoch, seed),
                                    geometry.shift)
        fast = geometry.shift is not None  # whole-pixel crops: one gather (also on uint8)
        if images.dtype == torch.uint8:
            if fast:
                views = geometry.shift_images(images, self.pad_mode)
            else:
                views = geometry.warp_images(images.float().div_(255), mode=self.mode, pad_mode=self.pad_mode)
            if self.auto_augment is not None:  # on the uint8 view, after crop + flip (torchvision's order)
                if views.dtype != torch.uint8:
                    views = views.mul(255).round_().clamp_(0, 255).to(torch.uint8)
                views, kept = self.auto_augment(views, generator)
                geometry = ViewGeometry(geometry.boxes, geometry.flip, geometry.shift, kept)
            if views.dtype == torch.uint8:
                views = views.float().div_(255)
            if self.mean is not None:
                mean = torch.as_tensor(self.mean, device=views.device).view(1, -1, 1, 1)
                std = torch.as_tensor(self.std, device=views.device).view(1, -1, 1, 1)
                views = (views - mean) / std
            return views, geometry
        if self.auto_augment is not None:
            raise ConfigError("data.views.options.auto_augment needs uint8 batches: set data.cache: memory")
        if fast:
            fill = torch.as_tensor(self.fill, dtype=images.dtype, device=images.device).reshape(1, -1, 1, 1)
            return geometry.shift_images(images - fill, self.pad_mode) + fill, geometry
        return geometry.warp_images(images, fill=self.fill, mode=self.mode,
                                    pad_mode=self.pad_mode).to(images.dtype), geometry


@VIEW_SAMPLERS.register("identity")
class NoView:
    """No geometry (every view is the whole canonical image): normalisation only."""

    def __call__(self, n: int, size: tuple[int, int], generator: torch.Generator | None,
                 device: torch.device) -> ViewGeometry:
        return ViewGeometry.identity(n, device)


def build_views(name: str, options: dict | None = None, mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None) -> DeviceViews | None:
    """``data.views`` -> :class:`DeviceViews` (``none`` -> None).  Padding is black in pixel
    space: ``-mean / std`` for a normalised batch."""
    if name == "none":
        return None
    options = dict(options or {})
    auto_augment = options.pop("auto_augment", None)
    if auto_augment is not None:
        from .autoaugment import BatchAutoAugment

        if not isinstance(auto_augment, dict):
            raise ConfigError(f"data.views.options.auto_augment: {auto_augment!r}; expected a mapping such as "
                              "{policy: randaugment, num_ops: 1, magnitude: 6} or {policy: trivialaugment}")
        auto_augment = BatchAutoAugment(**auto_augment)
    sampler = VIEW_SAMPLERS.get(name)(**options)
    fill: Sequence[float] | float = 0.0
    if mean is not None and std is not None:
        fill = [-m / s for m, s in zip(mean, std)]
    return DeviceViews(sampler, fill, mean=mean, std=std, auto_augment=auto_augment)


#: ``data.views.name`` values that are not a sampler: pick one by image size, no views, the loader's augmentation
VIEW_MODES = ("auto", "none", "loader")
CACHE_CHOICES = ("none", "memory")


def view_names() -> list[str]:
    """Every accepted ``data.views.name``: :data:`VIEW_MODES`, then the registered view samplers."""
    return [*VIEW_MODES, *VIEW_SAMPLERS.names()]


def check_views(views: Any, where: str = "data.views") -> None:
    """``data.views.name`` against :func:`view_names` (called where a job config is parsed)."""
    from ..validation import check_choice

    check_choice(views.name, view_names(), f"{where}.name")


def train_pipeline(views: Any, image_size: int, mean: Sequence[float] | None, std: Sequence[float] | None,
                   resize: str = "resize", crop_padding: int | None = None,
                   uint8: bool = False) -> tuple[Any, DeviceViews | None]:
    """The training set's per-sample transform and the trainer's :class:`DeviceViews`.

    ``views`` is a :class:`~backmix_vlm.config.ViewsConfig`.  ``auto`` follows the classic
    recipes: a zero-padded random crop (``crop_padding``, default ``image_size // 8``) + flip
    up to 64 px, ``RandomResizedCrop`` + flip above (CoOp).  Every choice but ``loader``
    gives the loader the evaluation transform (the canonical frame); ``loader`` keeps v0.1's
    augmentation in the DataLoader workers and returns no device views.  ``uint8``: the loader
    gives un-normalised pixels (``data.cache: memory``) and the views normalise on the device.
    """
    from ..data import build_transform

    if uint8 and views.name == "loader":
        raise ConfigError("data.cache: memory decodes each image once, so augmentation cannot run in the "
                          "loader: choose another data.views.name (e.g. auto)")
    if views.name == "loader":
        return build_transform(image_size, True, mean, std, resize=resize, crop_padding=crop_padding), None
    name, options = views.name, dict(views.options)
    if name == "auto":
        small = image_size <= 64 or crop_padding is not None
        name = "crop_flip" if small else "resized_crop_flip"
        if small:
            options.setdefault("padding", image_size // 8 if crop_padding is None else int(crop_padding))
    if uint8 and name == "none":
        name = "identity"  # the device still has to normalise
    try:
        device_views = build_views(name, options, mean, std)
    except TypeError as e:
        raise ConfigError(f"data.views.options: {e}") from None
    if uint8:
        return build_transform(image_size, False, None, None, resize=resize), device_views
    return build_transform(image_size, False, mean, std, resize=resize), device_views
