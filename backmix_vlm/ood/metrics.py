"""Open-set / OOD metrics: one function, ``ood_metrics``, from scores to a dict of fractions.

All curve work goes through scikit-learn (``roc_curve``, ``roc_auc_score``,
``average_precision_score``, ``f1_score``) so the numbers match what other toolkits report;
only OSCR, which sklearn does not have, is computed here (with ties handled properly).
"""
from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import auc, average_precision_score, f1_score, roc_auc_score, roc_curve

from ..errors import BackmixError

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

    Keys (always): ``auroc``, ``aupr_in``, ``aupr_out``, ``fpr95``, ``tnr95``, ``dtacc``.

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
    * ``aupr_in``: knowns positive, score s; ``aupr_out``: unknowns positive, score -s.  Both
      are sklearn's ``average_precision_score`` (step-wise sum, not the optimistic trapezoid).
    * ``dtacc``: best balanced accuracy 0.5 * (TPR + TNR) over all thresholds.

    With ``known_preds`` and ``known_labels`` (closed-set predictions of the knowns):
    ``acc`` (closed-set accuracy) and ``oscr`` (see :func:`oscr`; CCR at FPR = 1 is ``acc``).
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
    if positive == "known":
        fpr95, _ = fpr_at_tpr(ks, us)
    else:
        fpr95, _ = fpr_at_tpr(-us, -ks)
    out: dict[str, float] = {
        "auroc": float(roc_auc_score(y_known, s)),
        "aupr_in": float(average_precision_score(y_known, s)),
        "aupr_out": float(average_precision_score(1 - y_known, -s)),
        "fpr95": fpr95,
        "tnr95": 1.0 - fpr95,
        "dtacc": dtacc(ks, us),
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

    if unknown_preds is not None:
        up = _to_numpy(unknown_preds, "unknown_preds", dtype=np.int64)
        if up.size != us.size:
            raise MetricInputError(f"unknown_preds has {up.size} entries but unknown_scores has {us.size}")
        _, t = fpr_at_tpr(ks, us)
        y_true = np.r_[kl, np.full(us.size, UNKNOWN_LABEL)]
        y_pred = np.where(s >= t, np.r_[kp, up], UNKNOWN_LABEL)
        out["macro_f1"] = float(f1_score(y_true, y_pred, average="macro", zero_division=0))
    return out
