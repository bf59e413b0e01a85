#!/usr/bin/env python
"""Download the public datasets the shipped configs read into one data root (needs internet).

    python scripts/prepare_data.py                       # CIFAR-10 into $BACKMIX_DATA (else ./data)
    python scripts/prepare_data.py cifar10 cifar100 svhn --root /datasets
    export BACKMIX_DATA=/datasets                          # every job's data_root default

Each set is fetched with torchvision's downloader into the layout ``backmix-vlm`` reads
(``<root>/cifar-10-batches-py``, ``<root>/cifar-100-python``, ``<root>/{train,test}_32x32.mat``,
``<root>/MNIST/raw``, ``<root>/FashionMNIST/raw``, ``<root>/tiny-imagenet-200``); sets already
there are only checked.  Which sets each config needs:

* first try, no download at all: ``configs/demo.yaml``, ``configs/*/tiny_demo.yaml`` (shipped images)
* ``configs/cnn/*.yaml``: cifar10 (OOD examples: cifar100, tinyimagenet)
* ``configs/fewshot/table_v/*.yaml``: cifar10 cifar100 svhn (svhn needs ``pip install scipy``)
* ``configs/zeroshot/clip_vitb16_cifar10.yaml``: cifar10 cifar100 svhn tinyimagenet mnist fashionmnist
"""
from __future__ import annotations

import argparse
import sys

SETS = {  # name -> splits the configs read
    "cifar10": ("train", "test"), "cifar100": ("train", "test"), "svhn": ("train", "test"),
    "mnist": ("train", "test"), "fashionmnist": ("train", "test"), "tinyimagenet": ("test",),
}


def main(argv: list[str] | None = None) -> int:
    from backmix_vlm.config import default_data_root

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sets", nargs="*", default=["cifar10"], help=f"any of: {', '.join(SETS)} (default: cifar10)")
    parser.add_argument("--root", default=None, help="data root (default: $BACKMIX_DATA, else ./data)")
    args = parser.parse_args(argv)
    unknown = [s for s in args.sets if s not in SETS]
    if unknown:
        parser.error(f"unknown set(s) {', '.join(unknown)}; choose from {', '.join(SETS)}")
    root = args.root or default_data_root()

    from backmix_vlm.config import DataSource
    from backmix_vlm.data import check_dataset
    from backmix_vlm.errors import BackmixError

    try:
        for name in args.sets:
            for split in SETS[name]:
                ds = check_dataset(DataSource(name=name, root=root, split=split, download=True))
                print(f"{name} {split}: {len(ds)} images, {len(ds.classes)} classes")
    except BackmixError as e:
        print(f"prepare_data: error: {e}", file=sys.stderr)
        return 2
    print(f"data ready in {root}; the configs read it when run from this folder, or: export BACKMIX_DATA={root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
