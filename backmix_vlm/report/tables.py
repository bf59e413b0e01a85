"""Results -> Markdown / JSON tables (results.md, results.json) and the paper's Table V.

Input is ``evaluate_open_set``'s dict: ``{"acc", "counts", "results": {ood: {score:
metrics}}}`` with fractions; :func:`aggregate_seeds` turns several of them into the same
shape with ``{"mean", "std"}`` leaves, and every table function renders both kinds
(percentages, "mean ± std" for aggregates).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..atomic import atomic_write_text, write_json
from ..metric_keys import (TABLE_AUPR, TABLE_FPR95, TABLE_FPR95_CHOICES, check_table_settings,  # noqa: F401
                           table_settings)
from ..metric_keys import DEFAULT_TABLE_METRICS as DEFAULT_METRICS

HEADERS = {
    "auroc": "AUROC", "aupr_in": "AUPR-In (step)", "aupr_out": "AUPR-Out (step)",
    "aupr_in_trapezoid": "AUPR-In (trapz)", "aupr_out_trapezoid": "AUPR-Out (trapz)",
    "fpr95": "FPR95", "tnr95": "TNR95", "fpr95_id_positive": "FPR95 (ID+)", "fpr95_ood_positive": "FPR95 (OOD+)",
    "dtacc": "DTACC", "oscr": "OSCR", "macro_f1": "Macro-F1", "acc": "Accuracy",
    "ccr_fpr_1e-04": "CCR@FPR1e-4", "ccr_fpr_1e-03": "CCR@FPR1e-3", "ccr_fpr_1e-02": "CCR@FPR1e-2",
    "ccr_fpr_1e-01": "CCR@FPR1e-1", "aurc": "AURC", "eaurc": "E-AURC",
}
LOWER_IS_BETTER = {"fpr95", "fpr95_id_positive", "fpr95_ood_positive", "aurc", "eaurc"}
MISSING = "–"

NOTES = (  # (columns, the note under a table showing any of them)
    (("fpr95_id_positive",), "FPR95 (ID+): share of unknowns accepted at the threshold keeping 95% of knowns "
                             "(knowns positive; OE, MCM, ViM's authors)"),
    (("fpr95_ood_positive",), "FPR95 (OOD+): share of knowns rejected at the threshold flagging 95% of unknowns "
                              "(unknowns positive; OpenOOD, pytorch-ood)"),
    (("aupr_in", "aupr_out"), "AUPR (step): average precision, the step-wise sum (scikit-learn, OE)"),
    (("aupr_in_trapezoid", "aupr_out_trapezoid"), "AUPR (trapz): trapezoid rule over the precision-recall curve "
                                                  "(OpenOOD, ViM's authors)"),
    (tuple(k for k in HEADERS if k.startswith("ccr_fpr_")), "CCR@FPRα: share of knowns correctly classified and "
                                                            "accepted at FPR <= α (OpenOOD)"),
    (("aurc", "eaurc"), "AURC: mean misclassification risk of the knowns over coverages, ranked by the score; "
                        "E-AURC: AURC minus a perfect ranking's"),
)


def columns(results: Mapping[str, Any], metrics: Sequence[str] | None = None) -> list[str]:
    """The metric keys a table of ``results`` shows: ``metrics`` (default: the results' own
    ``table.metrics``, else :data:`DEFAULT_METRICS`) with ``fpr95`` and ``aupr_in`` / ``aupr_out``
    expanded to the conventions the results ask for (old results: ``positive``'s FPR95, step AUPR)."""
    table = {**table_settings(results.get("positive", "known")), **(results.get("table") or {})}
    out: list[str] = []
    for m in metrics if metrics is not None else table["metrics"]:
        if m == "fpr95":
            out += TABLE_FPR95[table["fpr95"]]
        elif m in ("aupr_in", "aupr_out"):
            out += [m + suffix for suffix in TABLE_AUPR[table["aupr"]]]
        else:
            out.append(m)
    return list(dict.fromkeys(out))


def metric_value(vals: Mapping[str, Any], key: str, positive: str = "known") -> Any:
    """``vals[key]``; results written before both FPR95 conventions were stored give their
    ``fpr95`` for the convention named by their ``positive``, and None for the other."""
    if key in vals:
        return vals[key]
    if key == "fpr95_id_positive" and positive == "known" or key == "fpr95_ood_positive" and positive == "unknown":
        return vals.get("fpr95")
    return None


def header(key: str, positive: str = "known", *, arrow: bool = True) -> str:
    """A column title with the convention in it (``fpr95`` alone names ``positive``'s)."""
    if key == "fpr95":
        key = "fpr95_id_positive" if positive == "known" else "fpr95_ood_positive"
    return HEADERS.get(key, key) + (" ↓" if arrow and key in LOWER_IS_BETTER else "")


def _is_agg(value: Any) -> bool:
    return isinstance(value, Mapping) and "mean" in value


def fmt(value: Any, digits: int = 2) -> str:
    """A fraction (or ``{"mean", "std"}``) as a percentage string; None -> "–"."""
    if value is None:
        return MISSING
    if _is_agg(value):
        return f"{100 * value['mean']:.{digits}f} ± {100 * value['std']:.{digits}f}"
    return f"{100 * float(value):.{digits}f}"


def _mean(value: Any) -> float | None:
    if value is None:
        return None
    return float(value["mean"]) if _is_agg(value) else float(value)


def _md_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + [":---:"] * (len(head) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def results_to_markdown(
    results: Mapping[str, Any],
    *,
    title: str | None = None,
    metrics: Sequence[str] | None = None,
) -> str:
    """ID accuracy first, then one table per OOD set with one row per score (percent, 2 dp).

    ``metrics``: the columns (default: the results' ``table.metrics``); ``fpr95`` and
    ``aupr_in`` / ``aupr_out`` expand to the conventions of the results' ``table`` entry
    (:func:`columns`)."""
    parts = [f"# {title}"] if title else []
    seeds = results.get("num_seeds")
    acc_line = f"**ID accuracy**: {fmt(results.get('acc'))}%" if results.get("acc") is not None else "**ID accuracy**: –"
    if seeds:
        acc_line += f" (mean ± std over {seeds} seeds; std is the population std, ddof=0)"
    parts.append(acc_line)
    for name, res in (results.get("extra_known") or {}).items():
        parts.append(f"**Accuracy on {name}** (known classes under a shift): {fmt(res.get('acc'))}%")
    counts = results.get("counts") or {}
    positive = results.get("positive", "known")
    cols = columns(results, metrics)
    for ood_name, per_score in results["results"].items():
        n = counts.get(ood_name)
        n = _mean(n) if n is not None else None
        heading = f"## {ood_name}" + (f" (unknown, n = {int(n)})" if n is not None else " (unknown)")
        head = ["Score"] + [header(m, positive) for m in cols]
        rows = [[name] + [fmt(metric_value(vals, m, positive)) for m in cols] for name, vals in per_score.items()]
        parts += [heading, _md_table(head, rows)]
        for score, st in ((results.get("streams") or {}).get(ood_name) or {}).items():  # stream scores (AdaNeg)
            parts.append(f"`{score}`: scored on a test stream of {st['known']} known + {st['unknown']} unknown samples "
                         f"(known:unknown {st['ratio']}), {st['order']}, batches of {st['batch_size']}, {st['memory']}.")
    notes = [note for keys, note in NOTES if set(keys) & set(cols)]
    if "tnr95" in cols:
        notes.append(f"TNR95 = 1 - FPR95 with {'knowns' if positive == 'known' else 'unknowns'} positive")
    parts.append("Values in %" + "".join(f"; {n}" for n in notes) + ".")
    return "\n\n".join(parts) + "\n"


def write_results(run_dir: str | Path, results: Mapping[str, Any], title: str | None = None) -> tuple[Path, Path]:
    """Write ``results.md`` and ``results.json`` into ``run_dir`` atomically; return their paths."""
    run_dir = Path(run_dir)
    md_path, json_path = run_dir / "results.md", run_dir / "results.json"
    write_json(json_path, results)
    atomic_write_text(md_path, results_to_markdown(results, title=title))
    return md_path, json_path


def _aggregate(values: list[Any], where: str) -> Any:
    first = values[0]
    if isinstance(first, Mapping):
        keys = list(first)
        for v in values[1:]:
            if not isinstance(v, Mapping) or set(v) != set(keys):
                other = sorted(set(v) ^ set(keys)) if isinstance(v, Mapping) else v
                raise ValueError(f"aggregate_seeds: results differ at '{where}' ({other}); "
                                 "every seed must evaluate the same OOD sets, scores and metrics")
        return {k: _aggregate([v[k] for v in values], f"{where}.{k}" if where else k) for k in keys}
    if first is None or isinstance(first, (str, bool)) or (isinstance(first, list)
                                                           and all(isinstance(x, str) for x in first)):
        if any(v != first for v in values):
            raise ValueError(f"aggregate_seeds: '{where}' differs between seeds: {values}")
        return first
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std()), "n": len(values)}


def aggregate_seeds(results_list: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean and std over seeds of every number in several ``evaluate_open_set`` results.

    Leaves become ``{"mean", "std", "n"}`` (population std, ``ddof=0``, as numpy / most OSR
    code report it); strings and None must agree across seeds and are kept as they are.
    The result renders with :func:`results_to_markdown` as "mean ± std".
    """
    if not results_list:
        raise ValueError("aggregate_seeds: no results to aggregate")
    out = _aggregate([dict(r) for r in results_list], "")
    out["num_seeds"] = len(results_list)
    return out


def paper_table_v(
    rows: Sequence[Mapping[str, Any]],
    *,
    score: str | None = None,
    metrics: Sequence[str] = ("auroc", "oscr", "macro_f1"),
    digits: int = 1,
) -> str:
    """The paper's Table V: Setting | Method | Accuracy | per OOD set AUROC, OSCR, Macro-F1.

    Each row is ``{"setting": "1-shot", "method": "CoOp", "results": <evaluate_open_set or
    aggregate_seeds dict>}`` with an optional ``"score"`` (default: ``score``, else the first
    score in the results).  Values are means in percent; a method written "+ ..." (e.g.
    "+ BackMix") also shows its change against the closest plain method above it in the same
    setting, as the paper does ("90.7 (+0.9)").  A setting equal to the row above is left blank.
    """
    if not rows:
        raise ValueError("paper_table_v: no rows")
    oods: list[str] = []
    for row in rows:
        for name in row["results"]["results"]:
            if name not in oods:
                oods.append(name)
    positive = rows[0]["results"].get("positive", "known")
    head = ["Setting", "Method", "Accuracy"] + [f"{o} {header(m, positive, arrow=False)}" for o in oods for m in metrics]

    def values(row: Mapping[str, Any]) -> list[float | None]:
        res = row["results"]
        out = [_mean(res.get("acc"))]
        for o in oods:
            per_score = res["results"].get(o, {})
            name = row.get("score") or score or next(iter(per_score), None)
            if per_score and name not in per_score:
                raise ValueError(f"paper_table_v: score '{name}' not in results for '{o}'; "
                                 f"available: {', '.join(per_score)}")
            vals = per_score.get(name, {})
            out += [_mean(metric_value(vals, m, res.get("positive", "known"))) for m in metrics]
        return out

    table: list[list[str]] = []
    base: list[float | None] | None = None  # the last non-"+" row of the current setting
    prev_setting = None
    for row in rows:
        vals, setting = values(row), str(row.get("setting", ""))
        if setting != prev_setting:
            base = None
        is_delta = str(row["method"]).lstrip().startswith("+") and base is not None
        cells = []
        for i, v in enumerate(vals):
            cell = MISSING if v is None else f"{100 * v:.{digits}f}"
            if is_delta and v is not None and base[i] is not None:
                cell += f" ({100 * (v - base[i]):+.{digits}f})"
            cells.append(cell)
        table.append(["" if setting == prev_setting else setting, str(row["method"])] + cells)
        if not str(row["method"]).lstrip().startswith("+"):
            base = vals
        prev_setting = setting
    return _md_table(head, table) + "\n"


COMPARE_METRICS = ("auroc", "fpr95", "oscr")


def comparison_markdown(results: Mapping[str, Mapping[str, Any]], scores: Sequence[str], title: str,
                        metrics: Sequence[str] = COMPARE_METRICS) -> str:
    """Variants of one run side by side, one table per score: model | variant | accuracy |
    AUROC / FPR95 / OSCR per unknown set (``train`` with ``variants``, and its ``eval``)."""
    parts = [f"# {title}"]
    for score in scores:
        rows = [{"setting": f"{res.get('model', '')}, {res.get('epochs', '?')} epochs", "method": name,
                 "results": res, "score": score} for name, res in results.items()]
        parts += [f"## Score: {score}", paper_table_v(rows, metrics=metrics, digits=2).replace(
            "| Setting | Method |", "| Model | Variant |")]
    parts.append("Values in %; FPR95 lower is better. Each variant's own results.md has every metric.")
    return "\n\n".join(p.rstrip("\n") for p in parts) + "\n"


def load_results(path: str | Path) -> dict[str, Any]:
    """Read a ``results.json`` written by :func:`write_results`."""
    return json.loads(Path(path).read_text())


def ood_summary_table(results: Mapping[str, Any], metrics: Sequence[str] = ("fpr95", "auroc"), *,
                      digits: int = 2, mark_best: bool = True) -> str:
    """The OOD literature's table: one row per score, ``<set> FPR95 / AUROC`` columns and their average.

    Values in percent (means for seed aggregates); with ``mark_best`` the best value of each
    column is bold (lowest FPR95, highest otherwise).  ``fpr95`` / ``aupr_*`` expand to the
    results' table conventions (:func:`columns`).
    """
    positive = results.get("positive", "known")
    metrics = columns(results, metrics)
    oods = list(results["results"])
    scores: list[str] = []
    for per_score in results["results"].values():
        scores += [s for s in per_score if s not in scores]
    cols = [(o, m) for o in oods + ["Average"] for m in metrics]
    grid: dict[str, list[float | None]] = {}
    for s in scores:
        row = []
        for o, m in cols:
            if o == "Average":
                vals = [_mean(metric_value(results["results"][x].get(s, {}), m, positive)) for x in oods]
                row.append(None if any(v is None for v in vals) else float(np.mean(vals)))
            else:
                row.append(_mean(metric_value(results["results"][o].get(s, {}), m, positive)))
        grid[s] = row
    best: list[float | None] = []
    for j, (_, m) in enumerate(cols):
        vals = [grid[s][j] for s in scores if grid[s][j] is not None]
        best.append(None if not vals else (min(vals) if m in LOWER_IS_BETTER else max(vals)))
    head = ["Score"] + [f"{o} {header(m, positive)}" for o, m in cols]
    rows = []
    for s in scores:
        cells = []
        for j, v in enumerate(grid[s]):
            cell = MISSING if v is None else f"{100 * v:.{digits}f}"
            cells.append(f"**{cell}**" if mark_best and v is not None and v == best[j] else cell)
        rows.append([s] + cells)
    return _md_table(head, rows) + "\n"
