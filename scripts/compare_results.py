#!/usr/bin/env python
"""Side-by-side Markdown table of several runs' results.json (Plain vs + BackMix, seeds).

    python scripts/compare_results.py --score msp \\
        plain=runs/cifar10_osr_cpu/seed0/plain/results.json,runs/cifar10_osr_cpu/seed1/plain/results.json \\
        backmix=runs/cifar10_osr_cpu/seed0/backmix/results.json,runs/cifar10_osr_cpu/seed1/backmix/results.json

Each argument is ``name=file[,file...]``: several files (seeds) are shown as mean ± std
(population std).  Columns: accuracy, then AUROC / OSCR / macro-F1 per unknown set, in percent;
``--metrics`` takes any results key, e.g. ``fpr95_id_positive fpr95_ood_positive aupr_in_trapezoid``
(results.json files written before both FPR95 conventions were stored give their ``fpr95`` for
the convention their ``positive`` names).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import sys

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backmix_vlm.report.tables import header, metric_value  # noqa: E402


def cell(values: list[float]) -> str:
    a = 100 * np.asarray(values, dtype=float)
    return f"{a.mean():.2f}" if len(a) == 1 else f"{a.mean():.2f} ± {a.std():.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="name=results.json[,results.json...]")
    p.add_argument("--score", default="msp")
    p.add_argument("--metrics", nargs="+", default=["auroc", "oscr", "macro_f1"])
    args = p.parse_args()
    runs, files_of = {}, {}
    for item in args.runs:
        name, files = item.split("=", 1)
        files_of[name] = files.split(",")
        runs[name] = [json.loads(Path(f).read_text()) for f in files_of[name]]
    first = next(iter(runs.values()))[0]
    sets = list(first["results"])
    n = {len(v) for v in runs.values()}
    positive = first.get("positive", "known")

    def value(name: str, i: int, s: str, m: str) -> float:
        r = runs[name][i]
        v = metric_value(r["results"][s][args.score], m, r.get("positive", "known"))
        if v is None:
            raise SystemExit(f"{files_of[name][i]}: no '{m}' for {s} / {args.score} (written before that metric)")
        return v

    lines = [f"Score: **{args.score}**; values in %" + ("; mean ± std over seeds" if max(n) > 1 else "") + ".", "",
             "| Run | Acc. | " + " | ".join(f"{s} {header(m, positive)}" for s in sets for m in args.metrics) + " |",
             "|" + "---|" * (2 + len(sets) * len(args.metrics))]
    for name, results in runs.items():
        cells = [cell([r["acc"] for r in results])]
        cells += [cell([value(name, i, s, m) for i in range(len(results))]) for s in sets for m in args.metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
