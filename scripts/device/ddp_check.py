#!/usr/bin/env python
"""One 2-process check on 2 GPUs (NCCL): ``train`` and ``fewshot`` started by ``torchrun`` vs 1 process.

Skipped, with a message and exit code 0, on a machine with fewer than 2 GPUs.  ``--smoke`` runs the
same checks on 2 CPU processes (gloo) to test the script.  Generated images only (no data, no
weights, no open_clip: the few-shot check is VPT over a tiny random timm ViT); a minute or two.

1. ``train``: small CNN + BackMix, 23 images (the sampler pads one), 2 epochs.  Banks and weights
   identical on both processes, every bank row updated once per epoch, rank 1 writes nothing.
   (BatchNorm and per-process random streams make the values differ from 1 process.)
2. ``fewshot``: VPT, no BackMix, no random views: trainable weights and metrics of 2 processes vs
   1 process, whose difference is only the float summation order (tolerance ``--tol``).

Every process of the 2-process runs goes through ``tests/ddp_probe.py`` (which process writes
which file, each process's bank / weights).  Prints one line per check and writes
``ddp_check.json`` into ``--out``:

    python scripts/device/ddp_check.py --out $OUT          # on a machine with 2 GPUs
    python scripts/device/ddp_check.py --smoke --out /tmp/ddp_check
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROBE = ROOT / "tests" / "ddp_probe.py"
FEWSHOT = ROOT / "configs" / "fewshot" / "tiny_demo.yaml"
VPT = ["method.name=vpt", "method.options={num_tokens: 2}", "backbone.family=timm", "backbone.name=vit_tiny_patch16_224",
       "backbone.pretrained=null", "backbone.image_size=32", "backbone.options={patch_size: 8, depth: 2}",
       "eval.scores=[msp,energy]", "backmix.enabled=false", "data.views.name=none", "data.shots=2",
       "data.seeds=[1]", "optim.epochs=2", "optim.batch_size=10", "optim.warmup_epochs=0",
       "eval.ood=[{name: demo, split: ood-cifar100, label: c100, max_samples: 30}]", "data.test.max_samples=30",
       "eval.batch_size=30"]


def image_folder(root: Path, per_class: int = 8, size: int = 16) -> Path:
    """<root>/{train,test}/<class>/*.png (a coloured square per class) and <root>/ood/noise/*.png."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", per_class // 2)):
        for ch, name in enumerate(("red", "green", "blue")):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                x = rng.integers(0, 100, (size, size, 3), dtype=np.uint8)
                x[4:12, 4:12, ch] = 255
                Image.fromarray(x).save(root / split / name / f"{i:03d}.png")
    (root / "ood" / "noise").mkdir(parents=True, exist_ok=True)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / "ood" / "noise" / f"{i}.png")
    return root


def train_config(out: Path, data: Path) -> Path:
    src = {"name": "imagefolder", "root": str(data)}
    cfg = {"run": {"output_dir": str(out / "runs")},
           "data": {"train": {**src, "split": "train", "max_samples": 23}, "test": {**src, "split": "test"},
                    "image_size": 16, "num_workers": 0, "mean": [0.5] * 3, "std": [0.25] * 3},
           "model": {"name": "small_cnn", "options": {"width": 4}},
           "optim": {"epochs": 2, "batch_size": 8, "lr": 0.05},
           "eval": {"ood": [{**src, "split": "ood", "label": "noise"}], "scores": ["msp"], "num_workers": 0},
           "plots": False}
    path = out / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(argv: list[str], out: Path, *, processes: int, probe: str) -> float:
    """One job, 1 process (plain CLI) or ``processes`` under torchrun + the probe; returns the wall time."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "PROBE_DIR": str(out / probe), "PROBE_WATCH": str(out / "runs"), "OMP_NUM_THREADS": "1"}
    if processes == 1:
        cmd = [sys.executable, "-m", "backmix_vlm.cli", *argv]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={processes}",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", str(PROBE), *argv]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"ddp_check: FAILED: {' '.join(cmd)}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return time.perf_counter() - start


def per_process(out: Path, probe: str, run_name: str) -> list[dict]:
    return [torch.load(out / probe / f"state{r}_{run_name}.pt", weights_only=False) for r in range(2)]


def wrote(out: Path, probe: str, rank: int) -> list[str]:
    return sorted({p for _, p in json.loads((out / probe / f"writes{rank}.json").read_text()) if not p.endswith(".tmp")})


def numbers(path: Path) -> dict[str, float]:
    flat: dict[str, float] = {}

    def walk(node, key):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{key}/{k}")
        elif isinstance(node, (int, float)) and not isinstance(node, bool) and "time" not in key:
            flat[key] = float(node)
    walk(json.loads(path.read_text()), "")
    return {k: v for k, v in flat.items() if not k.endswith("/processes")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="2 CPU processes (gloo): checks the script")
    ap.add_argument("--out", default="runs/ddp_check")
    ap.add_argument("--tol", type=float, default=None, help="weights / metrics, 2 vs 1 process (default: "
                    "1e-6 on CPU, 1e-4 on GPU, where GEMM kernels may change with the batch size)")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count()
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
                    "gpus": gpus, "device": torch.cuda.get_device_name(0) if gpus else "cpu", "smoke": args.smoke}
    if not args.smoke and gpus < 2:
        report["skipped"] = f"the 2-process check needs 2 GPUs; this machine has {gpus}"
        print(f"ddp_check: skipped: {report['skipped']}")
        (out / "ddp_check.json").write_text(json.dumps(report, indent=2) + "\n")
        return 0
    device = "cpu" if args.smoke else "cuda"
    tol = args.tol if args.tol is not None else (1e-6 if device == "cpu" else 1e-4)
    failures = []

    # 1. train: invariants of the 2-process run, its files against the 1-process run's
    cfg = train_config(out, image_folder(out / "data"))
    base = ["train", str(cfg), f"run.device={device}"]
    t1 = run([*base, "run.name=train-1"], out, processes=1, probe="train-1")
    t2 = run([*base, "run.name=train-2"], out, processes=2, probe="train-2")
    a, b = per_process(out, "train-2", "train-2")
    same = torch.equal(a["bank"], b["bank"]) and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    once = a["updates"] == [[1] * 23] * 2
    rank1 = wrote(out, "train-2", 1)
    files = {p.relative_to(out / "runs" / "train-2").as_posix() for p in (out / "runs" / "train-2").rglob("*") if p.is_file()}
    files1 = {p.relative_to(out / "runs" / "train-1").as_posix() for p in (out / "runs" / "train-1").rglob("*") if p.is_file()}
    report["train"] = {"wall_s": {"1": round(t1, 1), "2": round(t2, 1)}, "bank_and_weights_equal_on_both": same,
                       "each_row_once_per_epoch": once, "rank1_wrote": rank1, "same_files_as_1_process": files == files1}
    ok = same and once and not rank1 and files == files1
    failures += [] if ok else ["train"]
    print(f"ddp_check: train 2 processes on {device}: banks/weights equal {same}, one bank update per image and "
          f"epoch {once}, rank 1 wrote {rank1 or 'nothing'}, files as 1 process {files == files1}; "
          f"wall {t1:.0f} s (1) / {t2:.0f} s (2)  {'OK' if ok else 'FAILED'}")

    # 2. fewshot VPT without per-process randomness: 2 processes = 1 process up to summation order
    base = ["fewshot", str(FEWSHOT), f"run.output_dir={out / 'runs'}", f"run.device={device}", *VPT]
    t1 = run([*base, "run.name=fewshot-1"], out, processes=1, probe="fewshot-1")
    t2 = run([*base, "run.name=fewshot-2"], out, processes=2, probe="fewshot-2")
    ref = torch.load(out / "runs" / "fewshot-1" / "seed1" / "last.pt", weights_only=False, map_location="cpu")["model"]
    a, b = per_process(out, "fewshot-2", "seed1")
    weights = max(float((a["model"][k].float() - ref[k].float()).abs().max()) for k in ref)
    equal = all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    m1, m2 = (numbers(out / "runs" / r / "results.json") for r in ("fewshot-1", "fewshot-2"))
    metrics = max(abs(m1[k] - m2[k]) for k in m1) if m1.keys() == m2.keys() else float("inf")
    rank1 = wrote(out, "fewshot-2", 1)
    report["fewshot"] = {"wall_s": {"1": round(t1, 1), "2": round(t2, 1)}, "weights_max_abs_diff": weights,
                         "metrics_max_abs_diff": metrics, "tolerance": tol, "weights_equal_on_both": equal,
                         "rank1_wrote": rank1}
    ok = weights <= tol and metrics <= tol and equal and not rank1
    failures += [] if ok else ["fewshot"]
    print(f"ddp_check: fewshot VPT 2 processes vs 1 on {device}: weights differ by {weights:.2e}, metrics by "
          f"{metrics:.2e} (tolerance {tol:g}), equal on both processes {equal}, rank 1 wrote {rank1 or 'nothing'}; "
          f"wall {t1:.0f} s (1) / {t2:.0f} s (2)  {'OK' if ok else 'FAILED'}")

    report["failed"] = failures
    (out / "ddp_check.json").write_text(json.dumps(report, indent=2) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
