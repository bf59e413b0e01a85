"""Where images come from: files, in-memory arrays, or Hugging Face ``datasets`` rows.

A *records* object is an indexable list of undecoded images with one method, ``load(i)``,
returning a fully decoded PIL image, and ``where(i)`` naming the item in error messages.
Keeping this separate from :class:`~backmix_vlm.data.dataset.ImageDataset` lets every layout
(torchvision pickles, idx files, .mat, folder trees, Arrow tables) share one dataset class.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image


class Records:
    """Base class: ``len``, ``load(i) -> PIL.Image``, ``where(i) -> str``, ``subset(idx)``."""

    can_fail = False  # True when items are encoded files that may be corrupt

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, i: int) -> Image.Image:
        raise NotImplementedError

    def where(self, i: int) -> str:
        raise NotImplementedError

    def subset(self, idx: Sequence[int]) -> "Records":
        raise NotImplementedError


def _open_file(path: str | Path) -> Image.Image:
    with Image.open(path) as img:
        img.load()  # decode now so truncation / corruption surfaces here, not later
        return img.copy()


class FileRecords(Records):
    """Image files on disk, decoded lazily with PIL."""

    can_fail = True

    def __init__(self, paths: Sequence[str | Path]) -> None:
        self.paths = [str(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> Image.Image:
        return _open_file(self.paths[i])

    def where(self, i: int) -> str:
        return self.paths[i]

    def subset(self, idx: Sequence[int]) -> "FileRecords":
        return FileRecords([self.paths[i] for i in idx])


class ArrayRecords(Records):
    """Decoded uint8 pixels in memory: ``(N, H, W)`` grayscale or ``(N, H, W, 3)`` RGB."""

    def __init__(self, array: np.ndarray, origin: str) -> None:
        if array.dtype != np.uint8 or array.ndim not in (3, 4):
            raise ValueError(f"expected uint8 (N,H,W[,3]) pixels, got {array.dtype} {array.shape}")
        self.array = array
        self.origin = origin  # file the pixels were read from (for messages)

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(self.array[i])

    def where(self, i: int) -> str:
        return f"{self.origin}[{i}]"

    def subset(self, idx: Sequence[int]) -> "ArrayRecords":
        return ArrayRecords(self.array[np.asarray(idx, dtype=np.int64)], self.origin)


class HFRecords(Records):
    """One image column of a Hugging Face ``datasets.Dataset`` (decoded here, not by ``datasets``).

    The column must hold encoded images (``datasets.Image`` feature, an ``{"bytes", "path"}``
    struct, or raw bytes).  Row positions are kept in ``index`` so filtering never asks
    ``datasets`` to write an indices cache next to the user's data.
    """

    can_fail = True

    def __init__(self, ds: Any, column: str, origin: str, index: Sequence[int] | None = None) -> None:
        import datasets

        if isinstance(ds.features.get(column), datasets.Image):
            ds = ds.cast_column(column, datasets.Image(decode=False))
        self.ds = ds.select_columns([column])
        self.column = column
        self.origin = origin
        self.index = list(range(len(ds))) if index is None else [int(i) for i in index]

    def __len__(self) -> int:
        return len(self.index)

    def load(self, i: int) -> Image.Image:
        cell = self.ds[self.index[i]][self.column]
        if isinstance(cell, Image.Image):
            return cell
        if isinstance(cell, dict):
            data, path = cell.get("bytes"), cell.get("path")
            if data is None:
                if not path:
                    raise OSError("row holds neither image bytes nor a path")
                return _open_file(path)
            cell = data
        if isinstance(cell, (bytes, bytearray, memoryview)):
            with Image.open(io.BytesIO(bytes(cell))) as img:
                img.load()
                return img.copy()
        raise OSError(f"column '{self.column}' holds {type(cell).__name__}, not an encoded image")

    def where(self, i: int) -> str:
        return f"{self.origin} row {self.index[i]}"

    def subset(self, idx: Sequence[int]) -> "HFRecords":
        out = object.__new__(HFRecords)
        out.ds, out.column, out.origin = self.ds, self.column, self.origin
        out.index = [self.index[i] for i in idx]
        return out
