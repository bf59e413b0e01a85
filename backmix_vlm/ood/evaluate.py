"""Per-sample scores of every (set, score), computed once, and everything derived from them.

:func:`score_outputs` runs each set-up score's ``postprocess`` once per set and returns a
:class:`Scored`; its :meth:`Scored.results` is the metric table (the input of
``report.tables``) and :meth:`Scored.per_sample` the arrays of ``scores.safetensors`` (which
the plots read), so the table, the saved scores and the plots come from one computation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from .metrics import MetricInputError, ood_metrics
from .scores import Score

Outputs = Mapping[str, Tensor]
KNOWN = "known"   # the known set's key in Scored.scores / .preds


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


@dataclass
class Scored:
    """Every (set, score)'s per-sample scores of one evaluation, higher = more likely known.

    ``scores[set][score]`` with ``set`` = ``"known"`` or an unknown set's name; ``labels``: the
    known set's labels; ``preds[set]``: argmax of each set's logits; ``closed_set``: whether the
    labels index the logits' classes (accuracy, OSCR and macro-F1 are reported only then);
    ``table``: what the Markdown tables of the results show (``EvalConfig.table()``; None: the
    defaults), carried in the results as ``"table"``.
    """

    scores: dict[str, dict[str, Tensor]]
    labels: Tensor | None
    preds: dict[str, Tensor | None]
    counts: dict[str, int]
    positive: str = "known"
    closed_set: bool = True
    score_names: list[str] = field(default_factory=list)
    #: stream scores (AdaNeg): ``streams[unknown set][score]`` = that set's stream (indices, scores, info)
    streams: dict[str, dict[str, Any]] = field(default_factory=dict)
    table: dict[str, Any] | None = None

    @property
    def unknown_names(self) -> list[str]:
        return [name for name in self.scores if name != KNOWN]

    @property
    def set_score_names(self) -> list[str]:
        """The scores computed once per set (not per stream): those with ``known::<score>`` arrays."""
        streamed = {n for per in self.streams.values() for n in per}
        return [n for n in self.score_names if n not in streamed]

    def results(self) -> dict[str, Any]:
        """Every metric for every (unknown set, score): ``{"acc", "positive", "counts", "results":
        {set: {score: metrics}}}``; accuracy, OSCR and macro-F1 need logits and known labels."""
        labels = self.labels if self.closed_set else None
        known_preds = self.preds.get(KNOWN) if labels is not None else None
        acc = None if known_preds is None else float((known_preds.cpu() == labels.cpu()).double().mean())  # type: ignore[union-attr]
        result: dict[str, Any] = {"acc": acc, "positive": self.positive, "counts": {KNOWN: self.counts[KNOWN]},
                                  "results": {}}
        if self.table is not None:
            result["table"] = dict(self.table)
        for ood in self.unknown_names:
            result["counts"][ood] = self.counts[ood]
            unknown_preds = self.preds.get(ood) if known_preds is not None else None
            result["results"][ood] = {}
            for name in self.score_names:
                st = self.streams.get(ood, {}).get(name)
                if st is None:
                    result["results"][ood][name] = ood_metrics(
                        self.scores[KNOWN][name], self.scores[ood][name], known_preds=known_preds,
                        known_labels=labels, unknown_preds=unknown_preds, positive=self.positive)
                    continue
                ki, ui = st.known_index, st.unknown_index
                result["results"][ood][name] = ood_metrics(
                    st.known, st.unknown, known_preds=None if known_preds is None else known_preds[ki],
                    known_labels=None if labels is None else labels[ki],
                    unknown_preds=None if unknown_preds is None else unknown_preds[ui], positive=self.positive)
                result.setdefault("streams", {}).setdefault(ood, {})[name] = dict(st.info)
        return result

    def per_sample(self) -> dict[str, np.ndarray]:
        """Flat ``{"known::labels", "known::preds", "known::<score>", "unknown::<set>::<score>"}``
        (what ``scores.safetensors`` holds); empty without known labels."""
        if self.labels is None:
            return {}
        out: dict[str, np.ndarray] = {"known::labels": self.labels.numpy().astype(np.int64)}
        if self.preds.get(KNOWN) is not None:
            out["known::preds"] = self.preds[KNOWN].numpy().astype(np.int64)  # type: ignore[union-attr]
        for name in self.set_score_names:
            out[f"known::{name}"] = self.scores[KNOWN][name].float().numpy()
            for ood in self.unknown_names:
                out[f"unknown::{ood}::{name}"] = self.scores[ood][name].float().numpy()
        for ood, per in self.streams.items():  # stream scores: each set's stream samples (indices) and scores
            for name, st in per.items():
                for key in ("known_index", "known", "unknown_index", "unknown"):
                    value = getattr(st, key)
                    out[f"stream::{ood}::{name}::{key}"] = value.numpy().astype(np.int64 if key.endswith("index") else np.float32)
        return out


def score_outputs(known: Outputs, unknowns: Mapping[str, Outputs], scores: Sequence[Score], *,
                  positive: str = "known", closed_set: bool = True, table: dict[str, Any] | None = None) -> Scored:
    """``postprocess`` of every (set-up) score on every set, once each."""
    names = [s.name for s in scores]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise MetricInputError(f"scores listed more than once: {', '.join(dupes)}")
    sets = {KNOWN: known, **unknowns}
    counts = {name: _num_samples(out, name) for name, out in sets.items()}
    per_set: dict[str, dict[str, Tensor]] = {name: {} for name in sets}
    streams: dict[str, dict[str, Any]] = {}
    for s in scores:
        if getattr(s, "stream", False):  # AdaNeg: one stream (known + that set) per unknown set
            for name, out in unknowns.items():
                streams.setdefault(name, {})[s.name] = s.score_stream(known, out)  # type: ignore[attr-defined]
            continue
        for name, out in sets.items():
            values = s.postprocess(out)
            if len(values) != counts[name]:
                raise MetricInputError(f"score '{s.name}': {len(values)} scores for the {counts[name]} samples of "
                                       f"'{name}'")
            per_set[name][s.name] = values
    return Scored(per_set, known.get("labels"), {name: predictions(out) for name, out in sets.items()}, counts,
                  positive=positive, closed_set=closed_set, score_names=names, streams=streams, table=table)


def evaluate_open_set(known: Outputs, unknowns: Mapping[str, Outputs], scores: Sequence[Score], *,
                      positive: str = "known") -> dict[str, Any]:
    """Every metric for every (OOD set, score) of set-up ``scores`` on given outputs
    (:func:`score_outputs` then :meth:`Scored.results`)."""
    return score_outputs(known, unknowns, scores, positive=positive).results()


def results_to_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Flatten ``Scored.results()`` into one row per (OOD set, score) (CSV / pandas)."""
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
