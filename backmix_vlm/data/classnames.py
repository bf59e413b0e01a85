"""Class names for prompts, shipped as ``classnames/<dataset>.txt`` in label order.

Each line is ``name`` or ``key<TAB>name``: *key* is how the class appears on disk (folder
name, wnid, torchvision class string), *name* is the CLIP-friendly text used in prompts.
Sources: CIFAR-10/100 official label names (underscores → spaces); SVHN ``zero``..``nine``
and MNIST ``0``..``9`` as in CLIP's prompt list; Fashion-MNIST torchvision classes in lower
case; Tiny-ImageNet: the 200 wnids in sorted order (torchvision ``ImageFolder`` / ARPL label
order) named with CLIP's curated ImageNet class names (``open_clip`` ``IMAGENET_CLASSNAMES``,
as used by CoOp); ImageNet-1k: timm's 1000 wnids (``timm.data.ImageNetInfo``, the standard label
order) with the same CLIP names.
"""
from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources

from ..errors import DataError

_ALIASES = {"demo": "cifar10", "tiny-imagenet": "tinyimagenet", "tiny_imagenet": "tinyimagenet",
            "fashion_mnist": "fashionmnist", "fashion-mnist": "fashionmnist"}


def clip_friendly(name: str) -> str:
    """Folder / label string → prompt text: ``"aquarium_fish"`` → ``"aquarium fish"``."""
    return re.sub(r"\s+", " ", name.replace("_", " ")).strip()


def normalize_key(name: str) -> str:
    """Loose key for matching folder names to classes (case, ``_``, ``-``, spaces ignored)."""
    return re.sub(r"[\s_\-/]+", " ", name).strip().lower()


def available() -> list[str]:
    files = resources.files(__package__).joinpath("classnames")
    return sorted(p.name[:-4] for p in files.iterdir() if p.name.endswith(".txt"))


@lru_cache(maxsize=None)
def _read(name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    key = _ALIASES.get(name.lower(), name.lower())
    path = resources.files(__package__).joinpath("classnames", f"{key}.txt")
    if not path.is_file():
        raise DataError(f"no shipped class names for '{name}'; available: {', '.join(available())} "
                        "(an imagefolder dataset takes its class names from its folders)")
    keys, names = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        k, _, n = line.partition("\t")
        keys.append(k)
        names.append(n or clip_friendly(k))
    return tuple(keys), tuple(names)


def class_names(name: str) -> list[str]:
    """CLIP-friendly class names of a named dataset, in label order."""
    return list(_read(name)[1])


def class_keys(name: str) -> list[str]:
    """On-disk class keys (folder names / wnids / torchvision strings), in label order."""
    return list(_read(name)[0])
