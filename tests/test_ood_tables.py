"""report.tables: Markdown content, atomic results files, seed aggregation, the paper's Table V."""
from __future__ import annotations

import json

import pytest

from backmix_vlm.config import EvalConfig
from backmix_vlm.errors import ConfigError
from backmix_vlm.ood.metrics import METRIC_KEYS
from backmix_vlm.report.tables import (HEADERS, aggregate_seeds, columns, ood_summary_table, paper_table_v,
                                       results_to_markdown, write_results)


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
    header = "| Score | AUROC | AUPR-In (step) | AUPR-Out (step) | FPR95 (ID+) ↓ | DTACC | OSCR | Macro-F1 |"
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


# ----------------------------------------------------------------------------- conventions shown
def both_conventions(positive: str = "known") -> dict:
    m = {"auroc": 0.9, "aupr_in": 0.81, "aupr_out": 0.71, "aupr_in_trapezoid": 0.82, "aupr_out_trapezoid": 0.72,
         "fpr95_id_positive": 0.3, "fpr95_ood_positive": 0.4, "tnr95": 0.7, "dtacc": 0.85, "aurc": 0.05}
    m["fpr95"] = m["fpr95_id_positive"] if positive == "known" else m["fpr95_ood_positive"]
    return {"acc": 0.9, "positive": positive, "counts": {"known": 10, "U": 5}, "results": {"U": {"msp": m}}}


def test_table_settings_choose_the_columns():
    res = both_conventions()
    default = EvalConfig().table()
    assert default == {"fpr95": "id_positive", "aupr": "step",
                       "metrics": ["auroc", "aupr_in", "aupr_out", "fpr95", "dtacc", "oscr", "macro_f1"]}
    md = results_to_markdown({**res, "table": default})
    assert "| Score | AUROC | AUPR-In (step) | AUPR-Out (step) | FPR95 (ID+) ↓ | DTACC | OSCR | Macro-F1 |" in md
    assert "| msp | 90.00 | 81.00 | 71.00 | 30.00 | 85.00 | – | – |" in md
    assert md == results_to_markdown(res)  # results without a "table" entry: the same defaults

    openood = EvalConfig(positive="unknown", table_aupr="trapezoid").table()
    assert openood["fpr95"] == "ood_positive"  # auto follows eval.positive
    md = results_to_markdown({**both_conventions("unknown"), "table": openood})
    assert "| Score | AUROC | AUPR-In (trapz) | AUPR-Out (trapz) | FPR95 (OOD+) ↓ | DTACC | OSCR | Macro-F1 |" in md
    assert "| msp | 90.00 | 82.00 | 72.00 | 40.00 | 85.00 | – | – |" in md
    assert "unknowns positive; OpenOOD" in md and "trapezoid rule" in md and "average precision" not in md

    both = EvalConfig(table_fpr95="both", table_aupr="both", table_metrics=["fpr95", "aupr_in", "aurc"]).table()
    assert columns({**res, "table": both}) == ["fpr95_id_positive", "fpr95_ood_positive", "aupr_in",
                                               "aupr_in_trapezoid", "aurc"]
    md = results_to_markdown({**res, "table": both})
    assert "| Score | FPR95 (ID+) ↓ | FPR95 (OOD+) ↓ | AUPR-In (step) | AUPR-In (trapz) | AURC ↓ |" in md
    assert "| msp | 30.00 | 40.00 | 81.00 | 82.00 | 5.00 |" in md
    summary = ood_summary_table({**res, "table": both})
    assert summary.splitlines()[0] == ("| Score | U FPR95 (ID+) ↓ | U FPR95 (OOD+) ↓ | U AUROC | Average FPR95 (ID+) ↓ "
                                       "| Average FPR95 (OOD+) ↓ | Average AUROC |")
    # the settings survive seed aggregation (strings and string lists must agree)
    agg = aggregate_seeds([{**res, "table": both}, {**res, "table": both}])
    assert agg["table"] == both and "| msp | 30.00 ± 0.00 | 40.00 ± 0.00 |" in results_to_markdown(agg)


def test_old_results_read_their_fpr95_in_its_convention():
    old = both_conventions("unknown")
    for key in ("fpr95_id_positive", "fpr95_ood_positive", "aupr_in_trapezoid", "aupr_out_trapezoid"):
        del old["results"]["U"]["msp"][key]
    md = results_to_markdown(old)
    assert "| Score | AUROC | AUPR-In (step) | AUPR-Out (step) | FPR95 (OOD+) ↓ |" in md
    assert "| msp | 90.00 | 81.00 | 71.00 | 40.00 |" in md
    # the other convention was never computed: shown as missing, not as the stored one
    md = results_to_markdown({**old, "table": EvalConfig(table_fpr95="both", table_aupr="both").table()})
    assert "| msp | 90.00 | 81.00 | – | 71.00 | – | 40.00 | 40.00 |" not in md
    assert "| msp | 90.00 | 81.00 | – | 71.00 | – | – | 40.00 |" in md


@pytest.mark.parametrize("key,value,accepted", [
    ("table_fpr95", "openood", "auto, id_positive, ood_positive, both"),
    ("table_aupr", "trapz", "step, trapezoid, both"),
    ("table_metrics", ["auroc", "fpr"], "auroc, aupr_in"),
    ("table_metrics", "auroc", "auroc, aupr_in"),
])
def test_table_settings_are_validated(key, value, accepted):
    with pytest.raises(ConfigError, match=f"eval.{key}: .*{value if isinstance(value, str) else 'fpr'}.* {accepted}"):
        EvalConfig(**{key: value}).validate()


def test_every_metric_has_a_column_title():
    assert set(HEADERS) == set(METRIC_KEYS)
