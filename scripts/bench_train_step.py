#!/usr/bin/env python
"""CNN training step: BackMix (originals + mixed, bank update) vs the same doubled batch unmixed.

The issue's target: a training step with BackMix alongside — B originals + B mixed images in
one forward / backward, the CAM of the originals updating the mask bank — costs at most 10 %
more than a plain step on a batch of 2B images (the same forward / backward, no mixing, no
bank).  Both sides are the real ``Trainer.train_step`` with ``ClassifierTask`` (SGD step and
LR schedule included), on random CIFAR-size images (3x32x32) and a 50,000-row bank, so the
only difference is the mixing (``BackMix`` on the batch) plus CAM → bank update.

Steps of both sides are interleaved (A B, B A, ...) after one untimed warm-up round, so load
drift on a shared machine cancels; the ratio is the median of per-round ratios.  ``mix ms``
times the mixer alone on the same batch (the expected overhead).  Each ``--runs`` entry
(``model/precision``) runs in a fresh subprocess (Accelerate's state is per process).

    python scripts/bench_train_step.py --out bench_train_step.json
    python scripts/bench_train_step.py --runs small_cnn/no small_cnn/bf16 --reps 5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_coop import PRECISION_NAMES, PeakRSS, _Sized, _timed, machine_info  # noqa: E402
from backmix_vlm.runtime import machine_line  # noqa: E402

MODELS = {"small_cnn": {"width": 32}, "resnet18_cifar": {}, "airbench": {}}
NUM_CLASSES = 6     # CIFAR-10 open-set protocol: 6 known classes
BANK_ROWS = 50_000  # CIFAR-10 train size


def worker(model: str, precision: str, batch: int, reps: int, seed: int, threads: int,
           views: bool = True) -> dict[str, Any]:
    import tempfile

    from backmix_vlm.augment.geometry import build_views

    from backmix_vlm.augment import build_mixer
    from backmix_vlm.config import BackMixConfig, OptimConfig, RunConfig
    from backmix_vlm.engine.tasks import ClassifierTask
    from backmix_vlm.engine.trainer import Trainer
    from backmix_vlm.models.cnn import create_cnn

    if threads:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2 * batch, 3, 32, 32, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (2 * batch,), generator=g)
    indices = torch.randperm(BANK_ROWS, generator=g)[: 2 * batch]
    run_dir = tempfile.mkdtemp(prefix="bench_train_step_")
    trainers = {}
    for name, augment in (("plain", "none"), ("backmix", "backmix")):
        torch.manual_seed(seed)  # same initial weights on both sides
        net = create_cnn(model, NUM_CLASSES, **MODELS[model])
        trainers[name] = Trainer(ClassifierTask(net, 32), _Sized(BANK_ROWS),
                                 optim=OptimConfig(lr=0.1, batch_size=batch, epochs=1),
                                 run=RunConfig(device="cpu", precision=precision, seed=seed), run_dir=run_dir,
                                 num_classes=NUM_CLASSES, mixer=build_mixer(augment), backmix=BackMixConfig(),
                                 # both sides draw crop + flip on the device (the frame-consistent bank)
                                 views=build_views("crop_flip", {"padding": 4}) if views else None)
        trainers[name].model.train()
    names = list(trainers)
    steps: dict[str, list[float]] = {n: [] for n in names}
    growth: dict[str, list[float]] = {n: [] for n in names}
    for r in range(1 + reps):
        for name in (names if r % 2 == 0 else names[::-1]):
            n = 2 * batch if name == "plain" else batch  # plain: the doubled batch, unmixed
            trainer = trainers[name]
            with PeakRSS() as mem:
                t = _timed(lambda: trainer.train_step(images[:n], labels[:n], indices[:n]))
            if r:
                steps[name].append(t)
                growth[name].append(mem.growth_mib)
        if r:
            print(f"[{model}/{precision}] round {r}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in steps.items()),
                  file=sys.stderr, flush=True)
    mixer = trainers["backmix"].mixer
    geometry = trainers["backmix"].views(images[:batch], None)[1] if views else None
    mixer(images[:batch], labels[:batch], indices[:batch], geometry=geometry)
    mix_s = statistics.median(_timed(lambda: mixer(images[:batch], labels[:batch], indices[:batch], geometry=geometry))
                              for _ in range(max(reps, 5)))
    return {"model": model, "precision": precision, "batch": batch, "threads": torch.get_num_threads(),
            "views": views,
            "step_s": steps, "step_rss_growth_mib": growth, "mix_s": mix_s}


def summarise(res: dict[str, Any]) -> dict[str, Any]:
    plain, mixed = res["step_s"]["plain"], res["step_s"]["backmix"]
    ratios = [m / p for m, p in zip(mixed, plain)]
    return {"plain_s": statistics.median(plain), "backmix_s": statistics.median(mixed),
            "ratios": ratios, "ratio": statistics.median(ratios),
            "images_per_s_plain": 2 * res["batch"] / statistics.median(plain),
            "images_per_s_backmix": 2 * res["batch"] / statistics.median(mixed),
            "rss_growth_mib": {k: max(v) for k, v in res["step_rss_growth_mib"].items()}}


def markdown(report: dict[str, Any]) -> str:
    info = report["machine"]
    lines = [f"Device views (crop + flip drawn by the trainer, frame-consistent bank): "
             f"{report['runs'][0].get('views', False)}.", "", f"Machine: {info['cpu']}, {info['cores']} cores, {info['torch_threads']} torch threads, torch "
             f"{info['torch']}, {info['date']}; load average at start "
             f"{', '.join(f'{x:.1f}' for x in info['loadavg_start'])}, at end "
             f"{', '.join(f'{x:.1f}' for x in info['loadavg_end'])}; wall time {info['wall_s'] / 60:.1f} min.", "",
             f"| model, B={report['batch']} (2B images forward) | precision | plain s / step | BackMix s / step "
             "| ratio (median of rounds) | per-round ratios | mixer alone (ms) | peak RSS growth plain / BackMix (MiB) |",
             "|---|---|---:|---:|---:|---|---:|---:|"]
    for res in report["runs"]:
        s = res["summary"]
        lines.append(f"| {res['model']} | {PRECISION_NAMES[res['precision']]} | {s['plain_s']:.3f} | {s['backmix_s']:.3f} "
                     f"| **{s['ratio']:.3f}x** | {', '.join(f'{r:.3f}' for r in s['ratios'])} | {1000 * res['mix_s']:.1f} "
                     f"| {s['rss_growth_mib']['plain']:.0f} / {s['rss_growth_mib']['backmix']:.0f} |")
    return "\n".join(lines)


def _run_spec(spec: str) -> dict[str, str]:
    model, _, precision = spec.partition("/")
    if model not in MODELS or precision not in PRECISION_NAMES:
        raise SystemExit(f"--runs {spec!r}: expected model/precision with model in {list(MODELS)} "
                         f"and precision in {list(PRECISION_NAMES)}")
    return {"model": model, "precision": precision}


def main(argv: list[str] | None = None) -> None:
    print(machine_line(), flush=True)  # CPU model, kernel flags, native bf16 (each row names its precision)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", nargs="+", type=_run_spec,
                   default=[_run_spec(s) for s in ("small_cnn/no", "small_cnn/bf16", "resnet18_cifar/no")])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=5, help="timed rounds (after one warm-up round)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--no-views", dest="views", action="store_false",
                   help="v0.1: no device views (crop / flip in the loader, bank in mixed frames)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(**json.loads(args.worker))))
        return
    wall = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 17), "MALLOC_TRIM_THRESHOLD_": str(1 << 17)}
    runs = []
    for spec in args.runs:
        cfg = {**spec, "batch": args.batch, "reps": args.reps, "seed": args.seed, "threads": args.threads,
               "views": args.views}
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], env=env,
                              stdout=subprocess.PIPE, text=True, check=True)
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res["summary"] = summarise(res)
        runs.append(res)
    info["loadavg_end"] = os.getloadavg()
    info["wall_s"] = time.perf_counter() - wall
    report = {"machine": info, "batch": args.batch, "runs": runs}
    print(markdown(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
