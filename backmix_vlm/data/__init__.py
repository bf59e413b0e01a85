"""The data layer: named datasets in every common layout, transforms, few-shot splits, protocols.

Quick use::

    from backmix_vlm.config import DataSource
    from backmix_vlm.data import build_dataset, build_transform, CIFAR10_MEAN, CIFAR10_STD

    src = DataSource(name="cifar10", root="data", split="train")   # root: null -> $BACKMIX_DATA or ./data
    ds = build_dataset(src, build_transform(32, True, CIFAR10_MEAN, CIFAR10_STD, resize=src.resize))
    image, label, index = ds[0]          # FloatTensor[3,32,32], int, position in ds

Names: ``cifar10 cifar100 svhn tinyimagenet mnist fashionmnist imagefolder demo``
(``DATASETS.names()``).  Layouts: ``torchvision`` (official files), ``folder``
(``<root>/<split>/<class>/<image>``), ``hf`` (``save_to_disk`` folder or parquet files);
``layout: auto`` tries them in that order.  The ``demo`` set is a real-image CIFAR sample
shipped in ``backmix_vlm/assets/demo`` (splits ``train``, ``test``, ``ood-cifar100``).
"""
from .classnames import class_keys, class_names, clip_friendly
from .dataset import ImageDataset, IndexedSubset
from .datasets import DATASETS, DEMO_SPLITS, LAYOUTS, DatasetSpec, build_dataset, check_dataset
from .fewshot import fewshot_indices, sample_fewshot
from .images import jpeg_roundtrip, to_rgb
from .protocols import (OOD_BENCHMARKS, OpenSetProtocol, OpenSetSources, get_protocol, list_protocols, ood_sources,
                        open_set_sources, protocol_info)
from .transforms import (CIFAR10_MEAN, CIFAR10_STD, CLIP_MEAN, CLIP_STD, CROP_SIZE, IMAGENET_MEAN, IMAGENET_STD,
                         RESIZE_MODES, build_transform)

__all__ = [
    "DATASETS", "DEMO_SPLITS", "LAYOUTS", "DatasetSpec", "build_dataset", "check_dataset", "ImageDataset", "IndexedSubset",
    "class_names", "class_keys", "clip_friendly", "build_transform", "RESIZE_MODES", "CROP_SIZE",
    "CIFAR10_MEAN", "CIFAR10_STD", "CLIP_MEAN", "CLIP_STD", "IMAGENET_MEAN", "IMAGENET_STD",
    "fewshot_indices", "sample_fewshot", "get_protocol", "list_protocols", "protocol_info",
    "OpenSetProtocol", "OpenSetSources", "open_set_sources", "OOD_BENCHMARKS", "ood_sources", "to_rgb", "jpeg_roundtrip",
]
