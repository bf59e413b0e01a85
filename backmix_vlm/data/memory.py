"""A training set decoded once into one uint8 tensor (``data.cache: memory``).

Why: at 32 px a CNN step on the CPU takes about as long as decoding and augmenting its batch
with PIL in loader workers, and on a GPU the workers are the bottleneck.  Decoding every
image once (in worker processes), keeping the canonical-frame pixels as ``uint8``
(50,000 CIFAR images = 150 MB) and doing crop / flip / normalisation batched on the device
(:class:`~backmix_vlm.augment.geometry.DeviceViews`) removes per-sample work from every epoch.
Samples stay ``(image, label, index)``; ``image`` is a ``uint8`` (3, H, W) tensor.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset


class InMemoryDataset(Dataset):
    """``images`` (N, 3, H, W) uint8 + labels; ``foreground_masks`` carried over when present."""

    def __init__(self, images: Tensor, labels: list[int], classes: list[str], name: str,
                 foreground_masks: Tensor | None = None) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"{name}: expected uint8 (N, C, H, W) images, got {images.dtype} {tuple(images.shape)}")
        if images.shape[0] != len(labels):
            raise ValueError(f"{name}: {images.shape[0]} images but {len(labels)} labels")
        self.images, self.labels, self.classes, self.name = images, list(labels), list(classes), name
        self.foreground_masks = foreground_masks

    @classmethod
    def decode(cls, dataset: Any, num_workers: int = 2, batch_size: int = 256) -> "InMemoryDataset":
        """Decode ``dataset`` (whose transform yields float [0, 1] tensors, un-normalised) once."""
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        parts = [(x.mul(255).round_().clamp_(0, 255).to(torch.uint8)) for x, _, _ in loader]
        return cls(torch.cat(parts), list(dataset.labels), list(dataset.classes), getattr(dataset, "name", "data"),
                   getattr(dataset, "foreground_masks", None))

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def targets(self) -> list[int]:
        return self.labels

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        i = int(i)
        return self.images[i], self.labels[i], i

    def __repr__(self) -> str:
        return f"InMemoryDataset(name={self.name!r}, n={len(self)}, shape={tuple(self.images.shape[1:])}, uint8)"
