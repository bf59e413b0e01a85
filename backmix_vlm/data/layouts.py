"""Readers for the on-disk layouts users really have.

Every probe takes a folder and a split, appends what it looked for to ``looked`` (so a
missing-data error can list every path), and returns a :class:`Found` or ``None``.

* **torchvision** (the official archives as torchvision / the dataset's zip unpack them):
  ``cifar-10-batches-py`` / ``cifar-100-python`` pickles, MNIST idx(.gz) files,
  SVHN ``<split>_32x32.mat``, ``tiny-imagenet-200/``.
* **folder**: ``<dir>/<class>/**/<image>`` trees; classes sort alphabetically.
* **hf**: a ``datasets`` folder written by ``save_to_disk`` (Dataset or DatasetDict) or
  ``*.parquet`` files (Hub layout ``data/<split>-00000-of-00001.parquet``, ``<split>/*.parquet``).
"""
from __future__ import annotations

import gzip
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import DataError
from .records import ArrayRecords, FileRecords, HFRecords, Records

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
#: Column names tried (in order) when a Hugging Face dataset has no ``Image`` / ``ClassLabel`` feature.
IMAGE_COLUMNS = ("image", "img", "images", "picture", "photo", "jpg", "png")
LABEL_COLUMNS = ("label", "labels", "fine_label", "target", "targets", "class", "category", "y")
SPLIT_ALIASES = {"val": ("val", "valid", "validation"), "validation": ("validation", "val", "valid"),
                 "test": ("test",), "train": ("train",)}


def split_names(split: str) -> tuple[str, ...]:
    return SPLIT_ALIASES.get(split, (split,))


@dataclass
class Found:
    """Images located for one split.

    ``labels`` are in the source's own id space; ``class_keys`` (folder names / ClassLabel
    names) name those ids when the source has them, else ``None`` (ids are already canonical).
    """

    records: Records
    labels: list[int]
    class_keys: list[str] | None
    layout: str
    where: str
    masks: Any = None  # (N, H, W) bool true foreground masks, for datasets that have them (bgshift)


# ----------------------------------------------------------------------------- torchvision
def _load_pickle(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def cifar_pickles(d: Path, split: str, looked: list[str], *, folder: str,
                  files: dict[str, Sequence[str]], label_key: str) -> Found | None:
    """``cifar-10-batches-py`` / ``cifar-100-python`` (inside ``d`` or ``d`` itself)."""
    if split not in files:
        return None
    for base in (d / folder, d):
        paths = [base / f for f in files[split]]
        looked.append(f"{base}/{{{','.join(files[split])}}}")
        if all(p.is_file() for p in paths):
            arrays, labels = [], []
            for p in paths:
                try:
                    entry = _load_pickle(p)
                    arrays.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                    labels.extend(int(v) for v in entry[label_key])
                except Exception as e:  # a damaged pickle is a user problem, not a bug
                    raise DataError(f"cannot read CIFAR batch file {p}: {type(e).__name__}: {e}") from None
            pixels = np.ascontiguousarray(np.concatenate(arrays).transpose(0, 2, 3, 1))
            return Found(ArrayRecords(pixels, str(base)), labels, None, "torchvision", str(base))
    return None


def read_idx(path: str | Path) -> np.ndarray:
    """An idx file (MNIST format, optionally gzipped) as a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
            raise ValueError("bad magic number")
        dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
        dtype, ndim = dtypes[raw[2]], raw[3]
        dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
        data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
        return data.reshape(tuple(int(v) for v in dims)).astype(np.dtype(dtype).newbyteorder("="))
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise DataError(f"cannot read idx file {path}: {type(e).__name__}: {e}") from None


def _idx_file(base: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (base / name).is_file():
            return base / name
    return None


def mnist_idx(d: Path, split: str, looked: list[str], *, folder: str) -> Found | None:
    """``<d>/<folder>/raw``, ``<d>/raw`` or ``<d>`` holding ``{train,t10k}-{images,labels}-idx*-ubyte[.gz]``."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        return None
    for base in (d / folder / "raw", d / "raw", d):
        looked.append(f"{base}/{prefix}-images-idx3-ubyte[.gz]")
        img, lab = _idx_file(base, f"{prefix}-images-idx3-ubyte"), _idx_file(base, f"{prefix}-labels-idx1-ubyte")
        if img and lab:
            pixels, labels = read_idx(img).astype(np.uint8), read_idx(lab)
            if pixels.ndim != 3 or len(pixels) != len(labels):
                raise DataError(f"{img} / {lab}: expected N images of HxW and N labels, "
                                f"got {pixels.shape} and {labels.shape}")
            return Found(ArrayRecords(pixels, str(img)), [int(v) for v in labels], None, "torchvision", str(base))
    return None


def svhn_mat(d: Path, split: str, looked: list[str]) -> Found | None:
    """torchvision's SVHN files ``<d>/{train,test,extra}_32x32.mat`` (label 10 means digit 0)."""
    path = d / f"{split}_32x32.mat"
    looked.append(str(path))
    if not path.is_file():
        return None
    try:
        import scipy.io
    except ImportError:
        raise DataError(f"found {path}, but reading SVHN .mat files needs scipy: pip install scipy") from None
    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as e:
        raise DataError(f"cannot read SVHN file {path}: {type(e).__name__}: {e}") from None
    pixels = np.ascontiguousarray(np.transpose(mat["X"], (3, 0, 1, 2))).astype(np.uint8)
    labels = [int(v) % 10 for v in np.asarray(mat["y"]).reshape(-1)]
    return Found(ArrayRecords(pixels, str(path)), labels, None, "torchvision", str(path))


def tinyimagenet_native(d: Path, split: str, looked: list[str]) -> Found | None:
    """``tiny-imagenet-200/``: train/<wnid>/images, val/val_annotations.txt, test/images (label -1)."""
    for base in (d / "tiny-imagenet-200", d):
        looked.append(f"{base}/wnids.txt + {split}/")
        if not (base / "wnids.txt").is_file():
            continue
        if split == "train" and (base / "train").is_dir():
            tree = scan_class_tree(base / "train")
            if tree:
                return Found(FileRecords(tree[0]), tree[1], tree[2], "torchvision", str(base / "train"))
        if split in ("val", "validation"):
            ann = base / "val" / "val_annotations.txt"
            if ann.is_file():
                paths, keys = [], []
                for line in ann.read_text().splitlines():
                    parts = line.split("\t")
                    if len(parts) >= 2:
                        paths.append(str(base / "val" / "images" / parts[0]))
                        keys.append(parts[1])
                order = sorted((base / "wnids.txt").read_text().split())
                unknown = sorted(set(keys) - set(order))
                if unknown:
                    raise DataError(f"{ann}: wnids {unknown[:5]} are not in {base / 'wnids.txt'}")
                return Found(FileRecords(paths), [order.index(k) for k in keys], order, "torchvision", str(ann))
        if split == "test" and (base / "test" / "images").is_dir():
            paths = _images_in(base / "test" / "images")
            if paths:
                return Found(FileRecords(paths), [-1] * len(paths), None, "torchvision", str(base / "test"))
    return None


# ----------------------------------------------------------------------------- folders
def _images_in(d: Path) -> list[str]:
    """Image files under ``d`` (recursive), in sorted path order."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(d):
        dirnames[:] = sorted(x for x in dirnames if not x.startswith("."))
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                   if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
    return out


def scan_class_tree(d: Path) -> tuple[list[str], list[int], list[str]] | None:
    """``d/<class>/**/<image>`` → (paths, labels, class folder names); None if no images."""
    if not d.is_dir():
        return None
    classes = sorted(e.name for e in os.scandir(d) if e.is_dir() and not e.name.startswith("."))
    paths: list[str] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        files = _images_in(d / cls)
        paths.extend(files)
        labels.extend([label] * len(files))
    return (paths, labels, classes) if paths else None


def folder_tree(d: Path, split: str, looked: list[str], *, allow_flat: bool = False) -> Found | None:
    """``<d>/<split>/<class>/<image>`` (or ``<d>/<class>/<image>`` when ``allow_flat``)."""
    for name in split_names(split):
        looked.append(f"{d / name}/<class>/<image>")
        tree = scan_class_tree(d / name)
        if tree:
            return Found(FileRecords(tree[0]), tree[1], tree[2], "folder", str(d / name))
    if allow_flat:
        looked.append(f"{d}/<class>/<image>")
        tree = scan_class_tree(d)
        if tree:
            return Found(FileRecords(tree[0]), tree[1], tree[2], "folder", str(d))
    return None


# ----------------------------------------------------------------------------- Hugging Face
def _hf_columns(ds: Any, where: str, label_columns: Sequence[str]) -> tuple[str, str | None]:
    import datasets

    feats = ds.features
    image = next((c for c, f in feats.items() if isinstance(f, datasets.Image)), None)
    image = image or next((c for c in IMAGE_COLUMNS if c in feats), None)
    if image is None:
        raise DataError(f"{where}: no image column among {list(feats)}; accepted: a datasets.Image "
                        f"feature or a column named one of {', '.join(IMAGE_COLUMNS)}")
    label = next((c for c in label_columns if c in feats), None)
    label = label or next((c for c, f in feats.items() if isinstance(f, datasets.ClassLabel)), None)
    return image, label


def _hf_found(ds: Any, where: str, label_columns: Sequence[str]) -> Found:
    import datasets

    image, label = _hf_columns(ds, where, label_columns)
    keys = None
    if label is None:
        labels = [-1] * len(ds)
    else:
        labels = [-1 if v is None else int(v) for v in ds.data.column(label).to_pylist()]
        feat = ds.features[label]
        if isinstance(feat, datasets.ClassLabel):
            keys = list(feat.names)
    return Found(HFRecords(ds, image, where), labels, keys, "hf", where)


def _parquet_files(d: Path, split: str) -> list[Path]:
    # at most two folders deep (data/, <config>/<split>/): never walk a big image tree
    files = sorted({p for pattern in ("*.parquet", "*/*.parquet", "*/*/*.parquet") for p in d.glob(pattern)})
    names = split_names(split)

    def marked(p: Path, names: Sequence[str]) -> bool:
        stem = p.name.lower()
        return any(stem.startswith((n + "-", n + "_", n + ".")) or p.parent.name.lower() == n for n in names)

    hits = [p for p in files if marked(p, names)]
    if hits:
        return hits
    any_split = ("train", "test", "val", "valid", "validation")
    return files if files and not any(marked(p, any_split) for p in files) else []


def hf_saved(d: Path, split: str, looked: list[str], *, label_columns: Sequence[str] = LABEL_COLUMNS) -> Found | None:
    """A ``save_to_disk`` folder (DatasetDict: pick ``split``) or ``*.parquet`` files."""
    looked.append(f"{d}/(dataset_dict.json | state.json | **/*{split}*.parquet)")
    if not d.is_dir():
        return None
    if (d / "dataset_dict.json").is_file() or (d / "state.json").is_file():
        import datasets

        try:
            obj = datasets.load_from_disk(str(d))
        except Exception as e:
            raise DataError(f"cannot load Hugging Face dataset {d}: {type(e).__name__}: {e}") from None
        if isinstance(obj, datasets.DatasetDict):
            key = next((n for n in split_names(split) if n in obj), None)
            if key is None:
                raise DataError(f"{d}: Hugging Face DatasetDict has splits {list(obj)}, not '{split}'")
            return _hf_found(obj[key], f"{d}[{key}]", label_columns)
        if obj.split is not None and str(obj.split) not in split_names(split):
            return None
        return _hf_found(obj, str(d), label_columns)
    files = _parquet_files(d, split)
    if files:
        import datasets
        import pyarrow.parquet as pq
        from datasets.table import InMemoryTable

        try:
            import pyarrow as pa

            table = pa.concat_tables([pq.read_table(p) for p in files])
        except Exception as e:
            raise DataError(f"cannot read parquet files {[str(p) for p in files]}: {type(e).__name__}: {e}") from None
        ds = datasets.Dataset(InMemoryTable(table))
        where = str(files[0]) if len(files) == 1 else f"{d} ({len(files)} parquet files)"
        return _hf_found(ds, where, label_columns)
    return None
