#!/usr/bin/env python
"""The OOD literature's table (FPR95 / AUROC per OOD set and their average) from results.json files.

Works for every job's results.json (zeroshot, ood, train, fewshot: seed aggregates show the
means), e.g. for the ImageNet-1k protocol runs:

    python scripts/ood_summary.py runs/imagenet/16shot_locoop/results.json [--score mcm] [--metrics fpr95 auroc]
"""
from __future__ import annotations

import argparse

from backmix_vlm.report.tables import load_results, ood_summary_table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="results.json files")
    p.add_argument("--score", default=None, help="keep only this score's row")
    p.add_argument("--metrics", nargs="+", default=["fpr95", "auroc"])
    args = p.parse_args()
    for path in args.results:
        res = load_results(path)
        if args.score:
            res = {**res, "results": {o: {k: v for k, v in per.items() if k == args.score}
                                      for o, per in res["results"].items()}}
        print(f"## {path}\n\n{ood_summary_table(res, metrics=args.metrics)}")


if __name__ == "__main__":
    main()
