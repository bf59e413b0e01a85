"""report.tables: Markdown content, atomic results files, seed aggregation, the paper's Table V."""
from __future__ import annotations

import json

import pytest

from backmix_vlm.report.tables import aggregate_seeds, paper_table_v, results_to_markdown, write_results


def result(acc: float, auroc: float, f1: float | None = 0.5) -> dict:
    metrics = {"auroc": auroc, "aupr_in": 0.9, "aupr_out": 0.8, "fpr95": 0.25, "tnr95": 0.75,
               "dtacc": 0.85, "acc": acc, "oscr": 0.7}
    if f1 is not None:
        metrics["macro_f1"] = f1
    return {"acc": acc, "positive": "known", "counts": {"known": 100, "CIFAR100": 50},
            "results": {"CIFAR100": {"msp": dict(metrics), "energy": dict(metrics, auroc=auroc / 2)}}}


def test_markdown_content():
    md = results_to_markdown(result(0.93214, 0.916, f1=None), title="CIFAR-10 vs CIFAR-100")
    lines = md.splitlines()
    assert lines[0] == "# CIFAR-10 vs CIFAR-100"
    assert lines[2] == "**ID accuracy**: 93.21%"
    assert "## CIFAR100 (unknown, n = 50)" in lines
    header = "| Score | AUROC | AUPR-In | AUPR-Out | FPR95 ↓ | DTACC | OSCR | Macro-F1 |"
    assert header in lines
    assert "| msp | 91.60 | 90.00 | 80.00 | 25.00 | 85.00 | 70.00 | – |" in lines
    assert "| energy | 45.80 | 90.00 | 80.00 | 25.00 | 85.00 | 70.00 | – |" in lines
    assert md.index("ID accuracy") < md.index("## CIFAR100")
    # a metric subset
    md2 = results_to_markdown(result(0.9, 0.5), metrics=("auroc", "tnr95"))
    assert "| Score | AUROC | TNR95 |" in md2 and "| msp | 50.00 | 75.00 |" in md2


def test_write_results(tmp_path):
    res = result(0.9, 0.8)
    md_path, json_path = write_results(tmp_path / "run", res, "title")
    assert md_path.read_text() == results_to_markdown(res, title="title")
    assert json.loads(json_path.read_text()) == res
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["results.json", "results.md"]


def test_aggregate_seeds_exact_mean_std():
    agg = aggregate_seeds([result(0.5, 0.6, f1=0.2), result(0.7, 0.8, f1=0.4), result(0.6, 1.0, f1=0.6)])
    assert agg["num_seeds"] == 3 and agg["positive"] == "known"
    assert agg["acc"]["mean"] == pytest.approx(0.6)
    assert agg["acc"]["std"] == pytest.approx((0.02 / 3) ** 0.5)  # population std of .5 .7 .6
    msp = agg["results"]["CIFAR100"]["msp"]
    assert msp["auroc"]["mean"] == pytest.approx(0.8) and msp["auroc"]["std"] == pytest.approx((0.08 / 3) ** 0.5)
    assert msp["fpr95"] == {"mean": 0.25, "std": 0.0, "n": 3}
    assert agg["counts"]["CIFAR100"]["mean"] == 50
    md = results_to_markdown(aggregate_seeds([result(0.5, 0.6), result(0.7, 0.8)]))
    assert "**ID accuracy**: 60.00 ± 10.00% (mean ± std over 2 seeds; std is the population std, ddof=0)" in md
    assert "| msp | 70.00 ± 10.00 | 90.00 ± 0.00 |" in md


def test_aggregate_rejects_mismatched_seeds():
    other = result(0.5, 0.6)
    other["results"]["SVHN"] = other["results"].pop("CIFAR100")
    with pytest.raises(ValueError, match="results differ at 'results'"):
        aggregate_seeds([result(0.5, 0.6), other])
    with pytest.raises(ValueError, match="no results"):
        aggregate_seeds([])


def test_paper_table_v():
    def res(acc, auroc, oscr, f1):
        m = {"auroc": auroc, "oscr": oscr, "macro_f1": f1}
        return {"acc": acc, "results": {"CIFAR100": {"mcm": m}, "SVHN": {"mcm": dict(m, auroc=auroc + 0.05)}}}

    rows = [
        {"setting": "1-shot", "method": "CoOp", "results": res(0.898, 0.916, 0.85, 0.744)},
        {"setting": "1-shot", "method": "+ BackMix", "results": aggregate_seeds([res(0.902, 0.92, 0.86, 0.75),
                                                                                 res(0.912, 0.922, 0.856, 0.758)])},
        {"setting": "4-shot", "method": "CoOp", "results": res(0.906, 0.915, 0.853, 0.744)},
    ]
    md = paper_table_v(rows)
    lines = md.splitlines()
    assert lines[0] == ("| Setting | Method | Accuracy | CIFAR100 AUROC | CIFAR100 OSCR | CIFAR100 Macro-F1 "
                        "| SVHN AUROC | SVHN OSCR | SVHN Macro-F1 |")
    assert lines[2] == "| 1-shot | CoOp | 89.8 | 91.6 | 85.0 | 74.4 | 96.6 | 85.0 | 74.4 |"
    assert lines[3] == ("|  | + BackMix | 90.7 (+0.9) | 92.1 (+0.5) | 85.8 (+0.8) | 75.4 (+1.0) "
                        "| 97.1 (+0.5) | 85.8 (+0.8) | 75.4 (+1.0) |")
    assert lines[4].startswith("| 4-shot | CoOp | 90.6 |")
    with pytest.raises(ValueError, match="score 'msp' not in results for 'CIFAR100'; available: mcm"):
        paper_table_v(rows, score="msp")
