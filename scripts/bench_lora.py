#!/usr/bin/env python
"""Speed of a LoRA BackMix training step vs a plain LoRA step on the same doubled batch (CPU).

Randomly initialised ViT-B/16 CLIP (``load_clip("ViT-B-16", "openai", load_weights=False)``: the
OpenAI architecture incl. QuickGELU, random weights — timing only), 224 px, 10 classes, LoRA
with CLIP-LoRA's defaults (rank 2, q/k/v of every block of both towers, text re-encoded every
step), the real ``Trainer.train_step`` with ``AdapterTask``, batch B:

    plain    no mixing, on a doubled batch of 2B images (the forward / backward BackMix alongside
             also runs, minus mixing and maps)
    backmix  BackMix alongside (B originals + B mixed), bank update every step, maps from the
             training backward (last-layer relevance, ``saliency.reuse_backward``)

Steps are interleaved in rounds whose order alternates (so load drift of a shared machine
cancels); round 0 is an untimed warm-up on 2 images; the ratio is the median of per-round
ratios.  Target: backmix / plain <= 1.15.

    python scripts/bench_lora.py --precision bf16 --batch 16 --rounds 6 [--threads 2] [--out bench_lora.json]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from backmix_vlm.runtime import machine_line  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class _Sized(torch.utils.data.Dataset):
    """Only its length matters: the trainer sizes the mask bank and sampler from it."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):  # pragma: no cover - train_step is fed directly
        raise IndexError(i)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", choices=["no", "bf16"], default="bf16")
    ap.add_argument("--batch", type=int, default=16, help="B: clean images per step (plain runs 2B)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--out", default=None)
    ap.add_argument("--micro", action="store_true",
                    help="only time one ViT-B/16 attention (SplitAttention, 8 x 197 tokens) forward + backward: "
                         "SDPA vs the explicit softmax the BackMix recording forward uses")
    args = ap.parse_args()
    print(machine_line(args.precision), flush=True)  # CPU model, kernel flags, native bf16, precision
    if args.micro:
        return micro(args)

    from backmix_vlm.adapters import LoRA
    from backmix_vlm.augment import build_mixer
    from backmix_vlm.config import BackMixConfig, OptimConfig, RunConfig
    from backmix_vlm.engine.adapter_task import AdapterTask, SaliencyConfig
    from backmix_vlm.engine.trainer import Trainer
    from backmix_vlm.models.clip import load_clip

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tag = "openai" if args.model in ("ViT-B-16", "ViT-L-14", "ViT-B-32") else None
    bundle = load_clip(args.model, pretrained=tag, load_weights=False)
    size, b = int(bundle.image_size), args.batch
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2 * b, 3, size, size, generator=g)
    labels = torch.randint(0, len(CLASSES), (2 * b,), generator=g)
    indices = torch.arange(2 * b)
    run_dir = tempfile.mkdtemp(prefix="bench_lora_")
    trainers = {}
    for name, augment in (("plain", "none"), ("backmix", "backmix")):
        adapter = LoRA(bundle, CLASSES)
        task = AdapterTask(adapter, size, SaliencyConfig(reuse_backward=True, start_layer=-1), args.precision)
        trainers[name] = Trainer(task, _Sized(2 * b), optim=OptimConfig(name="adamw", lr=2e-4, batch_size=b, epochs=1),
                                 run=RunConfig(device="cpu", precision=args.precision, seed=0), run_dir=run_dir,
                                 num_classes=len(CLASSES), mixer=build_mixer(augment), backmix=BackMixConfig())
        trainers[name].model.train()
    times: dict[str, list[float]] = {n: [] for n in trainers}
    load_start = os.getloadavg()
    for r in range(1 + args.rounds):
        order = list(trainers) if r % 2 == 0 else list(trainers)[::-1]
        for name in order:
            n = 2 if r == 0 else b
            n = 2 * n if name == "plain" else n
            start = time.perf_counter()
            trainers[name].train_step(images[:n], labels[:n], indices[:n])
            if r:
                times[name].append(time.perf_counter() - start)
        if r:
            print(f"round {r}: plain {times['plain'][-1]:.2f}s, backmix {times['backmix'][-1]:.2f}s "
                  f"({times['backmix'][-1] / times['plain'][-1]:.3f}x)", file=sys.stderr, flush=True)
    ratios = [m / p for m, p in zip(times["backmix"], times["plain"])]
    report = {"model": args.model, "precision": args.precision, "batch": b, "images_per_step": 2 * b,
              "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
              "date": dt.datetime.now().isoformat(timespec="minutes"), "loadavg_start": load_start,
              "loadavg_end": os.getloadavg(), "step_s": times,
              "median_s": {k: statistics.median(v) for k, v in times.items()},
              "ratios": ratios, "ratio_median": statistics.median(ratios)}
    print(f"{args.model} {args.precision}, B={b} (2B={2 * b} images/step), {report['threads']} threads: "
          f"plain {report['median_s']['plain']:.2f}s, backmix {report['median_s']['backmix']:.2f}s, "
          f"ratio median {report['ratio_median']:.3f} (rounds: {', '.join(f'{x:.3f}' for x in ratios)}); "
          f"target <= 1.15: {'reached' if report['ratio_median'] <= 1.15 else 'NOT reached'}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


def micro(args: argparse.Namespace) -> int:
    from torch import nn

    from backmix_vlm.models.split_attention import SplitAttention

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    attn = SplitAttention(nn.MultiheadAttention(768, 12, batch_first=False))
    x0 = torch.randn(197, 8, 768)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32

    def step(explicit: bool) -> float:
        x = x0.clone().requires_grad_(True)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out, _ = attn(x, x, x, need_weights=False, record=(lambda a: a) if explicit else None)
        out.float().sum().backward()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"sdpa": [], "explicit": []}
    for r in range(1 + 2 * args.rounds):
        for name in (["sdpa", "explicit"] if r % 2 == 0 else ["explicit", "sdpa"]):
            t = step(name == "explicit")
            if r:
                times[name].append(t)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"one ViT-B/16 attention, 8 x 197 tokens, {args.precision}, forward + backward: SDPA {med['sdpa']:.1f} ms, "
          f"explicit softmax {med['explicit']:.1f} ms ({torch.get_num_threads()} threads)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
