#!/usr/bin/env python
"""Fill the git-ignored ``data/device/`` (<= ~60 MB) with what the GPU scripts read.

The device machine cannot read ``../shared``; only the working tree travels (64 MiB).  This copies
the CIFAR-10 JPEG archive as is (20 MB, unpacked on the device by osr_cifar10.sh) and a subset of
the OOD sets as files: CIFAR-100 test (``--per-class`` images per fine class) and Tiny-ImageNet
test (``--tin`` images), in the layouts the data layer reads.

    python scripts/device/prepare_data.py [--shared ../shared/data]
"""
from __future__ import annotations

import argparse
import io
import shutil
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--out", type=Path, default=REPO / "data" / "device")
    p.add_argument("--per-class", type=int, default=20, help="CIFAR-100 test images per class (100 classes)")
    p.add_argument("--tin", type=int, default=2000, help="Tiny-ImageNet test images")
    p.add_argument("--tin-val", type=int, default=2000, help="Tiny-ImageNet val images (Outlier Exposure's outliers)")
    p.add_argument("--far", action=argparse.BooleanOptionalAction, default=True,
                   help="also MNIST test (idx files) and the partial DTD archive (Textures), the far-OOD sets")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(a.shared / "cifar10_jpg.tar.gz", a.out / "cifar10_jpg.tar.gz")
    with tarfile.open(a.shared / "cifar100_test_png.tar.gz") as tar:
        kept: dict[str, int] = {}
        for m in sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".png")), key=lambda m: m.name):
            cls = Path(m.name).parent.name
            if kept.get(cls, 0) < a.per_class:
                kept[cls] = kept.get(cls, 0) + 1
                dst = a.out / "cifar100" / "test" / cls / Path(m.name).name
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(tar.extractfile(m).read())
    with tarfile.open(a.shared / "tinyimagenet_val_test.tar.gz") as tar:
        n, val = 0, []
        annotations = ""
        for m in tar.getmembers():
            name = m.name.split("/", 1)[-1] if m.name.startswith("tiny-imagenet-200/") else None
            if not m.isfile() or name is None:
                continue
            if name == "val/val_annotations.txt":
                annotations = tar.extractfile(m).read().decode()
                continue
            is_val = name.startswith("val/images/") and len(val) < a.tin_val
            keep = name in ("wnids.txt", "words.txt") or (name.startswith("test/images/") and n < a.tin) or is_val
            if keep:
                n += name.startswith("test/images/")
                if is_val:
                    val.append(Path(name).name)
                dst = a.out / "tiny-imagenet-200" / name
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(tar.extractfile(m).read())
        if val:  # the annotation lines of the copied val images only
            kept_val = set(val)
            (a.out / "tiny-imagenet-200" / "val" / "val_annotations.txt").write_text(
                "".join(line + "\n" for line in annotations.splitlines() if line.split("\t", 1)[0] in kept_val))
    if a.far:
        (a.out / "mnist").mkdir(exist_ok=True)
        for f in (a.shared / "mnist").glob("t10k-*"):
            shutil.copy2(f, a.out / "mnist" / f.name)
        shutil.copy2(a.shared / "dtd_partial_160px.tar.gz", a.out / "dtd_partial_160px.tar.gz")
    size = sum(f.stat().st_size for f in a.out.rglob("*") if f.is_file()) / 2**20
    print(f"data/device ready: {size:.1f} MiB ({sum(kept.values())} CIFAR-100, {n} Tiny-ImageNet test, "
          f"{len(val)} Tiny-ImageNet val images{', MNIST test, DTD archive' if a.far else ''})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
