"""Named datasets: where each one may live, and :func:`build_dataset`.

``DATASETS`` maps a name to a :class:`DatasetSpec`.  ``build_dataset(src)`` searches
``src.root`` and its usual sub-folders (e.g. ``<root>/cifar10``) for the split in each
accepted layout (``layout: auto`` tries torchvision → folder → hf), maps the source's own
class ids onto the dataset's canonical label order, then applies ``classes`` →
``max_samples`` → ``on_corrupt``.
"""
from __future__ import annotations

from collections import Counter

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import urlparse

from ..config import DataSource, default_data_root
from ..errors import DataError
from ..registry import Registry
from ..validation import check_choice
from .classnames import class_keys, class_names, clip_friendly, normalize_key
from .dataset import ImageDataset
from .layouts import (LABEL_COLUMNS, Found, cifar_pickles, folder_tree, hf_saved, mnist_idx, scan_class_tree,
                      svhn_mat, tinyimagenet_native)
from .records import FileRecords
from .transforms import CROP_SIZE, RESIZE_MODES

LAYOUTS = ("auto", "torchvision", "folder", "hf")
LAYOUT_HELP = {
    "torchvision": "the official files as torchvision unpacks them",
    "folder": "<root>/<split>/<class>/<image> (classes sort alphabetically; also under <root>/<name>/)",
    "hf": "a Hugging Face datasets folder from save_to_disk (Dataset or DatasetDict) or *.parquet files "
          "(split in the file name or folder), image column = a datasets.Image feature or one named "
          "image/img/..., label column = label/labels/fine_label/... or a ClassLabel feature",
}

Probe = Callable[[Path, str, list], "Found | None"]


@dataclass(frozen=True)
class DatasetSpec:
    """How to find one named dataset."""

    name: str
    splits: tuple[str, ...] | None           # None: any split name
    subdirs: tuple[str, ...] = ()            # searched inside root, besides root itself
    native: Probe | None = None              # the "torchvision" layout
    native_help: str = ""
    download_url: str | None = None
    download: Callable[[Path, str], None] | None = None
    label_columns: tuple[str, ...] = LABEL_COLUMNS
    canonical: str | None = None             # class-name file; None: names from the data
    allow_flat: bool = False                 # folder layout may be <root>/<class>/ (imagefolder)
    fixed: Callable[[DataSource], Found] | None = None  # datasets that ignore root (demo)
    notes: tuple[str, ...] = field(default=())


DATASETS: Registry[DatasetSpec] = Registry("dataset")


# ----------------------------------------------------------------------------- downloads
def _check_online(url: str, timeout: float = 3.0) -> None:
    """Fail within seconds, with a clear message, when ``url``'s host cannot be reached."""
    from ..runtime import host_reachable

    host = urlparse(url).hostname or url
    port = 443 if url.startswith("https") else 80
    ok, why = host_reachable(host, port, timeout=timeout)
    if not ok:
        raise DataError(f"download: true, but {host} cannot be reached ({why}); this machine looks "
                        "offline. Put the data under root yourself (see the accepted layouts) or "
                        "set download: false.")


def _tv_download(cls_name: str, root: Path, split: str) -> None:
    import torchvision.datasets as tvd

    cls = getattr(tvd, cls_name)
    if cls_name == "SVHN":
        try:
            import scipy.io  # noqa: F401 - torchvision reads the .mat right after downloading
        except ImportError:
            raise DataError("SVHN is distributed as .mat files; reading them needs scipy: pip install scipy") from None
        cls(str(root), split=split, download=True)
    else:
        cls(str(root), train=(split == "train"), download=True)


def _tiny_download(root: Path, split: str) -> None:
    from torchvision.datasets.utils import download_and_extract_archive

    download_and_extract_archive("http://cs231n.stanford.edu/tiny-imagenet-200.zip", str(root),
                                 md5="90528d7ca1a48142e341f4ef8d21d0de")


# ----------------------------------------------------------------------------- specs
_CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_CIFAR100_FILES = {"train": ["train"], "test": ["test"]}

DATASETS.add("cifar10", DatasetSpec(
    "cifar10", ("train", "test"), ("cifar10", "cifar-10", "CIFAR10", "CIFAR-10"),
    functools.partial(cifar_pickles, folder="cifar-10-batches-py", files=_CIFAR10_FILES, label_key="labels"),
    "cifar-10-batches-py/{data_batch_1..5,test_batch}",
    "https://www.cs.toronto.edu/~kriz/", functools.partial(_tv_download, "CIFAR10"), canonical="cifar10"))
DATASETS.add("cifar100", DatasetSpec(
    "cifar100", ("train", "test"), ("cifar100", "cifar-100", "CIFAR100", "CIFAR-100"),
    functools.partial(cifar_pickles, folder="cifar-100-python", files=_CIFAR100_FILES, label_key="fine_labels"),
    "cifar-100-python/{train,test} (fine labels)",
    "https://www.cs.toronto.edu/~kriz/", functools.partial(_tv_download, "CIFAR100"),
    label_columns=("fine_label",) + LABEL_COLUMNS, canonical="cifar100"))
DATASETS.add("svhn", DatasetSpec(
    "svhn", ("train", "test", "extra"), ("svhn", "SVHN"), svhn_mat, "{train,test,extra}_32x32.mat (needs scipy)",
    "http://ufldl.stanford.edu/housenumbers/", functools.partial(_tv_download, "SVHN"), canonical="svhn"))
DATASETS.add("mnist", DatasetSpec(
    "mnist", ("train", "test"), ("mnist", "MNIST"), functools.partial(mnist_idx, folder="MNIST"),
    "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] (or those files in root)",
    "https://ossci-datasets.s3.amazonaws.com/mnist/", functools.partial(_tv_download, "MNIST"), canonical="mnist"))
DATASETS.add("fashionmnist", DatasetSpec(
    "fashionmnist", ("train", "test"), ("fashionmnist", "fashion_mnist", "fashion-mnist", "FashionMNIST"),
    functools.partial(mnist_idx, folder="FashionMNIST"),
    "FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] (or those files in root)",
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", functools.partial(_tv_download, "FashionMNIST"),
    canonical="fashionmnist"))
DATASETS.add("tinyimagenet", DatasetSpec(
    "tinyimagenet", ("train", "val", "test"), ("tinyimagenet", "tiny-imagenet", "tiny_imagenet"),
    tinyimagenet_native, "tiny-imagenet-200/{wnids.txt, train/<wnid>/images, val/val_annotations.txt + "
    "val/images, test/images (unlabelled: label -1)}",
    "http://cs231n.stanford.edu/", _tiny_download, canonical="tinyimagenet"))
DATASETS.add("imagefolder", DatasetSpec("imagefolder", None, allow_flat=True))

# ImageNet-1k and the four OOD sets of the large-scale protocol (MOS, MCM, LoCoOp, NegLabel).
# None of them can be downloaded automatically; the missing-data message says where they come from.
_LARGE_SCALE_OOD = ("the curated subsets of MOS (Huang & Li, CVPR 2021; github.com/deeplearning-wisc/large_scale_ood): "
                    "10,000 images each for iNaturalist, SUN and Places with no ImageNet-1k concept; Textures = "
                    "all 5,640 DTD images (www.robots.ox.ac.uk/~vgg/data/dtd/)")
DATASETS.add("imagenet", DatasetSpec(
    "imagenet", ("train", "val"), ("imagenet", "ImageNet", "imagenet-1k", "imagenet1k", "ILSVRC2012", "ilsvrc2012"),
    canonical="imagenet",
    notes=("ImageNet-1k (ILSVRC-2012) cannot be downloaded automatically: get it from image-net.org (or the "
           "Hugging Face dataset imagenet-1k) and lay it out as <root>/imagenet/{train,val}/<wnid>/*.JPEG "
           "(val sorted into class folders, e.g. with the usual valprep.sh); class names = CLIP's "
           "ImageNet names (backmix_vlm/data/classnames/imagenet.txt)",)))


def _ood_images(dirs: Sequence[str], d: Path, split: str, looked: list[str]) -> Found | None:
    """An unlabelled OOD image set: every image under ``d`` when ``d`` is one of ``dirs`` (label -1)."""
    from .layouts import _images_in

    looked.append(f"{d}/**/<image> (when the folder is named {' or '.join(dirs)})")
    if d.name.lower() not in {x.split("/")[-1].lower() for x in dirs} or not d.is_dir():
        return None
    paths = _images_in(d)
    return Found(FileRecords(paths), [-1] * len(paths), None, "torchvision", str(d)) if paths else None


for _name, _dirs in (("inaturalist", ("iNaturalist", "inaturalist")), ("sun", ("SUN", "sun")),
                     ("places", ("Places", "places", "Places365")),
                     ("textures", ("dtd/images", "Textures/dtd/images", "dtd", "Textures", "textures"))):
    DATASETS.add(_name, DatasetSpec(
        _name, None, _dirs, functools.partial(_ood_images, _dirs),
        f"{_dirs[0]}/**/<image> (e.g. iNaturalist/images/*.jpg), unlabelled",
        notes=(f"'{_name}' is an OOD set of the ImageNet-1k protocol: {_LARGE_SCALE_OOD}.",)))


def _bgshift(d: Path, split: str, looked: list) -> Found | None:
    """A generated background-shift dataset (:mod:`backmix_vlm.data.bgshift`): ``<d>/<split>.npz``."""
    from .bgshift import read_split
    from .records import ArrayRecords

    looked.append(f"{d}/{{meta.json,{split}.npz}}")
    if not ((d / "meta.json").is_file() and (d / f"{split}.npz").is_file()):
        return None
    images, labels, masks, names = read_split(d, split)
    return Found(ArrayRecords(images, str(d / f"{split}.npz")), [int(v) for v in labels], list(names), "bgshift",
                 str(d), masks=masks)


DATASETS.add("bgshift", DatasetSpec(
    "bgshift", None, (), _bgshift,
    "<root>/{meta.json, train|test_matched|test_swapped|unknown_known_bg|unknown_unseen_bg.npz} written by "
    "python -m backmix_vlm.data.bgshift"))


def _demo(src: DataSource) -> Found:
    from importlib import resources

    base = Path(str(resources.files("backmix_vlm").joinpath("assets", "demo")))
    sub, canonical = DEMO_SPLITS[src.split]
    tree = scan_class_tree(base / sub)
    if tree is None:
        raise DataError(f"demo assets missing: {base / sub} (regenerate with scripts/make_demo_assets.py)")
    keys = _to_canonical(tree[2], canonical, f"demo {src.split}")
    return Found(FileRecords(tree[0]), tree[1], keys, "folder", str(base / sub))


#: demo split → (folder inside backmix_vlm/assets/demo, class-name file)
DEMO_SPLITS = {"train": ("train", "cifar10"), "test": ("test", "cifar10"), "ood-cifar100": ("ood/cifar100", "cifar100")}
DATASETS.add("demo", DatasetSpec("demo", tuple(DEMO_SPLITS), fixed=_demo))


# ----------------------------------------------------------------------------- locating
def _to_canonical(keys: Sequence[str], canonical: str, where: str) -> list[str]:
    """Return, for each source class key, the canonical key it matches (error if any is unknown)."""
    ckeys, cnames = class_keys(canonical), class_names(canonical)
    lookup: dict[str, str] = {}
    for i, (k, n) in enumerate(zip(ckeys, cnames)):
        for alias in (k, n, str(i)):
            lookup.setdefault(normalize_key(alias), k)
    unknown = [k for k in keys if normalize_key(k) not in lookup]
    if unknown:
        raise DataError(f"{where}: class(es) {unknown[:8]} are not {canonical} classes; expected names like "
                        f"{', '.join(ckeys[:5])}, ... (or label ids 0..{len(ckeys) - 1}). "
                        "Use name: imagefolder for arbitrary class folders.")
    return [lookup[normalize_key(k)] for k in keys]


def _candidates(spec: DatasetSpec, root: Path) -> list[Path]:
    return [root] + [root / s for s in spec.subdirs]


def _locate(spec: DatasetSpec, src: DataSource, looked: dict[str, list[str]]) -> Found | None:
    root = Path(src.root).expanduser()
    order = ("torchvision", "folder", "hf") if src.layout == "auto" else (src.layout,)
    for layout in order:
        if layout == "torchvision" and spec.native is None:
            continue
        seen = looked.setdefault(layout, [])
        for d in _candidates(spec, root):
            if layout == "torchvision":
                found = spec.native(d, src.split, seen)  # type: ignore[misc]
            elif layout == "folder":
                found = folder_tree(d, src.split, seen, allow_flat=spec.allow_flat)
            else:
                found = hf_saved(d, src.split, seen, label_columns=spec.label_columns)
            if found is not None:
                return found
    return None


def _missing(spec: DatasetSpec, src: DataSource, looked: dict[str, list[str]]) -> DataError:
    lines = [f"dataset '{spec.name}' split '{src.split}' not found under root '{src.root}' "
             f"(layout: {src.layout}). Looked for:"]
    for layout, paths in looked.items():
        lines.append(f"  {layout}: " + "; ".join(dict.fromkeys(paths)))
    lines.append("Accepted layouts:")
    if spec.native is not None:
        lines.append(f"  torchvision: {spec.native_help}")
    lines.append(f"  folder: {LAYOUT_HELP['folder']}")
    lines.append(f"  hf: {LAYOUT_HELP['hf']}")
    if spec.download is not None and not src.download:
        lines.append("Or set download: true to fetch it (needs internet).")
    lines.extend(spec.notes)
    return DataError("\n".join(lines))


def _check_source(spec: DatasetSpec, src: DataSource) -> None:
    check_choice(src.layout, LAYOUTS, f"data source '{src.name}' layout")
    check_choice(src.resize, RESIZE_MODES, f"data source '{src.name}' resize")
    check_choice(src.on_corrupt, ("error", "skip"), f"data source '{src.name}' on_corrupt")
    if spec.splits is not None:
        check_choice(src.split, spec.splits, f"data source '{src.name}' split")
    if src.layout == "torchvision" and spec.native is None:
        check_choice(src.layout, ("auto", "folder", "hf"), f"data source '{src.name}' layout")
    if src.jpeg_quality is not None and not 1 <= src.jpeg_quality <= 100:
        check_choice(src.jpeg_quality, ("null", "an integer 1..100"), f"data source '{src.name}' jpeg_quality")
    if src.max_samples is not None and src.max_samples < 1:
        check_choice(src.max_samples, ("null", "a positive integer"), f"data source '{src.name}' max_samples")


_PRELOCATED: dict[tuple[str, str, str, str], Found] = {}


def preflight(src: DataSource) -> None:
    """Fail now, before any model is loaded, when a dataset that cannot be downloaded is absent.

    Only for the sets no job can fetch (those with ``notes``: the ImageNet-1k protocol); what
    it finds is kept for the next :func:`build_dataset` of the same source, so nothing is
    scanned twice.
    """
    spec = DATASETS.get(src.name)
    if not spec.notes or spec.fixed is not None:
        return
    _check_source(spec, src)
    looked: dict[str, list[str]] = {}
    found = _locate(spec, src, looked)
    if found is None:
        raise _missing(spec, src, looked)
    _PRELOCATED[(spec.name, str(Path(src.root).expanduser()), src.split, src.layout)] = found


def build_dataset(src: DataSource, transform: Callable | None = None) -> ImageDataset:
    """The split described by ``src`` as an :class:`ImageDataset` (see the module docstring).

    ``transform`` maps an RGB PIL image to a tensor (default ``ToTensor``); build it with
    ``build_transform(..., resize=src.resize)``.  ``resize: crop`` additionally takes the
    32 px center crop here, so the crop happens whatever transform the caller passes.
    ``root: null`` reads from :func:`~backmix_vlm.config.default_data_root` (``$BACKMIX_DATA``).
    """
    return _build(src, transform, drop_corrupt=True)


def check_dataset(src: DataSource, where: str | None = None, *, known: bool = False) -> ImageDataset:
    """Find ``src`` and apply its class / sample filters without decoding any image: the cheap
    up-front check every job runs before it creates a run folder.  Returns the (untransformed) dataset.

    ``where`` (e.g. ``data.train``) prefixes the error so the config key is named.  ``known``: the
    set holds known classes (a training or known test set), so every one of its classes must have
    images; a class folder that is missing or empty is an error naming the folder and the classes.
    """
    from ..errors import BackmixError

    try:
        ds = _build(src, None, drop_corrupt=False)
        if known:
            check_every_class(ds)
        return ds
    except BackmixError as e:
        if where is None:
            raise
        raise type(e)(f"{where}: {e}") from None


def check_every_class(ds: ImageDataset) -> None:
    """DataError naming the data's location and every class of ``ds`` that has no image."""
    counts = Counter(ds.labels)
    missing = [f"{name} (label {i})" for i, name in enumerate(ds.classes) if counts[i] == 0]
    if missing:
        raise DataError(f"{getattr(ds, 'location', ds.name)} has no images of known class"
                        f"{'es' * (len(missing) > 1)} {', '.join(missing)}; every known class needs images "
                        "(restore the class folder / files, or leave the class out with another protocol or "
                        "a 'classes' list)")


def _build(src: DataSource, transform: Callable | None, drop_corrupt: bool) -> ImageDataset:
    if src.root is None:
        src = dataclasses.replace(src, root=default_data_root())
    spec = DATASETS.get(src.name)
    _check_source(spec, src)
    if spec.fixed is not None:
        found = spec.fixed(src)
        canonical = None  # keys already mapped
        names_from = DEMO_SPLITS[src.split][1]
    else:
        looked: dict[str, list[str]] = {}
        key = (spec.name, str(Path(src.root).expanduser()), src.split, src.layout)
        found = _PRELOCATED.pop(key, None) or _locate(spec, src, looked)
        if found is None and src.download and spec.download is not None:
            _check_online(spec.download_url or "")
            spec.download(Path(src.root).expanduser(), src.split)
            found = _locate(spec, src, looked := {})
        if found is None:
            raise _missing(spec, src, looked)
        canonical = names_from = spec.canonical

    labels, classes = _label_space(found, canonical, names_from, spec.name)
    ds_name = src.display_name
    records = found.records
    masks = found.masks
    where = f"{spec.name} split '{src.split}' ({found.where})"

    if src.classes is not None:
        keep = [int(c) for c in src.classes]
        bad = [c for c in keep if not 0 <= c < len(classes)]
        if bad or len(set(keep)) != len(keep):
            raise DataError(f"{where}: classes {src.classes} must be distinct label ids in 0..{len(classes) - 1}")
        remap = {c: i for i, c in enumerate(keep)}
        pos = [i for i, y in enumerate(labels) if y in remap]
        records = records.subset(pos)
        masks = None if masks is None else masks[pos]
        labels = [remap[labels[i]] for i in pos]
        classes = [classes[c] for c in keep]
    if src.max_samples is not None and len(labels) > src.max_samples:
        # evenly spaced, deterministic: on class-sorted data every class keeps its share
        n = len(labels)
        pos = [(i * n) // src.max_samples for i in range(src.max_samples)]
        records, labels = records.subset(pos), [labels[i] for i in pos]
        masks = None if masks is None else masks[pos]
    if not labels:
        raise DataError(f"{where}: 0 images after filtering (classes: {src.classes}, "
                        f"max_samples: {src.max_samples}); check the class ids and the data folder")

    ds = ImageDataset(records, labels, classes, ds_name, transform, src.jpeg_quality,
                      CROP_SIZE if src.resize == "crop" else None, masks=masks)
    ds.location = where  # for messages about the whole set (e.g. a known class without images)
    if src.on_corrupt == "skip" and drop_corrupt:
        ds = ds.drop_unreadable()
        if len(ds) == 0:
            raise DataError(f"{where}: every image is unreadable (on_corrupt: skip)")
    return ds


def _label_space(found: Found, canonical: str | None, names_from: str | None,
                 name: str) -> tuple[list[int], list[str]]:
    """Map the source's ids onto the canonical label order; return (labels, class names)."""
    if names_from is None:  # imagefolder: the data names its classes
        keys = found.class_keys
        if keys is None:
            top = max(found.labels, default=-1)
            keys = [str(i) for i in range(top + 1)]
        return list(found.labels), [clip_friendly(k) for k in keys]
    names = class_names(names_from)
    if canonical is None or found.class_keys is None:
        labels = list(found.labels)
        if found.class_keys is not None:  # keys already canonical (demo): map by key
            ckeys = class_keys(names_from)
            ids = [ckeys.index(k) for k in found.class_keys]
            labels = [ids[y] if y >= 0 else -1 for y in labels]
    else:
        ckeys = class_keys(canonical)
        mapped = _to_canonical(found.class_keys, canonical, f"{name} ({found.where})")
        ids = [ckeys.index(k) for k in mapped]
        labels = [ids[y] if y >= 0 else -1 for y in found.labels]
    bad = sorted({y for y in labels if y >= len(names) or y < -1})
    if bad:
        raise DataError(f"{name} ({found.where}): labels {bad[:5]} outside 0..{len(names) - 1}")
    return labels, names
