#!/usr/bin/env python
"""Speed of the OOD scores on cached features (docs/benchmarks_ood.md).

1. KNN: exact k-th-neighbour search of ``--queries`` L2-normalised queries against ``--train``
   training features of ``--dim`` dimensions (default the issue's 10,000 x 50,000 x 384),
   blocked matrix products on ``--device``; exactness checked in float64 on 256 queries.
2. The full score table for one model: fit (on the training features) + scoring of the ID
   test set and one OOD set, per score, on features with the shape of a ViT-S/14 + linear
   head (D = 384, K = 10 by default), and the time of every metric of that (set, score)
   (``ood_metrics``: both FPR95 / AUPR conventions, OSCR, CCR@FPR, AURC, macro-F1).  The
   metric values of random features mean nothing and are not printed.

Scores read cached outputs, so these timings exclude the model's forward pass (done once
per dataset for all scores).  Random Gaussian features: the cost does not depend on values.

    python scripts/bench_ood_scores.py --threads 2           # CPU
    python scripts/bench_ood_scores.py --device cuda --threads 0
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from backmix_vlm.runtime import machine_line  # noqa: E402
from backmix_vlm.models.heads import LinearHead
from backmix_vlm.ood.evaluate import predictions
from backmix_vlm.ood.metrics import ood_metrics
from backmix_vlm.ood.scores import ScoreSetup, get_score, knn_distance

SCORES = ["msp", "maxlogit", "energy", "gen", "featnorm", "mahalanobis", "knn", "vim", "react",
          "ash_p", "ash_b", "ash_s"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_knn(args: argparse.Namespace, device: torch.device) -> None:
    g = torch.Generator().manual_seed(0)
    train = torch.nn.functional.normalize(torch.randn(args.train, args.dim, generator=g), dim=-1).to(device)
    queries = torch.nn.functional.normalize(torch.randn(args.queries, args.dim, generator=g), dim=-1).to(device)
    knn_distance(queries[:64], train, args.k)  # warm-up
    _sync(device)
    times, cpu = [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        d = knn_distance(queries, train, args.k)
        _sync(device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    exact = torch.cdist(queries[:256].double().cpu(), train.double().cpu()).sort(dim=1).values[:, args.k - 1]
    err = (d[:256].double().cpu() - exact).abs().max().item()
    print(f"KNN  {args.queries} queries x {args.train} train x {args.dim}-d, k={args.k}, {device}: "
          f"best {min(times):.2f} s, median {sorted(times)[len(times) // 2]:.2f} s over {args.repeats} runs "
          f"({args.queries / min(times):,.0f} queries/s); process CPU time best {min(cpu):.2f} s; "
          f"max |error| vs float64 = {err:.1e}")


def bench_table(args: argparse.Namespace, device: torch.device) -> None:
    g = torch.Generator().manual_seed(1)
    d, k = args.dim, args.classes
    head = LinearHead(torch.randn(k, d, generator=g) / d ** 0.5, torch.randn(k, generator=g))

    def outputs(n: int) -> dict[str, torch.Tensor]:
        f = torch.relu(torch.randn(n, d, generator=g)) * 3  # non-negative, as post-ReLU features
        return {"features": f, "logits": head(f), "labels": torch.randint(0, k, (n,), generator=g)}

    train, known, ood = outputs(args.table_train), outputs(args.table_test), outputs(args.table_test)
    print(f"\nScore table: fit on {args.table_train} x {d} train features, score {args.table_test} ID + "
          f"{args.table_test} OOD, K = {k}, {device} (KNN on {device}; others on CPU tensors)")
    print("| score | fit: wall / CPU (s) | score ID + OOD: wall / CPU (s) | metrics: wall (s) |\n|---|---:|---:|---:|")
    total, total_cpu, total_metrics = 0.0, 0.0, 0.0
    for name in SCORES:
        params = {"device": str(device)} if name == "knn" else {}
        s = get_score(name, **params)
        if set(s.uses) - {"train", "head"}:  # runs the model (odin) / the CLIP text encoder (neglabel)
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        s.setup(ScoreSetup(train=train, head=head))
        t1, c1 = time.perf_counter(), time.process_time()
        k_scores = s.postprocess(known)
        u_scores = s.postprocess(ood)
        _sync(device)
        t2, c2 = time.perf_counter(), time.process_time()
        ood_metrics(k_scores, u_scores, known_preds=predictions(known), known_labels=known["labels"],
                    unknown_preds=predictions(ood))
        t3 = time.perf_counter()
        total, total_cpu, total_metrics = total + t2 - t0, total_cpu + c2 - c0, total_metrics + t3 - t2
        print(f"| {name} | {t1 - t0:.2f} / {c1 - c0:.2f} | {t2 - t1:.2f} / {c2 - c1:.2f} | {t3 - t2:.3f} |")
    print(f"| **all {len(SCORES)}, fit + score** | | **{total:.1f} / {total_cpu:.1f}** | **{total_metrics:.2f}** |")
    print("(process CPU time sums all threads; wall time depends on what else runs on the machine)")


def main() -> None:
    print(machine_line(), flush=True)  # CPU model, kernel flags, native bf16 (each row names its precision)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave torch's default)")
    p.add_argument("--train", type=int, default=50_000)
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--table-train", type=int, default=50_000)
    p.add_argument("--table-test", type=int, default=10_000)
    p.add_argument("--skip-knn", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    if not args.skip_knn:
        bench_knn(args, device)
    bench_table(args, device)


if __name__ == "__main__":
    main()
