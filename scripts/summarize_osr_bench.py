#!/usr/bin/env python
"""Table for docs/benchmarks.md from CIFAR-10 open-set benchmark runs (Plain vs + BackMix).

    python scripts/summarize_osr_bench.py runs/cifar10_osr_cpu/seed0 runs/cifar10_osr_cpu/seed1 --score msp

Each argument is a run directory written by ``backmix-vlm train configs/cnn/cifar10_osr_cpu_bench.yaml``
(with ``plain/`` and ``backmix/`` sub-runs).  Prints Markdown: per seed and, with several seeds,
mean ± std; accuracy, then AUROC / OSCR / macro-F1 per unknown set, in percent.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

METRICS = ("auroc", "oscr", "macro_f1")
NAMES = {"auroc": "AUROC", "oscr": "OSCR", "macro_f1": "Macro-F1"}


def load(run: Path, variant: str) -> dict:
    return json.loads((run / variant / "results.json").read_text())


def row(values: list[float]) -> str:
    a = 100 * np.asarray(values)
    return f"{a.mean():.2f}" if len(a) == 1 else f"{a.mean():.2f} ± {a.std():.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--score", default="msp")
    p.add_argument("--variants", nargs="+", default=["plain", "backmix"])
    args = p.parse_args()
    res = {v: [load(r, v) for r in args.runs] for v in args.variants}
    sets = list(res[args.variants[0]][0]["results"])
    head = "| Variant | Acc. | " + " | ".join(f"{s} {NAMES[m]}" for s in sets for m in METRICS) + " |"
    lines = [f"Score: **{args.score}**; {len(args.runs)} seed(s)"
             + (" (mean ± std)" if len(args.runs) > 1 else "") + "; values in %.", "", head,
             "|" + "---|" * (2 + len(sets) * len(METRICS))]
    for v in args.variants:
        cells = [row([r["acc"] for r in res[v]])]
        cells += [row([r["results"][s][args.score][m] for r in res[v]]) for s in sets for m in METRICS]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
