#!/usr/bin/env python
"""The OOD literature's table (FPR95 / AUROC per OOD set and their average) from results.json files.

Works for every job's results.json (zeroshot, ood, train, fewshot: seed aggregates show the
means), e.g. for the ImageNet-1k protocol runs:

    python scripts/ood_summary.py runs/imagenet/16shot_locoop/results.json [--score mcm] [--metrics fpr95 auroc]

``fpr95`` (and ``aupr_in`` / ``aupr_out``) show the conventions the run chose (``eval.table_fpr95``,
``eval.table_aupr``); ``--fpr95 ood_positive --aupr trapezoid`` shows OpenOOD's instead (results
written before both conventions were stored show "–" for the one they lack).
"""
from __future__ import annotations

import argparse

from backmix_vlm.report.tables import TABLE_AUPR, TABLE_FPR95, load_results, ood_summary_table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="results.json files")
    p.add_argument("--score", default=None, help="keep only this score's row")
    p.add_argument("--metrics", nargs="+", default=["fpr95", "auroc"])
    p.add_argument("--fpr95", choices=sorted(TABLE_FPR95), default=None, help="FPR95 convention(s) shown "
                   "(default: the run's eval.table_fpr95)")
    p.add_argument("--aupr", choices=sorted(TABLE_AUPR), default=None, help="AUPR convention(s) shown "
                   "(default: the run's eval.table_aupr)")
    args = p.parse_args()
    for path in args.results:
        res = load_results(path)
        shown = {k: v for k, v in (("fpr95", args.fpr95), ("aupr", args.aupr)) if v is not None}
        if shown:
            res = {**res, "table": {**(res.get("table") or {}), **shown}}
        if args.score:
            res = {**res, "results": {o: {k: v for k, v in per.items() if k == args.score}
                                      for o, per in res["results"].items()}}
        print(f"## {path}\n\n{ood_summary_table(res, metrics=args.metrics)}")


if __name__ == "__main__":
    main()
