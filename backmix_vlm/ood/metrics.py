"""Open-set / OOD metrics: one function, ``ood_metrics``, from scores to a dict of fractions.

All curve work goes through scikit-learn (``roc_curve``, ``roc_auc_score``,
``average_precision_score``, ``precision_recall_curve``, ``f1_score``) so the numbers match what
other toolkits report; OSCR, CCR@FPR and AURC, which sklearn does not have, are computed here
(with ties handled properly).  Both reporting conventions of FPR95 (ID or OOD positive) and of
AUPR (step-wise average precision or trapezoid) are always computed; ``docs/methods.md`` says
which papers and toolkits use which.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import auc, average_precision_score, f1_score, precision_recall_curve, roc_auc_score, roc_curve

from ..errors import BackmixError
from ..metric_keys import CCR_FPR_LEVELS, CLASSIFICATION_KEYS, DETECTION_KEYS, METRIC_KEYS, ccr_key  # noqa: F401

POSITIVES = ("known", "unknown")
TPR_LEVEL = 0.95
UNKNOWN_LABEL = -1  # the "unknown" class id used for Macro-F1


class MetricInputError(BackmixError, ValueError):
    """Scores / predictions handed to the metrics are empty, NaN or of mismatched lengths."""


def _to_numpy(x: Any, name: str, *, dtype: Any = np.float64) -> np.ndarray:
    """numpy / torch / list -> 1-D numpy array (torch bf16 is upcast first)."""
    if hasattr(x, "detach"):  # torch.Tensor without importing torch here
        x = x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise MetricInputError(f"{name}: expected a 1-D array of per-sample values, got shape {arr.shape}")
    if arr.size == 0:
        raise MetricInputError(f"{name}: is empty; every known and unknown set needs at least one sample")
    arr = arr.astype(dtype)
    if dtype is np.float64 and not np.all(np.isfinite(arr)):
        bad = int((~np.isfinite(arr)).sum())
        raise MetricInputError(f"{name}: {bad} of {arr.size} scores are NaN or infinite (did training diverge?)")
    return arr


def _first_at_tpr(tpr: np.ndarray, level: float = TPR_LEVEL) -> int:
    """Index of the first ROC operating point (descending threshold) with TPR >= ``level``."""
    return int(np.argmax(tpr >= level))  # k/n == 0.95 is exact in float64


def fpr_at_tpr(pos_scores: np.ndarray, neg_scores: np.ndarray, level: float = TPR_LEVEL) -> tuple[float, float]:
    """(FPR, threshold) at the largest threshold t whose TPR(t) = P(pos >= t) is >= ``level``.

    Tied scores move together (a threshold accepts every sample with score >= t), so the
    reported FPR is the one of a real operating point, never an interpolation.
    """
    y = np.r_[np.ones(pos_scores.size), np.zeros(neg_scores.size)]
    fpr, tpr, thr = roc_curve(y, np.r_[pos_scores, neg_scores], drop_intermediate=False)
    i = _first_at_tpr(tpr, level)
    return float(fpr[i]), float(thr[i])


def aupr_trapezoid(pos_scores: np.ndarray, neg_scores: np.ndarray) -> float:
    """Area under the precision-recall curve by the trapezoid rule (OpenOOD, ViM's authors).

    ``auc(recall, precision)`` over ``precision_recall_curve``'s points: one per distinct score
    (tied scores move together) plus sklearn's end point (recall 0, precision 1).  Linear
    interpolation of precision between points is optimistic against average precision
    (:func:`sklearn.metrics.average_precision_score`, the step-wise sum), most where the
    first accepted samples are negatives.
    """
    y = np.r_[np.ones(pos_scores.size), np.zeros(neg_scores.size)]
    precision, recall, _ = precision_recall_curve(y, np.r_[pos_scores, neg_scores])
    return float(auc(recall, precision))


def dtacc(pos_scores: np.ndarray, neg_scores: np.ndarray) -> float:
    """Detection accuracy: max over thresholds of the balanced accuracy 0.5 * (TPR + TNR)."""
    y = np.r_[np.ones(pos_scores.size), np.zeros(neg_scores.size)]
    fpr, tpr, _ = roc_curve(y, np.r_[pos_scores, neg_scores], drop_intermediate=False)
    return float(np.max(0.5 * (tpr + 1.0 - fpr)))


def oscr_curve(known_scores: np.ndarray, correct: np.ndarray, unknown_scores: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, CCR) operating points from threshold +inf down to the lowest score (see :func:`oscr`)."""
    thr = np.unique(np.r_[known_scores, unknown_scores])[::-1]  # descending distinct scores
    ok = np.sort(known_scores[correct])
    unk = np.sort(unknown_scores)
    ccr = (ok.size - np.searchsorted(ok, thr, side="left")) / known_scores.size
    fpr = (unk.size - np.searchsorted(unk, thr, side="left")) / unknown_scores.size
    return np.r_[0.0, fpr], np.r_[0.0, ccr]


def oscr(known_scores: np.ndarray, correct: np.ndarray, unknown_scores: np.ndarray) -> float:
    """Open-Set Classification Rate (Dhamija et al. 2018; Vaze et al. 2022).

    Area under CCR(t) = P(known correctly classified and score >= t) against
    FPR(t) = P(unknown score >= t), with t swept from +inf (0, 0) down through every distinct
    score to the lowest, where FPR = 1 and CCR = closed-set accuracy.  Knowns and unknowns
    that share a score are accepted together (diagonal segment, trapezoid rule), unlike the
    widely copied ARPL implementation, which is off by one sample and splits ties.
    """
    return float(auc(*oscr_curve(known_scores, correct, unknown_scores)))


def ccr_at_fpr(known_scores: np.ndarray, correct: np.ndarray, unknown_scores: np.ndarray, level: float) -> float:
    """Correct-classification rate at FPR ``level`` (OpenOOD's CCR@FPR): the share of knowns
    correctly classified and accepted at the lowest threshold t that accepts at most
    ``level`` of the unknowns, FPR(t) = P(unknown score >= t) <= level.

    Tied scores are accepted together.  When ``level * n_unknown`` is not an integer this is
    OpenOOD's ``ccr_fpr``; when it is an integer m >= 1, OpenOOD's threshold (the m-th largest
    unknown score, knowns accepted strictly above it) accepts only m - 1 unknowns, one fewer
    than the level allows, and may accept fewer knowns than here.
    """
    if not 0.0 <= level <= 1.0:
        raise MetricInputError(f"CCR@FPR level {level!r} is not accepted; expected a fraction in [0, 1]")
    allowed = int(np.floor(level * unknown_scores.size + 1e-9))  # unknowns that may be accepted
    unk = np.sort(unknown_scores)[::-1]
    if allowed >= unk.size:
        return float(correct.mean())
    # accept scores strictly above the (allowed + 1)-th largest unknown score
    return float(np.sum(correct & (known_scores > unk[allowed])) / known_scores.size)


def risk_coverage(scores: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coverage, risk) of selective classification: accept the k highest-scoring samples,
    k = 1..n, risk = share of errors among them (Geifman & El-Yaniv 2017).

    Samples with tied scores have no order between them; the risk at a coverage inside a tie
    block is its mean over all orders of the block (errors spread evenly over the block), so
    the curve does not depend on how the samples were listed.  Without ties it is the plain
    sorted curve.
    """
    n = scores.size
    order = np.argsort(-scores, kind="stable")
    s, wrong = scores[order], (~correct[order]).astype(np.float64)
    starts = np.r_[0, np.flatnonzero(s[1:] != s[:-1]) + 1]  # first position of each tie block
    sizes = np.diff(np.r_[starts, n])
    errors_before = np.r_[0.0, np.cumsum(wrong)][starts]     # errors ranked above each block
    errors_in = np.add.reduceat(wrong, starts)
    block = np.repeat(np.arange(starts.size), sizes)
    k = np.arange(1, n + 1, dtype=np.float64)                # samples accepted
    within = k - starts[block]                               # of the block, 1..size
    expected_errors = errors_before[block] + errors_in[block] * within / sizes[block]
    return k / n, expected_errors / k


def aurc(scores: np.ndarray, correct: np.ndarray) -> float:
    """Area under the risk-coverage curve (Geifman et al. 2019): mean risk over coverages k/n."""
    return float(risk_coverage(scores, correct)[1].mean())


def optimal_aurc(correct: np.ndarray) -> float:
    """AURC of a score that ranks every correct sample above every error (exact, discrete)."""
    n, n_ok = correct.size, int(correct.sum())
    k = np.arange(1, n + 1, dtype=np.float64)
    return float(np.mean(np.maximum(0.0, k - n_ok) / k))


def ood_metrics(
    known_scores: Any,
    unknown_scores: Any,
    *,
    known_preds: Any = None,
    known_labels: Any = None,
    unknown_preds: Any = None,
    positive: str = "known",
) -> dict[str, float]:
    """Every open-set metric for one known set vs one unknown set, as fractions in [0, 1].

    Scores follow the toolkit convention: higher = more likely known.  Inputs may be numpy
    arrays, torch tensors or lists.

    Keys (always): ``auroc``, ``aupr_in``, ``aupr_out``, ``fpr95``, ``tnr95``, ``dtacc``,
    ``fpr95_id_positive``, ``fpr95_ood_positive``, ``aupr_in_trapezoid``, ``aupr_out_trapezoid``.

    * ``positive="known"`` (default, OSR convention): knowns are the positive class.
      ``fpr95`` = share of unknowns accepted at the threshold that keeps 95% of knowns, i.e.
      the largest threshold t with TPR(t) = P(known score >= t) >= 0.95 -- the first of
      ``roc_curve``'s operating points (``drop_intermediate=False``) with tpr >= 0.95; tied
      scores are accepted together, so that point may keep more than 95% of knowns.
    * ``positive="unknown"`` (OpenOOD convention): scores are negated and unknowns are the
      positive class; ``fpr95`` = share of knowns flagged as unknown at the first operating
      point that flags >= 95% of unknowns (OpenOOD's ``fpr_recall``).
    * ``tnr95`` = 1 - ``fpr95`` in either convention.  ``auroc``, ``aupr_*`` and ``dtacc``
      do not depend on ``positive`` (AUROC is symmetric; ties count 1/2 either way).
    * ``fpr95_id_positive`` / ``fpr95_ood_positive``: FPR95 in each convention, whatever
      ``positive`` is (``fpr95`` is the one ``positive`` names).
    * ``aupr_in``: knowns positive, score s; ``aupr_out``: unknowns positive, score -s.  Both
      are sklearn's ``average_precision_score`` (step-wise sum); ``aupr_in_trapezoid`` /
      ``aupr_out_trapezoid``: the same curves by the trapezoid rule (:func:`aupr_trapezoid`).
    * ``dtacc``: best balanced accuracy 0.5 * (TPR + TNR) over all thresholds.

    With ``known_preds`` and ``known_labels`` (closed-set predictions of the knowns):
    ``acc`` (closed-set accuracy) and ``oscr`` (see :func:`oscr`; CCR at FPR = 1 is ``acc``),
    ``ccr_fpr_1e-04`` ... ``ccr_fpr_1e-01`` (:func:`ccr_at_fpr` at OpenOOD's levels), and the
    knowns' selective classification by the score: ``aurc`` (:func:`aurc`; lower is better)
    and ``eaurc`` = ``aurc`` - the AURC of a perfect ranking (:func:`optimal_aurc`).
    With ``unknown_preds`` too: ``macro_f1`` over the K known classes plus one "unknown"
    class at the 95%-TPR-on-knowns threshold above (samples scoring below it are predicted
    "unknown"; knowns' true label is their class, unknowns' is "unknown"); sklearn
    ``f1_score(average="macro")`` over the labels present in truth or prediction.
    ``oscr`` and ``macro_f1`` always take knowns as accepted-above-threshold, whatever
    ``positive`` is.
    """
    if positive not in POSITIVES:
        raise MetricInputError(f"positive={positive!r} is not accepted; choose one of {', '.join(POSITIVES)}")
    ks = _to_numpy(known_scores, "known_scores")
    us = _to_numpy(unknown_scores, "unknown_scores")

    y_known = np.r_[np.ones(ks.size), np.zeros(us.size)]
    s = np.r_[ks, us]
    fpr95_id, t95 = fpr_at_tpr(ks, us)
    fpr95_ood, _ = fpr_at_tpr(-us, -ks)
    fpr95 = fpr95_id if positive == "known" else fpr95_ood
    out: dict[str, float] = {
        "auroc": float(roc_auc_score(y_known, s)),
        "aupr_in": float(average_precision_score(y_known, s)),
        "aupr_out": float(average_precision_score(1 - y_known, -s)),
        "fpr95": fpr95,
        "tnr95": 1.0 - fpr95,
        "dtacc": dtacc(ks, us),
        "fpr95_id_positive": fpr95_id,
        "fpr95_ood_positive": fpr95_ood,
        "aupr_in_trapezoid": aupr_trapezoid(ks, us),
        "aupr_out_trapezoid": aupr_trapezoid(-us, -ks),
    }

    if (known_preds is None) != (known_labels is None):
        raise MetricInputError("known_preds and known_labels must be given together (for acc / OSCR)")
    if unknown_preds is not None and known_preds is None:
        raise MetricInputError("unknown_preds needs known_preds and known_labels too (for Macro-F1)")
    if known_preds is None:
        return out

    kp = _to_numpy(known_preds, "known_preds", dtype=np.int64)
    kl = _to_numpy(known_labels, "known_labels", dtype=np.int64)
    for name, arr in (("known_preds", kp), ("known_labels", kl)):
        if arr.size != ks.size:
            raise MetricInputError(f"{name} has {arr.size} entries but known_scores has {ks.size}")
        if arr.min() < 0:
            raise MetricInputError(f"{name}: class ids must be >= 0, got {int(arr.min())}")
    correct = kp == kl
    out["acc"] = float(correct.mean())
    out["oscr"] = oscr(ks, correct, us)
    for level in CCR_FPR_LEVELS:
        out[ccr_key(level)] = ccr_at_fpr(ks, correct, us, level)
    out["aurc"] = aurc(ks, correct)
    out["eaurc"] = out["aurc"] - optimal_aurc(correct)

    if unknown_preds is not None:
        up = _to_numpy(unknown_preds, "unknown_preds", dtype=np.int64)
        if up.size != us.size:
            raise MetricInputError(f"unknown_preds has {up.size} entries but unknown_scores has {us.size}")
        y_true = np.r_[kl, np.full(us.size, UNKNOWN_LABEL)]
        y_pred = np.where(s >= t95, np.r_[kp, up], UNKNOWN_LABEL)
        out["macro_f1"] = float(f1_score(y_true, y_pred, average="macro", zero_division=0))
    return out
