"""The names of every metric a result carries and the tables' convention settings.

A foundation module (no package imports above ``validation``): ``ood.metrics`` computes these keys,
``report.tables`` titles them and ``config.EvalConfig`` validates ``eval.table_*`` against them, so
each name is written once.  docs/methods.md explains the conventions.
"""
from __future__ import annotations

from typing import Any, Sequence

from .errors import ConfigError
from .validation import check_choice, join

CCR_FPR_LEVELS = (1e-4, 1e-3, 1e-2, 1e-1)  # OpenOOD's CCR@FPR levels


def ccr_key(level: float) -> str:
    """The results key of CCR at FPR ``level``: ``ccr_fpr_1e-04`` ... ``ccr_fpr_1e-01``."""
    return f"ccr_fpr_{level:.0e}"


# Every key ood_metrics can return (the tables' accepted column names).
DETECTION_KEYS = ("auroc", "aupr_in", "aupr_out", "fpr95", "tnr95", "dtacc", "fpr95_id_positive",
                  "fpr95_ood_positive", "aupr_in_trapezoid", "aupr_out_trapezoid")
CLASSIFICATION_KEYS = ("acc", "oscr", *(ccr_key(a) for a in CCR_FPR_LEVELS), "aurc", "eaurc", "macro_f1")
METRIC_KEYS = DETECTION_KEYS + CLASSIFICATION_KEYS

DEFAULT_TABLE_METRICS = ("auroc", "aupr_in", "aupr_out", "fpr95", "dtacc", "oscr", "macro_f1")
# What the tables show for the convention-dependent columns (results.json always has every one):
# ``fpr95`` and ``aupr_in`` / ``aupr_out`` in a column list expand to these keys.
TABLE_FPR95 = {"id_positive": ("fpr95_id_positive",), "ood_positive": ("fpr95_ood_positive",),
               "both": ("fpr95_id_positive", "fpr95_ood_positive")}
TABLE_AUPR = {"step": ("",), "trapezoid": ("_trapezoid",), "both": ("", "_trapezoid")}
TABLE_FPR95_CHOICES = ("auto", *TABLE_FPR95)   # auto: the convention of eval.positive


def check_table_settings(fpr95: str, aupr: str, metrics: Sequence[str], where: str = "eval") -> None:
    """Validate the table settings ``<where>.table_fpr95``, ``.table_aupr``, ``.table_metrics``."""
    check_choice(fpr95, TABLE_FPR95_CHOICES, join(where, "table_fpr95"))
    check_choice(aupr, tuple(TABLE_AUPR), join(where, "table_aupr"))
    if isinstance(metrics, str) or not metrics:
        raise ConfigError(f"{join(where, 'table_metrics')}: {metrics!r} is not accepted; give a non-empty list "
                          f"of {', '.join(METRIC_KEYS)}")
    for m in metrics:
        check_choice(m, METRIC_KEYS, join(where, "table_metrics"))


def table_settings(positive: str = "known", fpr95: str = "auto", aupr: str = "step",
                   metrics: Sequence[str] = DEFAULT_TABLE_METRICS) -> dict[str, Any]:
    """The ``"table"`` entry of a results dict: what its Markdown tables show (``auto`` resolved)."""
    if fpr95 == "auto":
        fpr95 = "id_positive" if positive == "known" else "ood_positive"
    return {"fpr95": fpr95, "aupr": aupr, "metrics": list(metrics)}
