#!/usr/bin/env python
"""Mixing throughput: batched BackMix vs a per-sample dataset wrapper (the official code's style).

The reference below is written in the style of the official BackMix code (a Dataset wrapper
that mixes one image at a time in ``__getitem__``): per-image tensor ops, a per-image top-k
``argsort`` of the bank row, a second image loaded per sample, and a PIL round trip per image
(tensor -> PIL -> tensor + normalise).  Its random flip / crop is left out so both sides do
the same work: mixing only.  ``backmix_vlm.augment.BackMix`` mixes the whole normalised batch
with a handful of tensor ops.

Three timings per batch (median over ``--repeats``, after one warm-up):
  plain      per-sample PIL -> normalised tensor, then collate: what any loader does anyway
  reference  the per-sample wrapper: (raw, mixed) per sample, then collate
  batched    BackMix on the already-collated normalised batch
Speed-ups: ``reference / batched`` (end to end of the mixing wrapper) and the conservative
``(reference - plain) / batched`` (the wrapper's extra cost over plain loading).

    python scripts/bench_backmix.py --out bench_backmix.json
    python scripts/bench_backmix.py --cifar-tar ../shared/data/cifar10_jpg.tar.gz --out bench.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import statistics
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from backmix_vlm.runtime import machine_line  # noqa: E402
from backmix_vlm.augment import BackMix, MaskBank

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)  # the official code's normalisation


# ----------------------------------------------------------------------------- data
def load_images(n: int, cifar_tar: str | None, seed: int) -> tuple[list[Image.Image], list[int], str]:
    """``n`` 32x32 RGB PIL images: the first ``n`` CIFAR-10 train JPEGs, or random pixels."""
    if cifar_tar:
        images, labels, classes = [], [], {}
        with tarfile.open(cifar_tar, "r:gz") as tar:
            for member in tar:
                if not (member.isfile() and member.name.endswith(".jpg") and "/train/" in f"/{member.name}"):
                    continue
                cls = Path(member.name).parent.name
                images.append(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB"))
                labels.append(classes.setdefault(cls, len(classes)))
                if len(images) == n:
                    return images, labels, f"CIFAR-10 train JPEGs from {cifar_tar}"
        raise SystemExit(f"{cifar_tar}: fewer than {n} train/*.jpg images inside")
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    return [Image.fromarray(p) for p in pixels], list(rng.integers(0, 10, size=n)), "random 32x32 RGB"


# ----------------------------------------------------------------------------- reference style
class ReferenceStyleBackMixDataset(torch.utils.data.Dataset):
    """REFERENCE STYLE (official code): mixes one sample at a time inside ``__getitem__``.

    Rewritten here for timing only; the logic follows the official wrapper step by step:
    resize/crop + ToTensor + Normalize the target, random box, random background image
    from the dataset, per-image top-k of its bank row (argsort) upsampled to the image,
    mask, paste, then a PIL round trip of the mixed image.
    """

    def __init__(self, images: list[Image.Image], labels: list[int], box_side: int, mask_ratio: float) -> None:
        self.images, self.labels = images, labels
        self.box_side, self.mask_ratio = box_side, mask_ratio
        self.resize_crop = transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32)])
        self.totensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
        self.topil = transforms.ToPILImage()
        self.seg_bank = torch.ones(len(images), 8, 8) * 0.5

    def __len__(self) -> int:
        return len(self.images)

    def random_box(self, h: int, w: int) -> tuple[int, int, int, int]:
        y1, x1 = np.random.randint(0, 32 - h + 1), np.random.randint(0, 32 - w + 1)
        return x1, x1 + w, y1, y1 + h

    def mask_highest_k(self, seg_map: torch.Tensor) -> torch.Tensor:
        prob = seg_map.reshape(-1) / seg_map.sum()  # (a copy: the official code divides in place)
        top = torch.argsort(prob, descending=True)[: int(self.mask_ratio * prob.shape[0])]
        mask = torch.zeros(prob.shape[0])
        mask[top] = 1
        return F.interpolate(mask.reshape(1, 1, *seg_map.shape), (32, 32))[0]

    def __getitem__(self, idx: int):
        img = self.totensor(self.resize_crop(self.images[idx]))
        raw = img.detach().clone()
        x1, x2, y1, y2 = self.random_box(self.box_side, self.box_side)
        aux_idx = np.random.randint(len(self))
        aux = self.totensor(self.resize_crop(self.images[aux_idx]))
        aux *= 1 - self.mask_highest_k(self.seg_bank[aux_idx])
        ax1, ax2, ay1, ay2 = self.random_box(y2 - y1, x2 - x1)
        img[:, y1:y2, x1:x2] = aux[:, ay1:ay2, ax1:ax2]
        mixed = self.totensor(self.topil(torch.clamp(img * 0.25 + 0.5, 0, 1)))  # PIL round trip
        return raw, mixed, self.labels[idx], idx


# ----------------------------------------------------------------------------- timing
def median_ms(fn, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), times


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    print(machine_line(), flush=True)  # CPU model, kernel flags, native bf16 (each row names its precision)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--cut-area", type=float, default=1 / 16,
                   help="box area fraction; default 1/16 = the official code's 8 px box at 32 px (paper: 0.25)")
    p.add_argument("--mask-ratio", type=float, default=0.25)
    p.add_argument("--threads", type=int, default=1, help="torch threads for both sides (loader workers use 1)")
    p.add_argument("--cifar-tar", default=None, help="cifar10_jpg.tar.gz: use real CIFAR-10 images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    n = args.batch_size
    pil, labels, source = load_images(n, args.cifar_tar, args.seed)
    box_side = int(args.cut_area ** 0.5 * 32 + 0.5)

    ref = ReferenceStyleBackMixDataset(pil, labels, box_side, args.mask_ratio)
    batch = torch.stack([ref.totensor(ref.resize_crop(im)) for im in pil])
    label_t, index_t = torch.tensor(labels), torch.arange(n)
    bank = MaskBank(n, (8, 8))
    bank.update(index_t, torch.rand(n, 8, 8))  # continuous maps, as during training
    ref.seg_bank = bank.bank.clone()
    mixer = BackMix(bank, cut_area=args.cut_area, mask_ratio=args.mask_ratio, same_location=False,
                    generator=torch.Generator().manual_seed(args.seed))

    def plain():
        return torch.stack([ref.totensor(ref.resize_crop(im)) for im in pil])

    def reference():
        items = [ref[i] for i in range(n)]
        return torch.stack([it[0] for it in items]), torch.stack([it[1] for it in items])

    def batched():
        return mixer(batch, label_t, index_t).images

    plain_ms, plain_all = median_ms(plain, args.repeats)
    ref_ms, ref_all = median_ms(reference, args.repeats)
    ours_ms, ours_all = median_ms(batched, args.repeats)
    speedup = ref_ms / ours_ms
    speedup_extra = (ref_ms - plain_ms) / ours_ms

    rows = [
        ("plain loading (PIL -> tensor, collate)", plain_ms, ""),
        ("reference style: per-sample wrapper (raw + mixed)", ref_ms, "1.0x"),
        ("backmix_vlm BackMix, batched", ours_ms, f"{speedup:.1f}x (vs extra cost: {speedup_extra:.1f}x)"),
    ]
    print(f"BackMix mixing, batch {n} x 3x32x32, {source}, box {box_side}px, k={args.mask_ratio}, "
          f"{args.threads} thread(s), {cpu_name()}")
    print("\n| method | median ms / batch | images / s | speed-up |\n|---|---:|---:|---|")
    for name, ms, note in rows:
        print(f"| {name} | {ms:.2f} | {n / ms * 1e3:,.0f} | {note} |")

    result = {
        "command": " ".join(["python scripts/bench_backmix.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_name(), "logical_cpus": os.cpu_count(),
                    "torch_threads": args.threads, "torch": torch.__version__, "python": platform.python_version()},
        "setting": {"batch_size": n, "image_size": [3, 32, 32], "data": source, "cut_area": args.cut_area,
                    "box_side_px": box_side, "mask_ratio": args.mask_ratio, "repeats": args.repeats},
        "median_ms": {"plain": plain_ms, "reference": ref_ms, "batched": ours_ms},
        "all_ms": {"plain": plain_all, "reference": ref_all, "batched": ours_all},
        "speedup": speedup,
        "speedup_vs_extra_cost": speedup_extra,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
