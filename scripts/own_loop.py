"""BackMix in your own training loop: the README's snippet, runnable as written.

A small CNN with a CAM head on the CIFAR-10 sample that ships with the package (no data, no weights,
CPU, a few seconds).  Every line the README shows is here, with the model, data and optimizer it
leaves to you::

    python scripts/own_loop.py --epochs 2
"""
from __future__ import annotations

import argparse

import torch
from torch.utils.data import DataLoader

from backmix_vlm.augment import BackMix, MaskBank, alongside
from backmix_vlm.config import DataSource
from backmix_vlm.data import build_dataset, build_transform
from backmix_vlm.models.cnn import create_cnn
from backmix_vlm.saliency.cam import cam_foreground


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    # your data: any dataset yielding (image, label, index); here the shipped CIFAR-10 sample
    tf = build_transform(32, True, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
    train_set = build_dataset(DataSource(name="demo", split="train"), tf)
    loader = DataLoader(train_set, batch_size=50, shuffle=True, drop_last=True)
    # your model: returns ModelOutput(logits, features, cam) (a Conv1x1-GAP CAM head)
    model = create_cnn("small_cnn", len(train_set.classes), width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    # --- the README's snippet, unchanged ---
    bank = MaskBank(len(train_set), size=(8, 8), momentum=0.1)          # one soft map per training image
    backmix = BackMix(bank, cut_area=0.25, mask_ratio=0.25)              # paper: s = 0.25 (side 0.5), k = 0.25
    for _ in range(args.epochs):
        for images, labels, indices in loader:                                # datasets yield (image, label, index)
            mix = alongside(images, labels, backmix(images, labels, indices)) # originals + mixed, TI labels kept
            out = model(mix.images)                                           # ModelOutput(logits, features, cam)
            loss = mix.loss(out.logits)
            loss.backward(); opt.step(); opt.zero_grad()
            bank.update(indices, cam_foreground(out.cam[: len(images)].detach(), labels))  # clean images' CAM
        print(f"loss {loss.item():.4f}")
    return float(loss)


if __name__ == "__main__":
    main()
