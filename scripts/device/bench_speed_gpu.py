#!/usr/bin/env python
"""GPU speed and memory of the frozen-tower fast path (issue 11): one script, at most ~3 minutes on one H200.

Random weights only (timing and memory, never results).  Sections, each skipped with a clear
message when what it needs is missing (the device machine has torch + timm but no open_clip;
Accelerate may be missing too):

1. ``matmul``  the GPU's measured bf16 matmul rate (8192³, best of 10, CUDA events).
2. ``eval``    ViT-B/16 image encoding at batch 256 under ``torch.inference_mode``, bf16:
               fp32 weights under autocast vs the tower held in bf16
               (:func:`backmix_vlm.models.frozen.hold_frozen_in`); images/s and % of the matmul
               rate.  timm ``vit_base_patch16_224`` always (needs only torch + timm); open_clip's
               CLIP ViT-B/16 image tower when open_clip is installed.
3. ``steps``   training steps in images/s, bf16, base held in bf16, through the real
               ``Trainer.train_step`` (needs Accelerate): CoOp plain / BackMix (needs open_clip)
               and VPT plain / BackMix over the timm ViT-B/16 (no open_clip needed).
               plain runs the doubled batch (2B images), BackMix B originals + B mixed with a
               mask-bank update every step.
4. ``memory``  peak GPU memory (``torch.cuda.max_memory_allocated``) of the attention-map path
               with ``start_layer`` -1 and 0: the separate relevance pass
               (``AttentionRelevance``) on the timm ViT-B/16, and one BackMix step of VPT
               (maps from the training backward) and CoOp (reuse-forward tail) when their
               requirements are there.

``--smoke`` runs every section on the CPU with tiny models (32 px, 2 blocks) and small batches
in seconds: it checks the script, its numbers mean nothing.

    python scripts/device/bench_speed_gpu.py --out $OUT            # on the GPU machine
    python scripts/device/bench_speed_gpu.py --smoke --out /tmp/smoke
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import importlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

BF16 = torch.bfloat16
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


WITHOUT: set[str] = set()  # --without: packages treated as missing (checks the skip paths)


def has(module: str) -> bool:
    return module not in WITHOUT and importlib.util.find_spec(module) is not None


class Skip(Exception):
    """A section (or part of one) cannot run here; the message says what it needs."""


# ----------------------------------------------------------------------------- timing
class Timer:
    """Seconds per call: CUDA events on a GPU, perf_counter on the CPU; median of ``reps`` after ``warmup``."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], Any], reps: int, warmup: int = 1) -> list[float]:
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(reps):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        return times

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def matmul_rate(device: torch.device, n: int, reps: int, timer: Timer) -> dict[str, float]:
    a = torch.randn(n, n, device=device, dtype=BF16)
    b = torch.randn(n, n, device=device, dtype=BF16)
    times = timer(lambda: torch.matmul(a, b), reps=reps, warmup=3)
    return {"n": n, "best_s": min(times), "tflops": 2 * n ** 3 / min(times) / 1e12}


# ----------------------------------------------------------------------------- models
def timm_vit(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=8, depth=2) if args.smoke else {}
    name = "vit_tiny_patch16_224" if args.smoke else "vit_base_patch16_224"
    return timm.create_model(name, pretrained=False, num_classes=0, **kw).to(device).eval().requires_grad_(False)


def clip_bundle(args: argparse.Namespace, device: torch.device) -> Any:
    if not has("open_clip"):
        raise Skip("open_clip is not installed (pip install open_clip_torch): CLIP parts skipped")
    from backmix_vlm.models.clip import TINY_CLIP, load_clip

    torch.manual_seed(0)
    if args.smoke:
        return load_clip(TINY_CLIP, pretrained=None, device=device)
    return load_clip("ViT-B-16", "openai", load_weights=False, device=device)


def vit_flops(tokens: int, width: int, mlp: int, depth: int, patches: int, patch_in: int, proj: int = 0) -> float:
    """FLOPs (2 per multiply-add) of one ViT image forward: patch embedding, per block qkv, QK^T,
    AV, out-proj and MLP, and a final projection; norms / softmax / activations left out."""
    macs = patches * width * patch_in
    macs += depth * (tokens * width * 4 * width + 2 * tokens * tokens * width + 2 * tokens * width * mlp)
    return 2.0 * (macs + proj)


def timm_flops(vit: torch.nn.Module) -> float:
    pe = vit.patch_embed
    patches = pe.num_patches
    tokens = patches + vit.num_prefix_tokens
    block = vit.blocks[0]
    return vit_flops(tokens, vit.embed_dim, block.mlp.fc1.out_features, len(vit.blocks), patches,
                     pe.proj.in_channels * pe.proj.kernel_size[0] * pe.proj.kernel_size[1])


def clip_flops(visual: torch.nn.Module) -> float:
    conv = visual.conv1
    gh, gw = visual.grid_size
    block = visual.transformer.resblocks[0]
    proj = visual.proj.shape[0] * visual.proj.shape[1] if visual.proj is not None else 0
    return vit_flops(gh * gw + 1, conv.out_channels, block.mlp.c_fc.out_features, len(visual.transformer.resblocks),
                     gh * gw, conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1], proj)


# ----------------------------------------------------------------------------- sections
def section_eval(args: argparse.Namespace, device: torch.device, timer: Timer, peak_tflops: float) -> dict[str, Any]:
    from backmix_vlm.models.frozen import hold_frozen_in

    out: dict[str, Any] = {}
    size = 32 if args.smoke else 224
    images = torch.randn(args.eval_batch, 3, size, size, device=device)
    towers: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], float] | str] = {}
    vit = timm_vit(args, device)
    towers[f"timm {'vit_tiny (smoke)' if args.smoke else 'vit_base_patch16_224'}"] = (vit, timm_flops(vit))
    clip_name = f"open_clip {'backmix-tiny-clip (smoke)' if args.smoke else 'ViT-B-16'} image tower"
    try:
        bundle = clip_bundle(args, device)
        towers[clip_name] = (bundle.model.visual, clip_flops(bundle.model.visual))
    except Skip as e:
        towers[clip_name] = str(e)
    for name, spec in towers.items():
        if isinstance(spec, str):
            out[name] = {"skipped": spec}
            continue
        model, flops = spec
        held = copy.deepcopy(model)
        hold_frozen_in(held, BF16)
        rows = {}
        with torch.inference_mode(), torch.autocast(device.type, dtype=BF16):
            for variant, m in (("fp32 weights, bf16 autocast", model), ("held in bf16", held)):
                times = timer(lambda: m(images), reps=args.reps, warmup=2)
                med = statistics.median(times)
                rows[variant] = {"median_s": med, "images_per_s": args.eval_batch / med,
                                 "tflops": args.eval_batch * flops / med / 1e12,
                                 "pct_of_matmul": 100 * args.eval_batch * flops / med / 1e12 / peak_tflops}
        out[name] = {"flops_per_image": flops, "batch": args.eval_batch, **rows}
        del held
    return out


def _trainer(task: Any, n: int, batch: int, augment: str, device: torch.device) -> Any:
    from torch.utils.data import Dataset

    from backmix_vlm.augment import build_mixer
    from backmix_vlm.config import BackMixConfig, OptimConfig, RunConfig
    from backmix_vlm.engine.trainer import Trainer

    class Sized(Dataset):
        def __len__(self) -> int:
            return n

        def __getitem__(self, i: int) -> Any:  # pragma: no cover - steps are fed directly
            raise IndexError(i)

    return Trainer(task, Sized(), optim=OptimConfig(lr=0.002, batch_size=batch, epochs=1),
                   run=RunConfig(device=str(device), precision="bf16", seed=0), run_dir=tempfile.mkdtemp(),
                   num_classes=len(CLASSES), mixer=build_mixer(augment), backmix=BackMixConfig())


def _adapter_setups(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """method name -> (factory(start_layer) -> AdapterTask, image size), or a skip message."""
    if not has("accelerate"):
        msg = "accelerate is not installed (pip install accelerate): the Trainer cannot run, training steps skipped"
        return {"coop": msg, "vpt (timm)": msg}
    from backmix_vlm.adapters import create_adapter
    from backmix_vlm.engine.adapter_task import AdapterTask, SaliencyConfig
    from backmix_vlm.models.frozen import hold_frozen_in

    setups: dict[str, Any] = {}
    try:
        bundle = clip_bundle(args, device)
        hold_frozen_in(bundle.model, BF16)
        size = int(bundle.image_size)

        def coop(start: int, bundle: Any = bundle, size: int = size) -> Any:
            adapter = create_adapter("coop", bundle, CLASSES).to(device)
            return AdapterTask(adapter, size, SaliencyConfig(start_layer=start), "bf16")

        setups["coop"] = (coop, size)
    except Skip as e:
        setups["coop"] = str(e)
    vit = timm_vit(args, device)
    hold_frozen_in(vit, BF16)
    vsize = int(vit.patch_embed.img_size[0])

    def vpt(start: int, vit: Any = vit, size: int = vsize) -> Any:
        adapter = create_adapter("vpt", vit, CLASSES, {"num_tokens": 5}).to(device)
        return AdapterTask(adapter, size, SaliencyConfig(start_layer=start), "bf16")

    setups["vpt (timm)"] = (vpt, vsize)
    return setups


def section_steps(args: argparse.Namespace, device: torch.device, timer: Timer) -> dict[str, Any]:
    out: dict[str, Any] = {}
    b = args.batch
    for method, setup in _adapter_setups(args, device).items():
        if isinstance(setup, str):
            out[method] = {"skipped": setup}
            continue
        factory, size = setup
        images = torch.randn(2 * b, 3, size, size, device=device)
        labels = torch.randint(0, len(CLASSES), (2 * b,), device=device)
        idx = torch.arange(2 * b, device=device)
        rows = {}
        for name, augment, n in (("plain (2B images)", "none", 2 * b), ("backmix (B + B mixed)", "backmix", b)):
            trainer = _trainer(factory(-1), 2 * b, b, augment, device)
            times = timer(lambda: trainer.train_step(images[:n], labels[:n], idx[:n]), reps=args.reps, warmup=2)
            med = statistics.median(times)
            rows[name] = {"median_s": med, "images_per_s": 2 * b / med}
        rows["backmix / plain"] = rows["backmix (B + B mixed)"]["median_s"] / rows["plain (2B images)"]["median_s"]
        out[method] = {"batch": b, **rows}
    return out


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Any:
    """Peak allocated bytes above the allocation at entry (CUDA); None on the CPU."""
    box: dict[str, float | None] = {"peak_mib": None, "base_mib": None}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        box["base_mib"] = base / 2 ** 20
    yield box
    if device.type == "cuda":
        torch.cuda.synchronize()
        box["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def section_memory(args: argparse.Namespace, device: torch.device, timer: Timer) -> dict[str, Any]:
    from backmix_vlm.models.frozen import hold_frozen_in
    from backmix_vlm.saliency.attention import AttentionRelevance

    out: dict[str, Any] = {}
    vit = timm_vit(args, device)
    head = torch.nn.Linear(vit.num_features, len(CLASSES)).to(device)
    hold_frozen_in(vit, BF16)
    size = int(vit.patch_embed.img_size[0])
    b = args.memory_batch
    images = torch.randn(b, 3, size, size, device=device)
    labels = torch.randint(0, len(CLASSES), (b,), device=device)
    for start in (-1, 0):
        ext = AttentionRelevance(vit, start_layer=start)
        with peak_memory(device) as mem, torch.autocast(device.type, dtype=BF16):
            t = timer(lambda: ext(images, labels, lambda x: head(vit(x))), reps=1, warmup=0)[0]
        out[f"relevance pass, timm ViT-B/16, batch {b}, start_layer {start}"] = {**mem, "s": t}
    for method, setup in _adapter_setups(args, device).items():
        if isinstance(setup, str):
            out[f"{method} BackMix step"] = {"skipped": setup}
            continue
        factory, size = setup
        x = torch.randn(b, 3, size, size, device=device)
        idx = torch.arange(b, device=device)
        for start in (-1, 0):
            trainer = _trainer(factory(start), b, b, "backmix", device)
            trainer.train_step(x[:2], labels[:2], idx[:2])  # lazy set-up outside the measurement
            with peak_memory(device) as mem:
                t = timer(lambda: trainer.train_step(x, labels, idx), reps=1, warmup=0)[0]
            out[f"{method} BackMix step, batch {b} (+ {b} mixed), start_layer {start}"] = {**mem, "s": t}
            del trainer
    return out


# ----------------------------------------------------------------------------- report
def markdown(report: dict[str, Any]) -> str:
    info = report["machine"]
    lines = [f"# bench_speed_gpu {'(SMOKE: CPU, tiny models, numbers mean nothing)' if report['smoke'] else ''}", "",
             f"Device: {info['device']}; torch {info['torch']}; open_clip {info['open_clip']}; timm {info['timm']}; "
             f"accelerate {info['accelerate']}; {info['date']}; wall {report.get('wall_s', 0):.0f} s.", ""]
    if "matmul" in report:
        mm = report["matmul"]
        lines.append(f"bf16 matmul {mm['n']}³: **{mm['tflops']:.1f} TFLOP/s** (best of {report['reps_matmul']}).")
        lines.append("")
    for section in ("eval", "steps", "memory"):
        body = report.get(section)
        if body is None:
            continue
        lines += [f"## {section}", ""]
        if "error" in body:
            lines += [f"error: {body['error']}", ""]
            continue
        for name, row in body.items():
            if isinstance(row, dict) and "skipped" in row:
                lines.append(f"- {name}: skipped — {row['skipped']}")
            else:
                lines.append(f"- {name}: {json.dumps(row, default=str)}")
        lines.append("")
    return "\n".join(lines)


def version(module: str) -> str:
    if not has(module):
        return "not installed"
    try:
        return str(getattr(importlib.import_module(module), "__version__", "?"))
    except Exception as e:  # noqa: BLE001
        return f"import fails ({type(e).__name__})"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny models, small batches: checks the script in seconds")
    p.add_argument("--sections", nargs="+", default=["matmul", "eval", "steps", "memory"])
    p.add_argument("--eval-batch", type=int, default=None, help="default 256 (smoke: 4)")
    p.add_argument("--batch", type=int, default=None, help="training-step batch B, default 64 (smoke: 2)")
    p.add_argument("--memory-batch", type=int, default=None, help="default 64 (smoke: 2)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions, default 10 (smoke: 1)")
    p.add_argument("--out", type=Path, default=None, help="folder for bench_speed_gpu.json / .md")
    p.add_argument("--without", nargs="*", default=[], help="treat these packages as not installed (e.g. open_clip)")
    args = p.parse_args(argv)
    WITHOUT.clear()
    WITHOUT.update(args.without)
    smoke = args.smoke
    args.eval_batch = args.eval_batch or (4 if smoke else 256)
    args.batch = args.batch or (2 if smoke else 64)
    args.memory_batch = args.memory_batch or (2 if smoke else 64)
    args.reps = args.reps or (1 if smoke else 10)
    if smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        raise SystemExit("no CUDA GPU visible; run with --smoke for the CPU check")
    timer = Timer(device)
    wall = time.perf_counter()
    report: dict[str, Any] = {
        "smoke": smoke, "argv": sys.argv if argv is None else argv, "reps_matmul": 10,
        "machine": {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
                    "torch": torch.__version__, "open_clip": version("open_clip"), "timm": version("timm"),
                    "accelerate": version("accelerate"), "python": platform.python_version(),
                    "date": dt.datetime.now().isoformat(timespec="minutes")}}
    for note in (["open_clip is not installed (pip install open_clip_torch): the CLIP ViT-B/16 encoding, CoOp steps and "
                  "CoOp memory are skipped; the timm ViT-B/16 parts still run"] if not has("open_clip") else []):
        print(f"NOTE: {note}", file=sys.stderr, flush=True)
    peak = None
    sections: dict[str, Callable[[], Any]] = {
        "matmul": lambda: matmul_rate(device, 512 if smoke else 8192, report["reps_matmul"], timer),
        "eval": lambda: section_eval(args, device, timer, peak or 1.0),
        "steps": lambda: section_steps(args, device, timer),
        "memory": lambda: section_memory(args, device, timer),
    }
    for name in args.sections:
        start = time.perf_counter()
        try:
            report[name] = sections[name]()
        except Exception as e:  # noqa: BLE001 - one failing section must not lose the others
            report[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=4)}
        if name == "matmul" and "tflops" in report[name]:
            peak = report[name]["tflops"]
        print(f"[{name}] {time.perf_counter() - start:.1f} s: {json.dumps(report[name], default=str)[:400]}",
              file=sys.stderr, flush=True)
    report["wall_s"] = time.perf_counter() - wall
    md = markdown(report)
    print(md)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_speed_gpu.json").write_text(json.dumps(report, indent=2, default=str))
        (args.out / "bench_speed_gpu.md").write_text(md + "\n")
    return report


if __name__ == "__main__":
    main()
