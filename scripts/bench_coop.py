#!/usr/bin/env python
"""Speed and memory of the CLIP adapter path on CPU: matmul peak, ViT-B/16 encoding, CoOp steps.

Everything runs on a randomly initialised ViT-B/16 CLIP (``load_clip("ViT-B-16", "openai",
load_weights=False)``: the OpenAI architecture incl. QuickGELU, random weights — timing only),
224 px, 10 classes (CIFAR-10 names), CoOp with its default 16 random context tokens.

1. **matmul peak**: ``torch.matmul`` of two 4096x4096 matrices, fp32 and bf16 (best of 3).
2. **eval encoding**: ``encode_image`` of a batch under ``torch.inference_mode`` (fp32, bf16
   autocast), in open_clip's batch-first layout as loaded and in the seq-first layout
   (:func:`set_layout`): images/s and % of the measured matmul peak of that dtype, with the
   FLOPs of one image forward counted from the architecture (:func:`vit_image_flops`; the
   usual "17.6 GFLOPs" of ViT-B/16 are multiply-adds, i.e. 35.1 GFLOPs).
3. **CoOp training step** (the real ``Trainer.train_step`` with ``AdapterTask``), batch B:
     plain      no mixing, on a doubled batch of 2B images (the same forward / backward as
                BackMix alongside, minus mixing and maps)
     reuse      BackMix alongside (B originals + B mixed), bank update every step, maps from
                the training forward + the tail (``saliency.reuse_forward``), start_layer=-1
     separate   the same, maps from a separate pass on the clean images, start_layer=-1
     all_layers reuse, start_layer=0 (relevance through all 12 blocks)
   Steps are interleaved in rounds whose order alternates (A B C D, D C B A, ...) so that load
   drift of a shared machine cancels; round 0 is an untimed warm-up on 2 images.  The ratio to
   plain is the median of the per-round ratios.  Memory: the peak RSS growth during a step
   over the RSS just before it (psutil sampling every 5 ms; glibc's mmap threshold is pinned
   so freed activations go back to the OS and every step starts from the same baseline), and
   the worker's ``ru_maxrss``.  Each ``--train`` spec runs in a fresh subprocess (Accelerate's
   state is per process; clean RSS).

    python scripts/bench_coop.py --out bench_coop.json
    python scripts/bench_coop.py --threads 1 --train bf16/seq_first/plain+reuse+separate --out b.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from backmix_vlm.runtime import machine_line  # noqa: E402

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CONFIGS = {  # name -> (augment, SaliencyConfig fields)
    "plain": ("none", {}),
    "reuse": ("backmix", {"reuse_forward": True, "start_layer": -1}),
    "separate": ("backmix", {"reuse_forward": False, "start_layer": -1}),
    "all_layers": ("backmix", {"reuse_forward": True, "start_layer": 0}),
}
PRECISION_NAMES = {"no": "fp32", "bf16": "bf16 autocast"}


# ----------------------------------------------------------------------------- machine / flops
def machine_info() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "date": dt.datetime.now().isoformat(timespec="minutes"), "loadavg_start": os.getloadavg()}


def matmul_peak(n: int = 4096, reps: int = 3) -> dict[str, float]:
    """Best-of-``reps`` GFLOP/s of an n x n x n matmul, fp32 and bf16 (2 n^3 FLOPs)."""
    peak = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.matmul(a, b)  # warm-up
        best = min(_timed(lambda: torch.matmul(a, b)) for _ in range(reps))
        peak[name] = 2 * n ** 3 / best / 1e9
    return peak


def vit_image_flops(visual: torch.nn.Module) -> float:
    """FLOPs (2 per multiply-add) of one open_clip ViT image forward, from its architecture.

    Patch embedding + per block (qkv, QK^T, AV, out-proj, MLP) + the CLS projection; norms,
    softmax, activations and residual adds (< 1 %) are left out.
    """
    conv = visual.conv1
    ph, pw = conv.kernel_size
    gh, gw = visual.grid_size
    patches = gh * gw
    tokens = patches + 1
    width = conv.out_channels
    macs = patches * width * conv.in_channels * ph * pw
    for block in visual.transformer.resblocks:
        heads = block.attn.num_heads
        hidden = block.mlp.c_fc.out_features
        macs += tokens * width * 3 * width                       # qkv
        macs += 2 * heads * tokens * tokens * (width // heads)   # QK^T and AV
        macs += tokens * width * width                           # out-proj
        macs += 2 * tokens * width * hidden                      # MLP
    if visual.proj is not None:
        macs += visual.proj.shape[0] * visual.proj.shape[1]
    return 2.0 * macs


def counted_flops(model: torch.nn.Module, image_size: int) -> float:
    """Cross-check of :func:`vit_image_flops` with torch's FlopCounterMode (explicit attention,
    since the fused attention kernel is invisible to the counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    from backmix_vlm.saliency.attention import explicit_attention

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), explicit_attention(list(model.visual.transformer.resblocks), lambda i, a: a), counter:
        model.encode_image(torch.zeros(1, 3, image_size, image_size))
    return float(counter.get_total_flops())


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- RSS sampling
class PeakRSS:
    """Peak resident memory of this process while the block runs (psutil, every ``interval`` s)."""

    def __init__(self, interval: float = 0.005) -> None:
        import psutil

        self.proc, self.interval = psutil.Process(), interval

    def __enter__(self) -> "PeakRSS":
        self.before = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.before) / 2 ** 20


# ----------------------------------------------------------------------------- layouts
def set_layout(model: torch.nn.Module, layout: str) -> None:
    """``loaded``: open_clip's batch-first blocks; ``seq_first``: the same blocks fed (L, N, D).

    Same math.  Why it matters on CPU: a batch-first ``nn.MultiheadAttention`` outside its fused
    inference path (autocast, or autograd) transposes its input and projects a *non-contiguous*
    (L, N, D) view; for bf16 that ``linear`` becomes a batched matmul over an expanded copy of
    the weight (7x slower than the contiguous projection on this CPU, see the docs).  With the
    seq-first layout open_clip transposes once per tower and every projection is contiguous.
    """
    first = layout == "loaded"
    for tower in (model.visual.transformer, model.transformer):
        tower.batch_first = first
        for block in tower.resblocks:
            block.attn.batch_first = first


def eval_encoding(model: torch.nn.Module, batch: int, reps: int, size: int,
                  layouts: list[str]) -> dict[str, list[float]]:
    """Seconds per ``encode_image`` of ``batch`` images under inference_mode, per layout × dtype.

    Warm-up on 2 images; the timed reps of all variants are interleaved.
    """
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    variants = [(layout, prec) for layout in layouts for prec in ("fp32", "bf16")]
    times: dict[str, list[float]] = {f"{layout}/{prec}": [] for layout, prec in variants}
    with torch.inference_mode():
        for r in range(1 + reps):
            for layout, prec in (variants if r % 2 == 0 else variants[::-1]):
                set_layout(model, layout)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "bf16"):
                    t = _timed(lambda: model.encode_image(images[:2] if r == 0 else images))
                if r:
                    times[f"{layout}/{prec}"].append(t)
            print(f"[eval] round {r} done", file=sys.stderr, flush=True)
    set_layout(model, "loaded")
    return times


# ----------------------------------------------------------------------------- train worker
class _Sized(torch.utils.data.Dataset):
    """Only its length matters: the trainer sizes the mask bank and sampler from it."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:  # pragma: no cover - train_step is fed directly
        raise IndexError(i)


def train_worker(precision: str, layout: str, configs: list[str], batch: int, reps: int, seed: int,
                 threads: int) -> dict[str, Any]:
    """CoOp ``Trainer.train_step`` timings of every config in one process, interleaved by round."""
    import resource
    import tempfile

    from backmix_vlm.adapters import CoOp
    from backmix_vlm.augment import build_mixer
    from backmix_vlm.config import BackMixConfig, OptimConfig, RunConfig
    from backmix_vlm.engine.adapter_task import AdapterTask, SaliencyConfig
    from backmix_vlm.engine.trainer import Trainer
    from backmix_vlm.models.clip import load_clip

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    bundle = load_clip("ViT-B-16", pretrained="openai", load_weights=False)
    set_layout(bundle.model, layout)
    size = int(bundle.image_size)
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2 * batch, 3, size, size, generator=g)
    labels = torch.randint(0, len(CLASSES), (2 * batch,), generator=g)
    adapter = CoOp(bundle, CLASSES)
    run_dir = tempfile.mkdtemp(prefix="bench_coop_")
    trainers = {}
    for name in configs:
        augment, saliency = CONFIGS[name]
        task = AdapterTask(adapter, size, SaliencyConfig(**saliency), precision)
        trainers[name] = Trainer(task, _Sized(2 * batch), optim=OptimConfig(lr=0.002, batch_size=batch, epochs=1),
                                 run=RunConfig(device="cpu", precision=precision, seed=seed), run_dir=run_dir,
                                 num_classes=len(CLASSES), mixer=build_mixer(augment), backmix=BackMixConfig())
    indices = torch.arange(2 * batch)
    steps: dict[str, list[float]] = {n: [] for n in configs}
    growth: dict[str, list[float]] = {n: [] for n in configs}
    rss_before = PeakRSS().proc.memory_info().rss / 2 ** 20
    for r in range(1 + reps):
        order = configs if r % 2 == 0 else configs[::-1]
        for name in order:
            b = 2 if r == 0 else batch  # round 0: a small warm-up batch (lazy set-up, not timed)
            n = 2 * b if name == "plain" else b  # plain: the doubled batch, no mixing
            trainer = trainers[name]
            with PeakRSS() as mem:
                t = _timed(lambda: trainer.train_step(images[:n], labels[:n], indices[:n]))
            if r:
                steps[name].append(t)
                growth[name].append(mem.growth_mib)
        if r:
            print(f"[{precision}/{layout}] round {r}: " + ", ".join(f"{k} {v[-1]:.1f}s" for k, v in steps.items()),
                  file=sys.stderr, flush=True)
    return {"precision": precision, "layout": layout, "batch": batch, "threads": torch.get_num_threads(),
            "step_s": steps, "step_rss_growth_mib": growth, "rss_before_steps_mib": rss_before,
            "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# ----------------------------------------------------------------------------- report
def summarise_steps(res: dict[str, Any]) -> dict[str, Any]:
    steps = res["step_s"]
    rows = {}
    for name, times in steps.items():
        med = statistics.median(times)
        row = {"median_s": med, "images_per_s": 2 * res["batch"] / med,
               "rss_growth_mib": max(res["step_rss_growth_mib"][name])}
        if "plain" in steps and name != "plain":
            row["ratios"] = [t / p for t, p in zip(times, steps["plain"])]
            row["ratio_to_plain"] = statistics.median(row["ratios"])
        rows[name] = row
    return rows


def markdown(report: dict[str, Any]) -> str:
    info, peak, flops = report["machine"], report["matmul_peak_gflops"], report["flops"]
    lines = [f"Machine: {info['cpu']}, {info['cores']} cores, {info['torch_threads']} torch threads, torch "
             f"{info['torch']}, Python {info['python']}, {info['date']}; load average at start "
             f"{', '.join(f'{x:.1f}' for x in info['loadavg_start'])}, at end "
             f"{', '.join(f'{x:.1f}' for x in info['loadavg_end'])}; script wall time {info['wall_s'] / 60:.1f} min.",
             "",
             f"matmul 4096³ (best of 3): fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s. "
             f"ViT-B/16 224 px image forward: {flops['arch'] / 1e9:.2f} GFLOPs from the architecture "
             f"(torch FlopCounterMode with explicit attention: {flops['counted'] / 1e9:.2f}).", ""]
    ev = report["eval"]
    lines += [f"| eval encoding, batch {report['batch']} (median of {len(next(iter(ev['times'].values())))}) "
              "| s / batch | images/s | GFLOP/s | % of matmul peak (same dtype) |", "|---|---:|---:|---:|---:|"]
    for key, row in ev["summary"].items():
        lines.append(f"| {key} | {row['median_s']:.2f} | {row['images_per_s']:.2f} | {row['gflops']:.0f} "
                     f"| {row['pct_of_peak']:.0f} % |")
    lines += ["", f"| CoOp step, B={report['batch']} (2B images forward) | precision / layout | median s / step "
              "| images/s | ratio to plain (median of rounds) | per-round ratios | peak RSS growth / step (MiB) |",
              "|---|---|---:|---:|---:|---|---:|"]
    for res in report["train"]:
        for name, row in res["summary"].items():
            ratio = f"**{row['ratio_to_plain']:.2f}x**" if "ratio_to_plain" in row else "1.00x"
            lines.append(f"| {name} | {PRECISION_NAMES[res['precision']]} / {res['layout']} | {row['median_s']:.2f} "
                         f"| {row['images_per_s']:.2f} | {ratio} | {', '.join(f'{r:.2f}' for r in row.get('ratios', []))} "
                         f"| {row['rss_growth_mib']:.0f} |")
    return "\n".join(lines)


def parse_train_spec(spec: str) -> dict[str, Any]:
    """``precision/layout/config+config`` e.g. ``bf16/seq_first/plain+reuse``."""
    try:
        precision, layout, names = spec.split("/")
        configs = names.split("+")
    except ValueError:
        raise SystemExit(f"--train {spec!r}: expected precision/layout/config+config") from None
    bad = [c for c in configs if c not in CONFIGS]
    if precision not in PRECISION_NAMES or layout not in ("loaded", "seq_first") or bad:
        raise SystemExit(f"--train {spec!r}: precision in {list(PRECISION_NAMES)}, layout in [loaded, seq_first], "
                         f"configs in {list(CONFIGS)}")
    return {"precision": precision, "layout": layout, "configs": configs}


def main(argv: list[str] | None = None) -> None:
    print(machine_line(), flush=True)  # CPU model, kernel flags, native bf16 (each row names its precision)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=3, help="timed rounds per train config (after a small warm-up)")
    p.add_argument("--eval-reps", type=int, default=2)
    p.add_argument("--eval-layouts", nargs="*", default=["loaded", "seq_first"])
    p.add_argument("--train", nargs="*", type=parse_train_spec,
                   default=[parse_train_spec("bf16/seq_first/plain+reuse+separate+all_layers"),
                            parse_train_spec("no/loaded/plain+reuse+separate")],
                   help="precision/layout/config+config ... (precision: no = fp32, bf16 autocast)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON with every timing")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(train_worker(**json.loads(args.worker))))
        return

    from backmix_vlm.models.clip import load_clip

    wall = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    peak = matmul_peak()
    print(f"matmul peak GFLOP/s: {peak}", file=sys.stderr, flush=True)
    torch.manual_seed(args.seed)
    model = load_clip("ViT-B-16", pretrained="openai", load_weights=False).model
    size = int(model.visual.image_size[0])
    flops = {"arch": vit_image_flops(model.visual), "counted": counted_flops(model, size)}
    report: dict[str, Any] = {"machine": info, "matmul_peak_gflops": peak, "flops": flops, "batch": args.batch}
    ev = {"times": eval_encoding(model, args.batch, args.eval_reps, size, args.eval_layouts) if args.eval_layouts else {}}
    ev["summary"] = {}
    for key, times in ev["times"].items():
        med = statistics.median(times)
        ips = args.batch / med
        ev["summary"][key] = {"median_s": med, "images_per_s": ips, "gflops": ips * flops["arch"] / 1e9,
                              "pct_of_peak": 100 * ips * flops["arch"] / 1e9 / peak[key.split("/")[1]]}
    report["eval"] = ev
    del model

    # one process per train spec: Accelerate's state is per process, and RSS starts clean
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 17), "MALLOC_TRIM_THRESHOLD_": str(1 << 17)}
    report["train"] = []
    for spec in args.train:
        cfg = {**spec, "batch": args.batch, "reps": args.reps, "seed": args.seed, "threads": args.threads}
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], env=env,
                              stdout=subprocess.PIPE, text=True, check=True)
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res["summary"] = summarise_steps(res)
        report["train"].append(res)
    info["loadavg_end"] = os.getloadavg()
    info["wall_s"] = time.perf_counter() - wall
    print(markdown(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
