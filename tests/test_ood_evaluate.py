"""evaluate_open_set: per-(OOD set, score) metrics equal direct ood_metrics calls; extra scores."""
from __future__ import annotations

import pytest
import torch

from backmix_vlm.errors import ConfigError
from backmix_vlm.ood.evaluate import evaluate_open_set, results_to_rows
from backmix_vlm.ood.metrics import MetricInputError, ood_metrics
from backmix_vlm.ood.scores import get_score


def outputs(n: int, shift: float, seed: int, labels: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 4, generator=g)
    lab = torch.randint(0, 4, (n,), generator=g)
    logits[torch.arange(n), lab] += shift  # knowns: confident and mostly right
    out = {"logits": logits, "features": torch.randn(n, 6, generator=g) + shift}
    if labels:
        out["labels"] = lab
    return out


def test_matches_direct_metrics_for_every_set_and_score():
    known = outputs(40, 3.0, 0)
    unknowns = {"near": outputs(30, 1.0, 1, labels=False), "far": outputs(25, 0.0, 2, labels=False)}
    scores = [get_score("msp"), get_score("energy", temperature=2.0), get_score("featnorm")]
    res = evaluate_open_set(known, unknowns, scores)

    preds = known["logits"].argmax(1)
    assert res["acc"] == pytest.approx((preds == known["labels"]).float().mean().item())
    assert res["counts"] == {"known": 40, "near": 30, "far": 25}
    assert list(res["results"]) == ["near", "far"]
    for name, unk in unknowns.items():
        assert list(res["results"][name]) == ["msp", "energy", "featnorm"]
        for s in scores:
            expected = ood_metrics(s.postprocess(known), s.postprocess(unk), known_preds=preds, known_labels=known["labels"],
                                   unknown_preds=unk["logits"].argmax(1))
            assert res["results"][name][s.name] == expected
            assert {"acc", "oscr", "macro_f1"} <= set(expected)

    rows = results_to_rows(res)
    assert len(rows) == 6 and rows[0]["ood"] == "near" and rows[0]["score"] == "msp"
    assert rows[0]["auroc"] == res["results"]["near"]["msp"]["auroc"] and rows[0]["id_acc"] == res["acc"]


def test_positive_unknown_is_passed_through():
    known, unk = outputs(40, 3.0, 0), {"u": outputs(30, 0.0, 1, labels=False)}
    res = evaluate_open_set(known, unk, [get_score("msp")], positive="unknown")
    s = get_score("msp")
    assert res["positive"] == "unknown"
    assert res["results"]["u"]["msp"]["fpr95"] == ood_metrics(s.postprocess(known), s.postprocess(unk["u"]),
                                                                positive="unknown")["fpr95"]


def test_no_labels_means_no_closed_set_metrics():
    res = evaluate_open_set(outputs(10, 3.0, 0, labels=False), {"u": outputs(8, 0.0, 1)}, [get_score("maxlogit")])
    assert res["acc"] is None
    assert set(res["results"]["u"]["maxlogit"]) == {"auroc", "aupr_in", "aupr_out", "fpr95", "tnr95", "dtacc",
                                                     "fpr95_id_positive", "fpr95_ood_positive", "aupr_in_trapezoid",
                                                     "aupr_out_trapezoid"}


def test_image_score_values_flow_through_postprocess():
    """A score that runs the model (ODIN) reads its per-batch values as the output named after it."""
    known, unknowns = outputs(20, 3.0, 0), {"a": outputs(10, 0.0, 1), "b": outputs(12, 0.0, 2)}
    g = torch.Generator().manual_seed(3)
    k_odin = torch.rand(20, generator=g) + 0.5
    u_odin = {"a": torch.rand(10, generator=g), "b": torch.rand(12, generator=g)}
    with_odin = lambda out, v: {**out, "odin": v}  # noqa: E731
    res = evaluate_open_set(with_odin(known, k_odin), {n: with_odin(u, u_odin[n]) for n, u in unknowns.items()},
                            [get_score("msp"), get_score("odin")])
    preds = known["logits"].argmax(1)
    for name in ("a", "b"):
        assert list(res["results"][name]) == ["msp", "odin"]
        assert res["results"][name]["odin"] == ood_metrics(
            k_odin, u_odin[name], known_preds=preds, known_labels=known["labels"],
            unknown_preds=unknowns[name]["logits"].argmax(1))
    with pytest.raises(ConfigError, match="cannot run on cached outputs"):
        evaluate_open_set(known, unknowns, [get_score("odin")])
    with pytest.raises(MetricInputError, match="5 scores for the 20 samples of 'known'"):
        evaluate_open_set(with_odin(known, k_odin[:5]), unknowns, [get_score("odin")])


def test_errors_from_scores_and_duplicates():
    known, unknowns = outputs(10, 3.0, 0), {"u": outputs(8, 0.0, 1)}
    with pytest.raises(ConfigError, match="needs the model output 'cosine'"):
        evaluate_open_set(known, unknowns, [get_score("mcm")])
    with pytest.raises(MetricInputError, match="more than once: msp"):
        evaluate_open_set(known, unknowns, [get_score("msp"), get_score("msp")])
