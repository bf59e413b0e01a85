"""Both reporting conventions (FPR95 ID / OOD positive, AUPR step / trapezoid), CCR@FPR and AURC:
scikit-learn parity, OpenOOD's formulas, hand-computed cases with ties, brute force."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve

from backmix_vlm.ood.metrics import (CCR_FPR_LEVELS, METRIC_KEYS, MetricInputError, aurc, ccr_at_fpr, ccr_key,
                                     ood_metrics, optimal_aurc, risk_coverage)


def tied_case(seed: int, classes: int = 3):
    rng = np.random.default_rng(seed)
    nk, nu = int(rng.integers(5, 50)), int(rng.integers(5, 50))
    k = np.round(rng.normal(1.0, 1.0, nk), 1)  # rounding makes many ties, also between knowns and unknowns
    u = np.round(rng.normal(0.0, 1.0, nu), 1)
    kl = rng.integers(0, classes, nk)
    kp = np.where(rng.random(nk) < 0.7, kl, rng.integers(0, classes, nk))
    return k, u, kl, kp


# ----------------------------------------------------------------------------- OpenOOD v1.5's formulas
def openood_v15(k, u, drop_intermediate=False):
    """openood/evaluators/metrics.py (v1.5) auc_and_fpr_recall, with conf = score and OOD label -1.

    OpenOOD calls ``roc_curve`` with its default ``drop_intermediate=True``, which drops real
    operating points lying on a straight ROC segment; we keep every point (see docs/methods.md)."""
    conf = np.r_[k, u]
    ood = np.r_[np.zeros(k.size), np.ones(u.size)]
    fpr_list, tpr_list, _ = roc_curve(ood, -conf, drop_intermediate=drop_intermediate)
    fpr = fpr_list[np.argmax(tpr_list >= 0.95)]
    p_in, r_in, _ = precision_recall_curve(1 - ood, conf)
    p_out, r_out, _ = precision_recall_curve(ood, -conf)
    return fpr, auc(r_in, p_in), auc(r_out, p_out)


def openood_ccr(k, correct, u, level):
    """openood/evaluators/metrics.py ccr_fpr."""
    fp_num = int(np.ceil(level * u.size))
    thresh = np.sort(u)[-fp_num]
    return np.sum((k > thresh) & correct) / k.size


@pytest.mark.parametrize("seed", range(5))
def test_both_conventions_match_sklearn_and_openood(seed):
    k, u, _, _ = tied_case(seed)
    m = ood_metrics(k, u)
    y = np.r_[np.ones(k.size), np.zeros(u.size)]
    s = np.r_[k, u]
    assert m["aupr_in"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert m["aupr_out"] == pytest.approx(average_precision_score(1 - y, -s), abs=1e-12)
    p, r, _ = precision_recall_curve(y, s)
    assert m["aupr_in_trapezoid"] == pytest.approx(auc(r, p), abs=1e-12)
    p, r, _ = precision_recall_curve(1 - y, -s)
    assert m["aupr_out_trapezoid"] == pytest.approx(auc(r, p), abs=1e-12)
    fpr_ood, aupr_in, aupr_out = openood_v15(k, u)
    assert m["fpr95_ood_positive"] == pytest.approx(fpr_ood, abs=1e-12)
    assert m["aupr_in_trapezoid"] == pytest.approx(aupr_in, abs=1e-12)
    assert m["aupr_out_trapezoid"] == pytest.approx(aupr_out, abs=1e-12)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    assert m["fpr95_id_positive"] == pytest.approx(fpr[np.argmax(tpr >= 0.95)], abs=1e-12)
    # OpenOOD's own call (intermediate points dropped) can only land on a later point
    assert m["fpr95_ood_positive"] <= openood_v15(k, u, drop_intermediate=True)[0] + 1e-12


def test_openood_dropped_points_matter_only_with_ties_across_the_sets():
    rng = np.random.default_rng(0)
    k, u = rng.normal(1, 1, 400), rng.normal(0, 1, 300)  # distinct scores: every point is a single sample
    assert ood_metrics(k, u)["fpr95_ood_positive"] == openood_v15(k, u, drop_intermediate=True)[0]
    # ties mixing knowns and unknowns: ROC points (.2, .9) (.6, .95) (1, 1) are collinear, and sklearn drops
    # the first although it is the first operating point flagging >= 95 % of unknowns
    k = np.array([0.0, 1.0, 1.0, 2.0, 2.0])
    u = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0,
                  2.0])
    ours, openood = ood_metrics(k, u)["fpr95_ood_positive"], openood_v15(k, u, drop_intermediate=True)[0]
    assert ours == pytest.approx(openood_v15(k, u)[0]) and ours < openood


def test_fpr95_keys_do_not_depend_on_positive_and_fpr95_follows_it():
    k, u, _, _ = tied_case(7)
    a, b = ood_metrics(k, u, positive="known"), ood_metrics(k, u, positive="unknown")
    for key in ("fpr95_id_positive", "fpr95_ood_positive", "aupr_in_trapezoid", "aupr_out_trapezoid"):
        assert a[key] == b[key]
    assert a["fpr95"] == a["fpr95_id_positive"] and b["fpr95"] == b["fpr95_ood_positive"]
    assert a["fpr95_id_positive"] != a["fpr95_ood_positive"]  # this case tells them apart
    # swapping the roles of knowns and unknowns swaps the two conventions
    c = ood_metrics(-u, -k)
    assert c["fpr95_id_positive"] == a["fpr95_ood_positive"] and c["fpr95_ood_positive"] == a["fpr95_id_positive"]
    assert c["aupr_in_trapezoid"] == pytest.approx(a["aupr_out_trapezoid"])


def test_hand_computed_with_ties():
    # knowns 1, 1, .5, 0; unknowns 1, .5, 0, 0 (ties across the two sets at every score)
    k, u = [1.0, 1.0, 0.5, 0.0], [1.0, 0.5, 0.0, 0.0]
    m = ood_metrics(k, u)
    # knowns positive, points (recall, precision): (1/2, 2/3) t=1, (3/4, 3/5) t=.5, (1, 1/2) t=0, + (0, 1)
    assert m["aupr_in"] == pytest.approx(0.5 * 2 / 3 + 0.25 * 3 / 5 + 0.25 * 1 / 2)
    assert m["aupr_in_trapezoid"] == pytest.approx(0.5 * (1 + 2 / 3) / 2 + 0.25 * (2 / 3 + 3 / 5) / 2
                                                   + 0.25 * (3 / 5 + 1 / 2) / 2)
    # unknowns positive (score -s): (1/2, 2/3) t=0, (3/4, 3/5) t=-.5, (1, 1/2) t=-1: the same numbers
    assert m["aupr_out_trapezoid"] == pytest.approx(m["aupr_in_trapezoid"])
    # ID+: 95% of knowns needs t = 0, which accepts every unknown; OOD+: 95% of unknowns flagged
    # needs t(-s) = -1, which flags every known
    assert m["fpr95_id_positive"] == 1.0 and m["fpr95_ood_positive"] == 1.0

    k, u = [0.9, 0.8, 0.7, 0.6], [0.95, 0.65, 0.5]
    m = ood_metrics(k, u)
    assert m["fpr95_id_positive"] == pytest.approx(2 / 3)  # t = .6 keeps all knowns, accepts .95, .65
    assert m["fpr95_ood_positive"] == 1.0                  # flagging .95 too means t = .95: every known flagged
    # knowns positive, (recall, precision) from the top: .95 (0, 0); .9 (1/4, 1/2); .8 (1/2, 2/3);
    # .7 (3/4, 3/4); .65 (3/4, 3/5); .6 (1, 4/6)
    ap = 0.25 * 1 / 2 + 0.25 * 2 / 3 + 0.25 * 3 / 4 + 0.25 * 4 / 6
    assert m["aupr_in"] == pytest.approx(ap)
    trap = (0.25 * (0 + 1 / 2) / 2 + 0.25 * (1 / 2 + 2 / 3) / 2 + 0.25 * (2 / 3 + 3 / 4) / 2
            + 0.25 * (3 / 5 + 4 / 6) / 2)  # recall 0 -> 0: (0, 1) to (0, 0) adds no area
    assert m["aupr_in_trapezoid"] == pytest.approx(trap)


def test_every_key_is_documented_in_metric_keys():
    k, u, kl, kp = tied_case(3)
    m = ood_metrics(k, u, known_preds=kp, known_labels=kl, unknown_preds=np.zeros(u.size, int))
    assert set(m) == set(METRIC_KEYS)
    assert [ccr_key(a) for a in CCR_FPR_LEVELS] == ["ccr_fpr_1e-04", "ccr_fpr_1e-03", "ccr_fpr_1e-02",
                                                    "ccr_fpr_1e-01"]


# ----------------------------------------------------------------------------- CCR@FPR
def brute_ccr(k, correct, u, level):
    """CCR at the lowest threshold (among +inf and every score) with P(unknown >= t) <= level."""
    best = 0.0
    for t in [np.inf, *sorted(set(k) | set(u), reverse=True)]:
        if np.mean(u >= t) <= level + 1e-12:
            best = np.mean(correct & (k >= t))  # lower thresholds only accept more
    return best


@pytest.mark.parametrize("seed", range(6))
def test_ccr_at_fpr_brute_force(seed):
    k, u, kl, kp = tied_case(seed)
    correct = kp == kl
    levels = [0.0, 1e-4, 0.05, 0.1, 1 / u.size, 3 / u.size, 0.5, 0.999, 1.0]
    for level in levels:
        assert ccr_at_fpr(k, correct, u, level) == pytest.approx(brute_ccr(k, correct, u, level), abs=1e-12)
    m = ood_metrics(k, u, known_preds=kp, known_labels=kl)
    for level in CCR_FPR_LEVELS:
        assert m[ccr_key(level)] == pytest.approx(brute_ccr(k, correct, u, level), abs=1e-12)
    assert ccr_at_fpr(k, correct, u, 1.0) == pytest.approx(m["acc"])


def test_ccr_matches_openood_unless_level_times_n_is_an_integer():
    rng = np.random.default_rng(0)
    k, u = rng.normal(1, 1, 200), rng.normal(0, 1, 150)
    correct = rng.random(200) < 0.8
    for level in (1e-4, 1e-3, 1e-2, 0.1, 0.25):  # level * 150 not an integer
        assert ccr_at_fpr(k, correct, u, level) == pytest.approx(openood_ccr(k, correct, u, level), abs=1e-12)
    # level * n = 3: we accept the 3 highest unknowns (FPR = 2%, allowed); OpenOOD only 2
    u_sorted = np.sort(u)[::-1]
    level = 0.02
    assert ccr_at_fpr(k, correct, u, level) == pytest.approx(np.mean(correct & (k > u_sorted[3])))
    assert openood_ccr(k, correct, u, level) == pytest.approx(np.mean(correct & (k > u_sorted[2])))


def test_ccr_hand_computed_and_bad_level():
    k = np.array([5.0, 4.0, 3.0, 2.0])
    correct = np.array([True, False, True, True])
    u = np.array([4.5, 3.0, 1.0, 0.0])
    # FPR <= 1/4 allows u = 4.5 in; t must stay above 3.0 (tied with a known): accepted knowns 5, 4
    assert ccr_at_fpr(k, correct, u, 0.25) == 0.25
    assert ccr_at_fpr(k, correct, u, 0.5) == 0.75     # t = 2: knowns 5, 4, 3, 2 -> 3 correct, unknowns 4.5, 3
    assert ccr_at_fpr(k, correct, u, 0.0) == 0.25     # t > 4.5: only the known 5
    with pytest.raises(MetricInputError, match="level"):
        ccr_at_fpr(k, correct, u, 1.5)


# ----------------------------------------------------------------------------- AURC / E-AURC
def plain_aurc(scores, correct):
    """The widely copied loop: sort by score (descending), risk after each sample, mean."""
    order = np.argsort(-scores, kind="stable")
    errors = np.cumsum(~correct[order])
    return float(np.mean(errors / np.arange(1, scores.size + 1)))


def test_aurc_hand_computed():
    s, c = np.array([3.0, 2.0, 1.0]), np.array([True, False, True])
    assert aurc(s, c) == pytest.approx((0 + 1 / 2 + 1 / 3) / 3)
    assert optimal_aurc(c) == pytest.approx((0 + 0 + 1 / 3) / 3)
    # a tie between a correct and a wrong sample: the two orders give risks (0, 1/2) and (1, 1/2)
    assert aurc(np.array([1.0, 1.0]), np.array([True, False])) == pytest.approx(0.5)
    cov, risk = risk_coverage(np.array([2.0, 1.0, 1.0, 1.0]), np.array([True, False, True, True]))
    assert cov.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert risk == pytest.approx([0, (1 / 3) / 2, (2 / 3) / 3, 1 / 4])


@pytest.mark.parametrize("seed", range(5))
def test_aurc_brute_force_over_tie_orders(seed):
    rng = np.random.default_rng(seed)
    n = 7
    s = rng.integers(0, 3, n).astype(float)  # heavy ties
    c = rng.random(n) < 0.5
    # mean of the plain sorted AURC over every order of the samples (ties broken by that order)
    vals = [plain_aurc(s[list(p)], c[list(p)]) for p in itertools.permutations(range(n))]
    assert aurc(s, c) == pytest.approx(np.mean(vals), abs=1e-12)
    # the optimal AURC is the best over every ranking of the samples
    best = min(plain_aurc(-np.arange(n, dtype=float), c[list(p)]) for p in itertools.permutations(range(n)))
    assert optimal_aurc(c) == pytest.approx(best, abs=1e-12)


def test_aurc_without_ties_is_the_plain_curve_and_in_ood_metrics():
    k, u, kl, kp = tied_case(4)
    k = k + np.random.default_rng(0).normal(0, 1e-3, k.size)  # break the ties
    correct = kp == kl
    m = ood_metrics(k, u, known_preds=kp, known_labels=kl)
    assert m["aurc"] == pytest.approx(plain_aurc(k, correct), abs=1e-12)
    assert m["eaurc"] == pytest.approx(m["aurc"] - optimal_aurc(correct), abs=1e-12)
    assert m["eaurc"] >= 0
    # a score ranking every correct sample first reaches the optimum: E-AURC 0
    m = ood_metrics(correct.astype(float), u, known_preds=kp, known_labels=kl)
    assert m["eaurc"] == pytest.approx(0.0, abs=1e-12)


def test_optimal_aurc_tends_to_the_continuous_formula():
    # the widely copied E-AURC code uses r + (1 - r) ln(1 - r), the n -> infinity limit
    r = 0.2
    c = np.r_[np.ones(80_000, bool), np.zeros(20_000, bool)]
    assert optimal_aurc(c) == pytest.approx(r + (1 - r) * np.log(1 - r), abs=1e-4)
