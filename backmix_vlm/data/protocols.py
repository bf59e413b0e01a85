"""Open-set protocols (known/unknown class splits) and ID-vs-OOD benchmark tables.

Protocols are data: ``protocols/<name>.json`` with ``known_dataset``, ``unknown_dataset`` and
five ``splits`` of ``{"known": [...], "unknown": [...]}`` label ids (the standard splits of
Neal et al. 2018, copied from ARPL's ``split.py``; each file says so in ``source``).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any, Sequence

from ..config import DataSource
from ..errors import ConfigError, DataError


@dataclass(frozen=True)
class OpenSetProtocol:
    """One split of an open-set protocol.  ``known`` order defines the training label order."""

    name: str
    known: list[int]
    unknown: list[int]
    known_dataset: str
    unknown_dataset: str
    split: int = 0

    def known_source(self, root: str | None = None, split: str = "train", **kw: Any) -> DataSource:
        """The known classes of ``known_dataset`` (relabelled 0..K-1 in ``known`` order)."""
        return DataSource(name=self.known_dataset, root=root, split=split, classes=list(self.known),
                          label=kw.pop("label", f"{self.name}-known"), **kw)

    def unknown_source(self, root: str | None = None, split: str = "test", **kw: Any) -> DataSource:
        """The unknown classes of ``unknown_dataset`` (their labels are irrelevant to OSR metrics)."""
        return DataSource(name=self.unknown_dataset, root=root, split=split, classes=list(self.unknown),
                          label=kw.pop("label", f"{self.name}-unknown"), **kw)


_FILES = {"cifar10": "cifar10", "svhn": "svhn", "mnist": "mnist", "cifar+10": "cifar_plus_10",
          "cifar+50": "cifar_plus_50", "tinyimagenet": "tinyimagenet"}
_ALIASES = {"cifar_plus_10": "cifar+10", "cifar_plus_50": "cifar+50", "cifar10+10": "cifar+10",
            "cifar10+50": "cifar+50", "tiny-imagenet": "tinyimagenet", "tiny_imagenet": "tinyimagenet"}


def list_protocols() -> list[str]:
    """Names accepted by :func:`get_protocol`."""
    return sorted(_FILES)


@lru_cache(maxsize=None)
def _load(name: str) -> dict[str, Any]:
    path = resources.files(__package__).joinpath("protocols", f"{_FILES[name]}.json")
    return json.loads(path.read_text(encoding="utf-8"))


def protocol_info(name: str) -> dict[str, Any]:
    """The raw protocol record (description, source, all splits)."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in _FILES:
        raise DataError(f"unknown open-set protocol '{name}'; available: {', '.join(list_protocols())}")
    return _load(key)


def get_protocol(name: str, split: int = 0) -> OpenSetProtocol:
    """Split ``split`` (0-4) of protocol ``name`` (see :func:`list_protocols`)."""
    info = protocol_info(name)
    splits = info["splits"]
    if not isinstance(split, int) or not 0 <= split < len(splits):
        raise DataError(f"protocol '{info['name']}' has splits 0..{len(splits) - 1}, not {split!r}")
    s = splits[split]
    return OpenSetProtocol(info["name"], list(s["known"]), list(s["unknown"]),
                           info["known_dataset"], info["unknown_dataset"], split)


# ----------------------------------------------------------------------------- a job's sources
@dataclass(frozen=True)
class OpenSetSources:
    """What a job trains on and evaluates: the training set, the known test set, the unknown sets."""

    train: DataSource
    test: DataSource
    unknowns: list[DataSource]


def open_set_sources(train: DataSource, test: DataSource, *, protocol: str | None = None, protocol_split: int = 0,
                     ood: Sequence[DataSource] = (), protocol_key: str | None = "data.protocol") -> OpenSetSources:
    """Resolve an open-set protocol and OOD sets into concrete sources.

    With ``protocol`` (e.g. ``cifar10`` split 0), ``train`` and ``test`` keep only its known
    classes (relabelled in the protocol's order) and its unknown classes of the test split (or of
    ``unknown_dataset``, e.g. CIFAR-100 for CIFAR+10) become the first unknown set; ``ood`` (whole
    datasets) follow.  Unknown sets need distinct display names, and there must be at least one.
    ``protocol_key`` names the protocol's config key in messages (None: the job has no protocol).
    """
    unknowns: list[DataSource] = []
    if protocol:
        p = get_protocol(protocol, protocol_split)
        for key, src in (("train", train), ("test", test)):
            if src.classes is not None:
                raise ConfigError(f"data.{key}.classes is set, but {protocol_key} '{protocol}' chooses the "
                                  "known classes; remove one of them")
        original_test = test
        train = dataclasses.replace(train, classes=list(p.known))
        test = dataclasses.replace(test, classes=list(p.known),
                                   label=test.label or f"{test.name} known ({p.name} split {p.split})")
        unknown_label = f"{p.name} unknown (split {p.split})"
        if p.unknown_dataset == p.known_dataset:
            unknowns.append(dataclasses.replace(original_test, classes=list(p.unknown), label=unknown_label))
        else:  # e.g. CIFAR+10: unknown classes come from CIFAR-100
            unknowns.append(DataSource(name=p.unknown_dataset, root=original_test.root, split="test",
                                       classes=list(p.unknown), label=unknown_label,
                                       jpeg_quality=original_test.jpeg_quality))
    unknowns += list(ood)
    names = [u.display_name for u in unknowns]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"eval.ood: unknown sets need distinct labels; repeated: {', '.join(dupes)} "
                          "(set label: for each)")
    if not unknowns:
        how = f"set {protocol_key} and/or list datasets in eval.ood" if protocol_key else "list datasets in eval.ood"
        raise ConfigError(f"no unknown set to evaluate: {how}")
    return OpenSetSources(train, test, unknowns)


# ----------------------------------------------------------------------------- OOD benchmarks
#: ID dataset → its usual OOD test sets (root None: the data root; use :func:`ood_sources` to set root / JPEG).
OOD_BENCHMARKS: dict[str, list[DataSource]] = {
    "cifar10": [
        DataSource(name="cifar100", split="test", label="CIFAR-100"),
        DataSource(name="svhn", split="test", label="SVHN"),
        DataSource(name="tinyimagenet", split="test", label="TIN (resize)", resize="resize"),
        DataSource(name="tinyimagenet", split="test", label="TIN (crop)", resize="crop"),
        DataSource(name="mnist", split="test", label="MNIST"),
        DataSource(name="fashionmnist", split="test", label="Fashion-MNIST"),
    ],
    "cifar100": [
        DataSource(name="cifar10", split="test", label="CIFAR-10"),
        DataSource(name="svhn", split="test", label="SVHN"),
        DataSource(name="tinyimagenet", split="test", label="TIN (resize)", resize="resize"),
        DataSource(name="tinyimagenet", split="test", label="TIN (crop)", resize="crop"),
        DataSource(name="mnist", split="test", label="MNIST"),
        DataSource(name="fashionmnist", split="test", label="Fashion-MNIST"),
    ],
    "demo": [DataSource(name="demo", split="ood-cifar100", label="CIFAR-100 (demo)")],
}


def ood_sources(id_name: str, root: str | None = None, jpeg_quality: int | None = None,
                skip_missing: bool = False) -> list[DataSource]:
    """Copies of ``OOD_BENCHMARKS[id_name]`` with ``root`` / ``jpeg_quality`` set.

    ``skip_missing`` drops the sets that cannot be found under ``root`` (checked by building
    each one), e.g. SVHN on machines that lack it.
    """
    if id_name not in OOD_BENCHMARKS:
        raise DataError(f"no OOD benchmark list for '{id_name}'; available: {', '.join(sorted(OOD_BENCHMARKS))}")
    out = []
    for src in OOD_BENCHMARKS[id_name]:
        changes: dict[str, Any] = {"jpeg_quality": jpeg_quality}
        if root is not None:
            changes["root"] = root
        out.append(dataclasses.replace(src, **changes))
    if skip_missing:
        from .datasets import build_dataset

        kept = []
        for src in out:
            try:
                build_dataset(dataclasses.replace(src, max_samples=1))
                kept.append(src)
            except DataError:
                continue
        out = kept
    return out
