"""Regenerate ``backmix_vlm/assets/demo`` (the shipped real-image sample) from the CIFAR archives.

Selection is deterministic: the first N files (sorted names = original CIFAR order) of each
class.  CIFAR-10 JPEGs are copied byte for byte; CIFAR-100 PNGs (lossless) are JPEG-encoded at
quality 75 so the OOD sample carries the same compression as the ID data.

    python scripts/make_demo_assets.py \
        --cifar10 ../shared/data/cifar10_jpg.tar.gz --cifar100 ../shared/data/cifar100_test_png.tar.gz
"""
from __future__ import annotations

import argparse
import io
import shutil
import tarfile
from collections import defaultdict
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PER_CLASS = {"train": 50, "test": 20}
OOD_PER_CLASS = 2  # x 100 CIFAR-100 classes = 200 images
JPEG_QUALITY = 75


def _members(tar: tarfile.TarFile, prefix: str, suffix: str) -> dict[str, list[tarfile.TarInfo]]:
    """``prefix<class>/<file><suffix>`` members grouped by class, files sorted by name."""
    by_class: dict[str, list[tarfile.TarInfo]] = defaultdict(list)
    for m in tar.getmembers():
        if m.isfile() and m.name.startswith(prefix) and m.name.endswith(suffix):
            parts = m.name[len(prefix):].split("/")
            if len(parts) == 2:
                by_class[parts[0]].append(m)
    return {c: sorted(ms, key=lambda m: m.name) for c, ms in sorted(by_class.items())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cifar10", default=str(REPO.parent / "shared/data/cifar10_jpg.tar.gz"))
    p.add_argument("--cifar100", default=str(REPO.parent / "shared/data/cifar100_test_png.tar.gz"))
    p.add_argument("--out", default=str(REPO / "backmix_vlm/assets/demo"))
    args = p.parse_args()
    out = Path(args.out)
    for sub in ("train", "test", "ood"):
        shutil.rmtree(out / sub, ignore_errors=True)

    with tarfile.open(args.cifar10) as tar:
        for split, n in PER_CLASS.items():
            groups = _members(tar, f"{split}/", ".jpg")
            assert len(groups) == 10, f"expected 10 CIFAR-10 classes in {args.cifar10}:{split}/"
            for cls, members in groups.items():
                (out / split / cls).mkdir(parents=True, exist_ok=True)
                for m in members[:n]:
                    (out / split / cls / Path(m.name).name).write_bytes(tar.extractfile(m).read())

    with tarfile.open(args.cifar100) as tar:
        groups = _members(tar, "cifar100/test/", ".png")
        assert len(groups) == 100, f"expected 100 CIFAR-100 classes in {args.cifar100}"
        for cls, members in groups.items():
            (out / "ood/cifar100" / cls).mkdir(parents=True, exist_ok=True)
            for m in members[:OOD_PER_CLASS]:
                img = Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")
                img.save(out / "ood/cifar100" / cls / (Path(m.name).stem + ".jpg"), quality=JPEG_QUALITY)

    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
