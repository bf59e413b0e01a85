"""The dataset objects every job iterates: ``(image, label, index)`` samples.

``index`` is the position in *this* object (after class filtering / subsetting), so a BackMix
mask bank of ``len(ds)`` rows can be addressed directly with it.
"""
from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.functional import to_tensor

from ..errors import DataError
from .images import center_crop, jpeg_roundtrip, to_rgb
from .records import Records

# Errors PIL and the decoders raise for unreadable / truncated / non-image files.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class ImageDataset(Dataset):
    """Images + integer labels (``-1`` = unlabelled) + CLIP-friendly class names.

    Per sample: decode → RGB (see :func:`~backmix_vlm.data.images.to_rgb`) → optional center
    crop (``crop_size``, the classic "crop" OOD sets) → optional JPEG round trip
    (``jpeg_quality``) → ``transform`` (default: ``ToTensor``, no normalisation).
    """

    def __init__(
        self,
        records: Records,
        labels: Sequence[int],
        classes: Sequence[str],
        name: str,
        transform: Callable[[Image.Image], Any] | None = None,
        jpeg_quality: int | None = None,
        crop_size: int | None = None,
        masks: Any = None,
    ) -> None:
        if len(records) != len(labels):
            raise ValueError(f"{name}: {len(records)} images but {len(labels)} labels")
        self.records = records
        self.labels: list[int] = [int(v) for v in labels]
        self.classes: list[str] = list(classes)
        self.name = name
        self.transform = transform
        self.jpeg_quality = jpeg_quality
        self.crop_size = crop_size
        if masks is not None and len(masks) != len(self.labels):
            raise ValueError(f"{name}: {len(masks)} foreground masks but {len(self.labels)} images")
        self.masks = masks
        self.skipped_files: list[str] = []   # on_corrupt: skip: the unreadable files left out

    @property
    def foreground_masks(self) -> torch.Tensor | None:
        """(N, H, W) bool true foreground masks in the image's canonical frame, or None.

        Only datasets that know their foregrounds have them (``bgshift``); a crop changes the
        frame, so ``crop_size`` datasets report None.
        """
        if self.masks is None or self.crop_size:
            return None
        return torch.as_tensor(self.masks, dtype=torch.bool)
    def __len__(self) -> int:
        return len(self.labels)

    @property
    def targets(self) -> list[int]:  # torchvision-style alias
        return self.labels

    def load_image(self, i: int) -> Image.Image:
        """The RGB PIL image at position ``i`` before ``transform`` (crop and JPEG applied)."""
        try:
            img = to_rgb(self.records.load(i))
        except DECODE_ERRORS as e:
            raise DataError(
                f"cannot read image {self.records.where(i)} ({self.name}): {type(e).__name__}: {e}. "
                "Fix or delete the file, or set on_corrupt: skip to drop unreadable images."
            ) from None
        if self.crop_size:
            img = center_crop(img, self.crop_size)
        if self.jpeg_quality:
            img = jpeg_roundtrip(img, self.jpeg_quality)
        return img

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        i = int(i)
        if i < 0:
            i += len(self)
        img = self.load_image(i)
        x = self.transform(img) if self.transform is not None else to_tensor(img)
        return x, self.labels[i], i

    def subset(self, positions: Sequence[int]) -> "ImageDataset":
        """A new ImageDataset holding ``positions`` (re-indexed 0..n-1; same classes)."""
        positions = [int(p) for p in positions]
        return ImageDataset(self.records.subset(positions), [self.labels[p] for p in positions],
                            self.classes, self.name, self.transform, self.jpeg_quality, self.crop_size,
                            masks=None if self.masks is None else self.masks[positions])

    def find_unreadable(self, workers: int = 4) -> list[int]:
        """Positions whose image cannot be decoded (decodes every image once, in threads)."""
        if not self.records.can_fail:
            return []

        def bad(i: int) -> bool:
            try:
                self.records.load(i)
                return False
            except DECODE_ERRORS:
                return True

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            flags = list(pool.map(bad, range(len(self)), chunksize=64))
        return [i for i, f in enumerate(flags) if f]

    def check_openable(self, workers: int = 4, list_max: int = 5) -> None:
        """DataError naming the files whose image header cannot be read (headers only: cheap, so an
        evaluation set can be checked before training instead of failing after it).  Decoding errors
        further into a file still surface when the image is read."""
        paths = getattr(self.records, "paths", None)
        if paths is None:
            return

        def bad(path: str) -> str | None:
            try:
                with Image.open(path):
                    return None
            except DECODE_ERRORS as e:
                return f"{path} ({type(e).__name__})"

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            found = [b for b in pool.map(bad, paths, chunksize=64) if b is not None]
        if found:
            shown = ", ".join(found[:list_max]) + (f", ... ({len(found)} in all)" if len(found) > list_max else "")
            raise DataError(f"{self.name}: cannot read image{'s' * (len(found) > 1)} {shown}. Fix or delete the "
                            "file, or set on_corrupt: skip to drop unreadable images.")

    def drop_unreadable(self, list_max: int = 20) -> "ImageDataset":
        """``on_corrupt: skip``: remove unreadable images, warning once with the count and the files.

        Decided up front so DataLoader workers never meet a bad file and every worker sees
        the same ``len`` / indices.  The skipped files are kept in ``skipped_files`` of the
        returned dataset; the warning lists the first ``list_max`` of them.
        """
        bad = self.find_unreadable()
        if not bad:
            return self
        files = [self.records.where(i) for i in bad]
        shown = ", ".join(files[:list_max]) + (f", ... and {len(files) - list_max} more" if len(files) > list_max else "")
        warnings.warn(f"{self.name}: skipped {len(bad)} unreadable image(s) of {len(self)} "
                      f"(on_corrupt: skip): {shown}", stacklevel=2)
        keep = sorted(set(range(len(self))) - set(bad))
        out = self.subset(keep)
        out.skipped_files = files
        return out

    def __repr__(self) -> str:
        return f"ImageDataset(name={self.name!r}, n={len(self)}, classes={len(self.classes)})"


class IndexedSubset(Dataset):
    """``dataset`` restricted to ``indices``; samples report their position in the subset."""

    def __init__(self, dataset: Any, indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        n = len(dataset)
        bad = [i for i in self.indices if not -n <= i < n]
        if bad:
            raise DataError(f"IndexedSubset: indices {bad[:5]} out of range for a dataset of {n} samples")
        base = dataset.labels
        self.labels: list[int] = [int(base[i]) for i in self.indices]
        self.classes: list[str] = list(dataset.classes)
        self.name: str = getattr(dataset, "name", "subset")

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def foreground_masks(self) -> torch.Tensor | None:
        masks = getattr(self.dataset, "foreground_masks", None)
        return None if masks is None else masks[torch.as_tensor(self.indices)]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        i = int(i)
        if i < 0:
            i += len(self)
        sample = self.dataset[self.indices[i]]
        return sample[0], int(sample[1]), i

    @property
    def targets(self) -> list[int]:
        return self.labels
