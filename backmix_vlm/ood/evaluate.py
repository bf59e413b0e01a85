"""Known set vs unknown sets -> one results dict (the input of ``report.tables``).

Everything here works on cached outputs (:func:`~backmix_vlm.ood.features.extract_outputs`),
so each dataset is encoded once and every score and OOD set reuses it.  Scores that need
the model (ODIN) are computed by the runner and handed in as ``extra_scores``; they then
go through exactly the same metric and table path.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from .metrics import MetricInputError, ood_metrics
from .scores import Score

Outputs = Mapping[str, Tensor]
ExtraScores = Mapping[str, tuple[Tensor, Mapping[str, Tensor]]]


def predictions(outputs: Outputs) -> Tensor | None:
    """Closed-set predictions (argmax of the logits), or None without logits."""
    logits = outputs.get("logits")
    return None if logits is None else logits.argmax(dim=-1)


def accuracy(outputs: Outputs) -> float | None:
    """Closed-set accuracy of ``outputs`` (needs ``logits`` and ``labels``)."""
    preds, labels = predictions(outputs), outputs.get("labels")
    if preds is None or labels is None:
        return None
    return float((preds.cpu() == labels.cpu()).double().mean())


def evaluate_open_set(
    known: Outputs,
    unknowns: Mapping[str, Outputs],
    scores: Sequence[Score],
    *,
    positive: str = "known",
    extra_scores: ExtraScores | None = None,
) -> dict[str, Any]:
    """Every metric for every (OOD set, score) pair.

    ``known`` / ``unknowns[name]`` are output dicts (``logits``, ``features``, ..., and
    ``labels`` for the knowns).  ``scores`` must already be fit (Mahalanobis).
    ``extra_scores[score_name] = (known_scores, {ood_name: unknown_scores})`` supplies
    precomputed scores (ODIN with the model); it overrides a listed score of that name and
    adds a row otherwise.  Closed-set predictions are the argmax of the logits, so
    ``acc``, ``oscr`` and ``macro_f1`` appear whenever logits and known labels are there.

    Returns ``{"acc": float | None, "positive": str, "counts": {"known": n, ood: m, ...},
    "results": {ood_name: {score_name: metrics_dict}}}``.
    """
    extra = dict(extra_scores or {})
    names = [s.name for s in scores]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise MetricInputError(f"scores listed more than once: {', '.join(dupes)}")
    n_known = _num_samples(known, "known")

    known_scores: dict[str, Tensor] = {}
    for s in scores:
        known_scores[s.name] = extra[s.name][0] if s.name in extra else s.score(known)
    for name, (ks, _) in extra.items():
        known_scores[name] = ks
    for name, ks in known_scores.items():
        if len(ks) != n_known:
            raise MetricInputError(f"score '{name}': {len(ks)} known scores for {n_known} known samples")

    known_preds, known_labels = predictions(known), known.get("labels")
    if known_labels is None:
        known_preds = None
    result: dict[str, Any] = {
        "acc": accuracy(known),
        "positive": positive,
        "counts": {"known": n_known},
        "results": {},
    }
    by_name = {s.name: s for s in scores}
    for ood_name, unk in unknowns.items():
        result["counts"][ood_name] = _num_samples(unk, ood_name)
        unknown_preds = predictions(unk) if known_preds is not None else None
        per_score: dict[str, dict[str, float]] = {}
        for name, ks in known_scores.items():
            if name in extra:
                if ood_name not in extra[name][1]:
                    raise MetricInputError(f"extra_scores['{name}'] has no scores for OOD set '{ood_name}'")
                us = extra[name][1][ood_name]
            else:
                us = by_name[name].score(unk)
            per_score[name] = ood_metrics(
                ks, us, known_preds=known_preds, known_labels=known_labels,
                unknown_preds=unknown_preds, positive=positive,
            )
        result["results"][ood_name] = per_score
    return result


def results_to_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Flatten ``evaluate_open_set``'s dict into one row per (OOD set, score) (CSV / pandas)."""
    return [
        {"ood": ood_name, "score": score_name, "id_acc": results.get("acc"), **metrics}
        for ood_name, per_score in results["results"].items()
        for score_name, metrics in per_score.items()
    ]


def _num_samples(outputs: Outputs, where: str) -> int:
    for value in outputs.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise MetricInputError(f"outputs of '{where}' hold no tensors")
