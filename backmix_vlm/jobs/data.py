"""The datasets of an open-set job: training set (+ device views), known test set, unknown sets."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..config import DataSource
from ..errors import ConfigError
from ..validation import check_choice

if TYPE_CHECKING:  # the configs that use check_distinct_sets are checked without torch
    from ..data.protocols import OpenSetSources


@dataclass
class OpenSetData:
    """Built datasets of one job (``train`` under the training transform, the rest under the eval one)."""

    train: Any                                   # ImageDataset (or InMemoryDataset) in the canonical frame
    views: Any                                   # augment.geometry.DeviceViews, or None (loader augmentation)
    train_src: DataSource
    known: Any                                   # known-class test set
    unknowns: dict[str, Any]                     # display name -> unknown set
    eval_transform: Callable[[DataSource], Any]
    extra_known: dict[str, Any] = field(default_factory=dict)  # known classes under a shift (accuracy only)

    def train_eval(self) -> Any:
        """The training set under the eval transform (fit statistics, e.g. Mahalanobis), built on demand."""
        from ..data import build_dataset

        return build_dataset(self.train_src, self.eval_transform(self.train_src))


def build_open_set_data(sources: OpenSetSources, *, image_size: int, mean: Sequence[float] | None,
                        std: Sequence[float] | None, views: Any, crop_padding: int | None = None,
                        cache: str = "none", num_workers: int = 0,
                        extra_known: Sequence[DataSource] = ()) -> OpenSetData:
    """Build ``sources`` (:func:`backmix_vlm.data.open_set_sources`) at ``image_size`` with
    ``mean`` / ``std``; ``views`` is the ``data.views`` section (random geometry on the device),
    ``cache: memory`` decodes the training set once into uint8."""
    from ..augment.geometry import CACHE_CHOICES, train_pipeline
    from ..data import build_dataset, build_transform

    def eval_tf(src: DataSource) -> Any:
        return build_transform(image_size, False, mean, std, resize=src.resize)

    check_choice(cache, CACHE_CHOICES, "data.cache")
    train_tf, device_views = train_pipeline(views, image_size, mean, std, resize=sources.train.resize,
                                            crop_padding=crop_padding, uint8=cache == "memory")
    train = build_dataset(sources.train, train_tf)
    if cache == "memory":
        from ..data.memory import InMemoryDataset

        train = InMemoryDataset.decode(train, num_workers=num_workers)
    def same_classes(ds: Any, what: str) -> Any:
        if len(ds.classes) != len(train.classes):
            raise ConfigError(f"{what} has {len(ds.classes)} classes but data.train has {len(train.classes)}; "
                              "known sets must use the training classes")
        return ds

    known = same_classes(build_dataset(sources.test, eval_tf(sources.test)), "data.test")
    shifted = {src.display_name: same_classes(build_dataset(src, eval_tf(src)), f"eval.extra_known {src.display_name!r}")
               for src in extra_known}
    unknowns = {src.display_name: build_dataset(src, eval_tf(src)) for src in sources.unknowns}
    for ds in (known, *shifted.values(), *unknowns.values()):  # evaluation sets: a bad file fails now, not after training
        ds.check_openable()
    return OpenSetData(
        train=train, views=device_views, train_src=sources.train, known=known,
        unknowns=unknowns, eval_transform=eval_tf, extra_known=shifted,
    )


def check_distinct_sets(known: DataSource, ood: list[DataSource], reserved: tuple[str, ...] = ()) -> None:
    """At least one OOD set, and every set (known included) under its own display name."""
    if not ood:
        raise ConfigError("eval.ood: list at least one unknown (OOD) dataset")
    names = [known.display_name] + [src.display_name for src in ood]
    dupes = sorted({n for n in names if names.count(n) > 1} | (set(reserved) & set(names)))
    if dupes:
        if reserved:
            raise ConfigError(f"eval.ood: datasets need distinct labels (and not {', '.join(map(repr, reserved))}); "
                              f"repeated: {', '.join(dupes)}")
        raise ConfigError(f"eval.ood: several datasets are named {', '.join(dupes)}; give each a distinct `label`")
