"""ood_metrics: hand-computed cases, a brute-force reference on random tied scores, invariants."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from backmix_vlm.errors import BackmixError
from backmix_vlm.ood.metrics import MetricInputError, ood_metrics, oscr_curve

BASE_KEYS = ["auroc", "aupr_in", "aupr_out", "fpr95", "tnr95", "dtacc", "fpr95_id_positive", "fpr95_ood_positive",
             "aupr_in_trapezoid", "aupr_out_trapezoid"]


# ----------------------------------------------------------------------------- plain references
def ref_auroc(k, u):
    return np.mean([(a > b) + 0.5 * (a == b) for a in k for b in u])


def ref_thresholds(k, u):
    return sorted(set(k) | set(u), reverse=True)


def ref_fpr95(pos, neg):
    for t in ref_thresholds(pos, neg):
        if np.mean([p >= t for p in pos]) >= 0.95:
            return np.mean([n >= t for n in neg]), t
    raise AssertionError("unreachable")


def ref_dtacc(pos, neg):
    best = 0.5  # threshold +inf: accept nothing
    for t in ref_thresholds(pos, neg):
        tpr = np.mean([p >= t for p in pos])
        tnr = np.mean([n < t for n in neg])
        best = max(best, 0.5 * (tpr + tnr))
    return best


def ref_ap(pos, neg):
    """Average precision: sum over thresholds of (recall step) * precision."""
    ap, prev_recall = 0.0, 0.0
    for t in ref_thresholds(pos, neg):
        tp = sum(p >= t for p in pos)
        fp = sum(n >= t for n in neg)
        recall = tp / len(pos)
        ap += (recall - prev_recall) * tp / (tp + fp)
        prev_recall = recall
    return ap


def ref_oscr(k, correct, u):
    pts = [(0.0, 0.0)]
    for t in ref_thresholds(k, u):
        ccr = sum(1 for s, c in zip(k, correct) if c and s >= t) / len(k)
        fpr = sum(1 for s in u if s >= t) / len(u)
        pts.append((fpr, ccr))
    return sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(pts, pts[1:]))


def ref_macro_f1(k, kl, kp, u, up):
    _, t = ref_fpr95(k, u)
    true = list(kl) + ["unk"] * len(u)
    pred = [p if s >= t else "unk" for s, p in zip(list(k) + list(u), list(kp) + list(up))]
    f1s = []
    for c in set(true) | set(pred):
        tp = sum(1 for a, b in zip(true, pred) if a == c and b == c)
        n_pred, n_true = pred.count(c), true.count(c)
        prec = tp / n_pred if n_pred else 0.0
        rec = tp / n_true if n_true else 0.0
        f1s.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    return np.mean(f1s)


# ----------------------------------------------------------------------------- hand cases
def test_perfect_separation():
    m = ood_metrics([0.9, 0.8, 0.7], [0.3, 0.2])
    assert list(m) == BASE_KEYS
    assert m == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0.0, "tnr95": 1.0, "dtacc": 1.0,
                 "fpr95_id_positive": 0.0, "fpr95_ood_positive": 0.0, "aupr_in_trapezoid": 1.0,
                 "aupr_out_trapezoid": 1.0}


def test_inverted_separation():
    m = ood_metrics([0.1, 0.2], [0.8, 0.9])
    assert m["auroc"] == 0.0
    assert m["fpr95"] == 1.0 and m["tnr95"] == 0.0
    assert m["dtacc"] == 0.5  # best is a trivial threshold
    # ranking u, u, k, k: precision 1/3 at the first known, 2/4 at the second
    assert m["aupr_in"] == pytest.approx(0.5 * 1 / 3 + 0.5 * 2 / 4)
    assert m["aupr_out"] == pytest.approx(0.5 * 1 / 3 + 0.5 * 2 / 4)


def test_tied_scores_hand_computed():
    k, u = [1.0, 1.0, 0.5, 0.0], [1.0, 0.5, 0.0, 0.0]
    m = ood_metrics(k, u, known_preds=[0, 1, 1, 1], known_labels=[0, 1, 0, 1], unknown_preds=[0, 1, 0, 1])
    assert m["auroc"] == pytest.approx(10.5 / 16)
    # operating points (fpr, tpr): (1/4, 1/2) at t=1, (1/2, 3/4) at t=.5, (1, 1) at t=0
    assert m["fpr95"] == 1.0 and m["tnr95"] == 0.0
    assert m["dtacc"] == pytest.approx(0.625)
    assert m["aupr_in"] == pytest.approx(0.5 * 2 / 3 + 0.25 * 3 / 5 + 0.25 * 4 / 8)
    assert m["aupr_out"] == pytest.approx(0.5 * 2 / 3 + 0.25 * 3 / 5 + 0.25 * 4 / 8)
    assert m["acc"] == 0.75
    # CCR/FPR points (0,0) (1/4,1/2) (1/2,1/2) (1,3/4): tied known+unknown move together
    assert m["oscr"] == pytest.approx(0.0625 + 0.125 + 0.3125)
    # threshold 0 accepts all; F1: unknown 0, class 0: 0.4, class 1: 4/7
    assert m["macro_f1"] == pytest.approx((0 + 0.4 + 4 / 7) / 3)


def test_threshold_rejection_hand_computed():
    k, u = [0.9, 0.8, 0.7, 0.6], [0.95, 0.65, 0.5]
    m = ood_metrics(k, u, known_preds=[0, 1, 1, 1], known_labels=[0, 0, 1, 1], unknown_preds=[0, 1, 1])
    assert m["auroc"] == pytest.approx(7 / 12)
    assert m["fpr95"] == pytest.approx(2 / 3)  # t = 0.6 keeps every known, accepts .95 and .65
    assert m["acc"] == 0.75
    assert m["oscr"] == pytest.approx(1 / 3 * 0.5 + 1 / 3 * 0.75)
    # u=0.5 rejected -> "unknown"; F1: unknown 0.5, class 0 0.5, class 1 2/3
    assert m["macro_f1"] == pytest.approx((0.5 + 0.5 + 2 / 3) / 3)
    # OpenOOD convention: flagging >= 95% of unknowns needs t = 0.95, which flags every known
    mu = ood_metrics(k, u, positive="unknown")
    assert mu["fpr95"] == 1.0 and mu["tnr95"] == 0.0
    for key in ("auroc", "aupr_in", "aupr_out", "dtacc"):
        assert mu[key] == m[key]


def test_fpr95_exact_95_percent_point():
    # 20 knowns: the 19th highest known (tpr = 0.95 exactly) sets the threshold
    k = np.arange(20, dtype=float)  # 0..19, threshold = 1
    u = np.array([0.5, 1.0, 1.5, 25.0])
    m = ood_metrics(k, u)
    assert m["fpr95"] == pytest.approx(3 / 4)  # 1.0, 1.5 and 25 are accepted (1.0 tied with the known)


# ----------------------------------------------------------------------------- reference parity
@pytest.mark.parametrize("seed", range(6))
def test_against_brute_force_reference(seed):
    rng = np.random.default_rng(seed)
    nk, nu, classes = rng.integers(5, 60), rng.integers(5, 60), 4
    k = np.round(rng.normal(1.0, 1.0, nk), 1)  # rounding creates many ties
    u = np.round(rng.normal(0.0, 1.0, nu), 1)
    kl = rng.integers(0, classes, nk)
    kp = np.where(rng.random(nk) < 0.7, kl, rng.integers(0, classes, nk))
    up = rng.integers(0, classes, nu)
    m = ood_metrics(k, u, known_preds=kp, known_labels=kl, unknown_preds=up)
    assert m["auroc"] == pytest.approx(ref_auroc(k, u), abs=1e-12)
    assert m["fpr95"] == pytest.approx(ref_fpr95(k, u)[0], abs=1e-12)
    assert m["tnr95"] == pytest.approx(1 - ref_fpr95(k, u)[0], abs=1e-12)
    assert m["dtacc"] == pytest.approx(ref_dtacc(k, u), abs=1e-12)
    assert m["aupr_in"] == pytest.approx(ref_ap(k, u), abs=1e-12)
    assert m["aupr_out"] == pytest.approx(ref_ap(-u, -k), abs=1e-12)
    assert m["acc"] == pytest.approx(np.mean(kp == kl), abs=1e-12)
    assert m["oscr"] == pytest.approx(ref_oscr(k, kp == kl, u), abs=1e-12)
    assert m["macro_f1"] == pytest.approx(ref_macro_f1(k, kl, kp, u, up), abs=1e-12)
    mu = ood_metrics(k, u, positive="unknown")
    assert mu["fpr95"] == pytest.approx(ref_fpr95(-u, -k)[0], abs=1e-12)


# ----------------------------------------------------------------------------- invariants
def test_oscr_curve_ends_at_accuracy_and_perfect_detector_gives_accuracy():
    rng = np.random.default_rng(0)
    k, u = rng.normal(2, 1, 50), rng.normal(0, 1, 40)
    correct = rng.random(50) < 0.8
    fpr, ccr = oscr_curve(k, correct, u)
    assert fpr[0] == 0 and ccr[0] == 0
    assert fpr[-1] == 1.0 and ccr[-1] == pytest.approx(correct.mean())
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(ccr) >= 0)
    # unknowns all below knowns -> curve reaches CCR = acc at FPR = 0 -> OSCR = acc
    m = ood_metrics(k + 10, u, known_preds=correct.astype(int), known_labels=np.ones(50, int))
    assert m["oscr"] == pytest.approx(correct.mean())
    # every known wrong -> OSCR 0
    m0 = ood_metrics(k, u, known_preds=np.zeros(50, int), known_labels=np.ones(50, int))
    assert m0["oscr"] == 0.0 and m0["acc"] == 0.0


def test_positive_unknown_symmetry():
    rng = np.random.default_rng(1)
    k, u = np.round(rng.normal(1, 1, 37), 1), np.round(rng.normal(0, 1, 23), 1)
    a = ood_metrics(k, u, positive="unknown")
    b = ood_metrics(-u, -k, positive="known")  # swap roles: unknowns become the positives
    assert a["fpr95"] == b["fpr95"] and a["tnr95"] == b["tnr95"]
    assert a["auroc"] == pytest.approx(b["auroc"])
    assert a["aupr_in"] == pytest.approx(b["aupr_out"]) and a["aupr_out"] == pytest.approx(b["aupr_in"])
    assert a["dtacc"] == pytest.approx(b["dtacc"])


def test_torch_inputs_match_numpy():
    rng = np.random.default_rng(2)
    k, u = rng.normal(1, 1, 30).astype(np.float32), rng.normal(0, 1, 20).astype(np.float32)
    kl, kp, up = rng.integers(0, 3, 30), rng.integers(0, 3, 30), rng.integers(0, 3, 20)
    a = ood_metrics(k, u, known_preds=kp, known_labels=kl, unknown_preds=up)
    b = ood_metrics(torch.from_numpy(k), torch.from_numpy(u), known_preds=torch.from_numpy(kp),
                    known_labels=torch.from_numpy(kl), unknown_preds=torch.from_numpy(up))
    assert a == b
    assert all(0.0 <= v <= 1.0 and isinstance(v, float) for v in a.values())


def test_score_invariant_to_monotone_transform():
    rng = np.random.default_rng(3)
    k, u = rng.normal(1, 1, 30), rng.normal(0, 1, 25)
    a = ood_metrics(k, u)
    b = ood_metrics(np.exp(k), np.exp(u))
    assert a == pytest.approx(b)


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(known_scores=[], unknown_scores=[0.1]), "known_scores: is empty"),
        (dict(known_scores=[0.1], unknown_scores=[]), "unknown_scores: is empty"),
        (dict(known_scores=[0.1, float("nan")], unknown_scores=[0.1]), "NaN"),
        (dict(known_scores=[[0.1, 0.2]], unknown_scores=[0.1]), "1-D"),
        (dict(known_scores=[0.1, 0.2], unknown_scores=[0.1], known_preds=[0], known_labels=[0, 1]), "known_preds has 1"),
        (dict(known_scores=[0.1], unknown_scores=[0.1, 0.2], known_preds=[0], known_labels=[0], unknown_preds=[1]),
         "unknown_preds has 1"),
        (dict(known_scores=[0.1], unknown_scores=[0.1], known_preds=[0]), "together"),
        (dict(known_scores=[0.1], unknown_scores=[0.1], unknown_preds=[0]), "needs known_preds"),
        (dict(known_scores=[0.1], unknown_scores=[0.1], positive="ood"), "choose one of known, unknown"),
        (dict(known_scores=[0.1], unknown_scores=[0.1], known_preds=[0], known_labels=[-1]), ">= 0"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, match):
    with pytest.raises(MetricInputError, match=match) as info:
        ood_metrics(kwargs.pop("known_scores"), kwargs.pop("unknown_scores"), **kwargs)
    assert isinstance(info.value, BackmixError) and isinstance(info.value, ValueError)
