"""Pixel differences between CLIP preprocessing pipelines on real images.

Pipelines (all to 224 x 224 with OpenAI CLIP's mean / std, as for ``openai/clip-vit-base-patch16``):

* ``openai``   — OpenAI CLIP's ``_transform`` = open_clip's eval transform: torchvision ``Resize(224,
  BICUBIC)`` of the shorter side on the PIL image (PIL's antialiased bicubic), ``CenterCrop(224)``
  (offset ``round((H - 224) / 2)``), ToTensor, Normalize.  The toolkit's default for HF checkpoints.
* ``hf``       — transformers 5's ``CLIPImageProcessor`` (torchvision backend, the default of
  ``AutoImageProcessor`` / ``CLIPProcessor``): torchvision *tensor* bicubic resize with antialias on
  uint8, centre crop at ``int((H - 224) / 2)``.
* ``hf_pil``   — ``CLIPImageProcessorPil`` (transformers 4's ``CLIPImageProcessor``): PIL bicubic
  resize (same size rule), centre crop at ``(H - 224) // 2``, rescale + normalise in numpy.
* ``squash``   — the toolkit's dataset transform for fewshot runs (``build_transform(224, False,
  mean, std)``, ``resize: resize``): bicubic resize of the whole image to 224 x 224, no crop.

Differences are reported in 8-bit pixel units (normalised difference x std x 255), per pair of
pipelines: mean |diff|, 99.9th percentile, max, and the share of values differing by more than
one grey level.

    python scripts/compare_clip_preprocess.py --data-root /tmp/backmix_data --per-set 100
"""
from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETS = {  # name -> glob under --data-root
    "DTD (partial, 160 px)": "dtd_partial/images/*/*.jpg",
    "Tiny-ImageNet test (64 px)": "tiny-imagenet-200/test/images/*.JPEG",
    "CIFAR-10 test (32 px)": "cifar10/test/*/*.jpg",
}
HF_SETTINGS = {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}, "resample": 3,
               "do_center_crop": True, "do_resize": True, "do_normalize": True, "do_convert_rgb": True}


def pipelines() -> dict:
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    from backmix_vlm.data.transforms import build_transform
    from backmix_vlm.models.hf_clip import HFImageProcessorTransform, Preprocess, openai_eval_transform

    pp = Preprocess(resize=224, crop=224, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD)
    return {
        "openai": openai_eval_transform(pp),
        "hf": HFImageProcessorTransform(HF_SETTINGS, backend="torchvision"),
        "hf_pil": HFImageProcessorTransform(HF_SETTINGS, backend="pil"),
        "squash": build_transform(224, False, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, resize="resize"),
    }


def main() -> int:
    from PIL import Image
    from open_clip.constants import OPENAI_DATASET_STD

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default="/tmp/backmix_data")
    ap.add_argument("--per-set", type=int, default=100, help="evenly spaced images per set")
    args = ap.parse_args()
    to255 = torch.tensor(OPENAI_DATASET_STD).view(3, 1, 1) * 255
    pipes = pipelines()
    pairs = [("openai", "hf"), ("openai", "hf_pil"), ("hf", "hf_pil"), ("openai", "squash")]
    print(f"{args.per_set} images per set; differences in 8-bit grey levels\n")
    print("| images | pair | mean abs | p99.9 | max | share > 1 level |")
    print("|---|---|---|---|---|---|")
    for set_name, pattern in SETS.items():
        files = sorted(glob.glob(str(Path(args.data_root) / pattern)))
        if not files:
            print(f"| {set_name} | (no files under {args.data_root}/{pattern}) | | | | |")
            continue
        files = [files[i] for i in np.linspace(0, len(files) - 1, min(args.per_set, len(files))).astype(int)]
        groups: dict[str, dict[tuple[str, str], list[torch.Tensor]]] = {}
        for f in files:
            img = Image.open(f).convert("RGB")
            shape = "square" if img.width == img.height else "non-square"
            diffs = groups.setdefault(shape, {p: [] for p in pairs})
            out = {k: t(img) for k, t in pipes.items()}
            for a, b in pairs:
                diffs[(a, b)].append(((out[a] - out[b]) * to255).abs().flatten())
        for shape, diffs in sorted(groups.items(), key=lambda kv: kv[0] != "square"):
            n = len(next(iter(diffs.values())))
            for (a, b), chunks in diffs.items():
                d = torch.cat(chunks)
                print(f"| {set_name}, {n} {shape} | {a} vs {b} | {d.mean():.3f} | {torch.quantile(d[::7], 0.999):.2f} | "
                      f"{d.max():.2f} | {(d > 1.0).float().mean() * 100:.2f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
