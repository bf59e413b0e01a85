"""Open-set evaluation of a model under training: known test set vs unknown sets.

:class:`OpenSetEvaluator` is the ``evaluate(model, epoch)`` callable the
:class:`~backmix_vlm.engine.trainer.Trainer` runs every ``eval.every`` epochs and at the end
(the trainer knows only that callback's signature, ``engine.trainer.Evaluator``; it never
imports this module).  ``eval`` re-runs it on a saved checkpoint.
It extracts outputs once per dataset (:func:`backmix_vlm.ood.features.extract_outputs`),
scores them with every configured score (fitting the ones that need training statistics,
and running ODIN with the model), and keeps the full result (for ``results.json``) and the
per-sample scores (``scores.safetensors``, so plots never re-run the model).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from safetensors.numpy import load_file, save
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..config import EvalConfig
from ..errors import ConfigError
from ..models.heads import check_head, find_linear_head, head_tolerance
from ..runs import atomic_write_bytes
from ..validation import check_choice
from .evaluate import accuracy, evaluate_open_set, predictions
from .features import extract_outputs, score_images_loader
from .scores import Score, get_score

SCORES_FILE = "scores.safetensors"
LOG_METRICS = ("auroc", "fpr95", "oscr")   # per (unknown set, score) in log.csv


def build_scores(cfg: EvalConfig, std: tuple[float, ...] | list[float] | None = None) -> list[Score]:
    """The configured scores with their ``eval.score_params`` (ODIN steps in pixel space via ``std``)."""
    unknown = sorted(set(cfg.score_params) - set(cfg.scores))
    if unknown:
        raise ConfigError(f"eval.score_params: {', '.join(unknown)} not in eval.scores ({', '.join(cfg.scores)})")
    scores = []
    for name in cfg.scores:
        params = dict(cfg.score_params.get(name, {}))
        if name == "odin" and std is not None:
            params.setdefault("std", list(std))
        scores.append(get_score(name, **params))
    return scores


def needs_fit(score: Score) -> bool:
    return score.requires_fit()


class OpenSetEvaluator:
    """Closed-set accuracy + open-set metrics of a model, as a Trainer ``evaluate`` callback.

    ``known`` is the known-class test set (labels = training label ids), ``unknowns`` maps a
    display name to each unknown set, ``fit_set`` is the training set under the eval
    transform, or a function that builds it (only used when a score has to be fit, e.g.
    Mahalanobis).
    """

    def __init__(self, known: Dataset, unknowns: Mapping[str, Dataset], cfg: EvalConfig, *,
                 device: torch.device | str, precision: str = "no", fit_set: Dataset | Callable[[], Dataset] | None = None,
                 std: tuple[float, ...] | list[float] | None = None,
                 extra_known: Mapping[str, Dataset] | None = None) -> None:
        check_choice(cfg.positive, ("known", "unknown"), "eval.positive")
        self.known, self.unknowns, self.cfg = known, dict(unknowns), cfg
        self.extra_known = dict(extra_known or {})  # known classes under a shift: closed-set accuracy
        self.device, self.precision, self.fit_set = torch.device(device), precision, fit_set
        self.scores = build_scores(cfg, std)
        fitted = [s.name for s in self.scores if needs_fit(s)]
        if fitted and fit_set is None:
            raise ConfigError(f"eval.scores {', '.join(fitted)} must be fit on the training set, which was not given")
        # what the scores read (CLIP adapters add cosine / local_cosine for MCM / GL-MCM)
        self.keep = tuple(dict.fromkeys(("logits", "features", *(k for s in self.scores for k in s.requires))))
        self.result: dict[str, Any] | None = None
        self.per_sample: dict[str, np.ndarray] = {}

    @property
    def unknown_names(self) -> list[str]:
        """The unknown sets' display names, in evaluation order."""
        return list(self.unknowns)

    @property
    def positive(self) -> str:
        return self.cfg.positive

    def _loader(self, ds: Dataset) -> DataLoader:
        return DataLoader(ds, batch_size=self.cfg.batch_size, shuffle=False, num_workers=self.cfg.num_workers,
                          pin_memory=self.device.type == "cuda")

    def _outputs(self, model: nn.Module, ds: Dataset, desc: str) -> dict[str, torch.Tensor]:
        return extract_outputs(model, self._loader(ds), device=self.device, precision=self.precision,
                               desc=desc, keep=self.keep)

    def _set_heads(self, model: nn.Module, known: Mapping[str, torch.Tensor]) -> None:
        """ViM / ReAct / ASH re-run the final layer: hand it over, checked against the known logits."""
        if not any(s.needs_head for s in self.scores):
            return
        while isinstance(getattr(model, "module", None), nn.Module):  # DDP / accelerate wrappers
            model = model.module  # type: ignore[assignment]
        head = find_linear_head(model)
        if head is None:
            raise ConfigError(f"eval.scores {', '.join(s.name for s in self.scores if s.needs_head)} re-run the "
                              f"model's final linear layer, and {type(model).__name__} has none")
        check_head(head, known, rtol=head_tolerance(self.precision))
        for s in self.scores:
            if s.needs_head:
                s.set_head(head)

    def __call__(self, model: nn.Module, epoch: int = 0) -> dict[str, float]:
        """Evaluate ``model`` (already in eval mode) and return the log summary."""
        known = self._outputs(model, self.known, "known")
        unknowns = {name: self._outputs(model, ds, name) for name, ds in self.unknowns.items()}
        self._set_heads(model, known)
        if any(needs_fit(s) for s in self.scores):
            if callable(self.fit_set) and not isinstance(self.fit_set, Dataset):
                self.fit_set = self.fit_set()
            train_out = self._outputs(model, self.fit_set, "fit")
            for s in self.scores:
                if needs_fit(s):
                    s.fit(train_out)
        extra = {}
        for s in self.scores:
            if s.needs_model:  # ODIN: input perturbation through the model
                run = lambda ds, d: score_images_loader(s, model, self._loader(ds), device=self.device,  # noqa: E731
                                                        precision=self.precision, desc=d)
                extra[s.name] = (run(self.known, f"{s.name} known"),
                                 {n: run(ds, f"{s.name} {n}") for n, ds in self.unknowns.items()})
        self.result = evaluate_open_set(known, unknowns, [s for s in self.scores if not s.needs_model],
                                        positive=self.cfg.positive, extra_scores=extra)
        self.result["epoch"] = epoch
        if self.extra_known:
            self.result["extra_known"] = {name: {"acc": accuracy(self._outputs(model, ds, name))}
                                          for name, ds in self.extra_known.items()}
        self.per_sample = per_sample_scores(known, unknowns, self.scores, extra)
        return summarize(self.result)


def per_sample_scores(known: Mapping[str, torch.Tensor], unknowns: Mapping[str, Mapping[str, torch.Tensor]],
                      scores: list[Score], extra: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flat ``{"known::<score>": [N], "unknown::<set>::<score>": [M], "known::labels", ...}``."""
    out: dict[str, np.ndarray] = {"known::labels": known["labels"].numpy().astype(np.int64)}
    preds = predictions(known)
    if preds is not None:
        out["known::preds"] = preds.numpy().astype(np.int64)
    for s in scores:
        if s.name in extra:
            ks, us = extra[s.name]
        else:
            ks, us = s.score(known), {n: s.score(u) for n, u in unknowns.items()}
        out[f"known::{s.name}"] = ks.float().numpy()
        for n in unknowns:
            out[f"unknown::{n}::{s.name}"] = us[n].float().numpy()
    return out


def summarize(result: Mapping[str, Any]) -> dict[str, float]:
    """Log columns: ``test_acc`` and ``<metric>/<unknown set>/<score>`` for :data:`LOG_METRICS`."""
    row: dict[str, float] = {}
    if result.get("acc") is not None:
        row["test_acc"] = float(result["acc"])
    for name, res in result.get("extra_known", {}).items():
        if res.get("acc") is not None:
            row[f"acc/{name}"] = float(res["acc"])
    for ood, per_score in result["results"].items():
        for score, metrics in per_score.items():
            for m in LOG_METRICS:
                if metrics.get(m) is not None:
                    row[f"{m}/{ood}/{score}"] = float(metrics[m])
    return row


def save_scores(path: str | Path, per_sample: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
    """Per-sample scores as safetensors (``meta`` as JSON strings in the header)."""
    arrays = {k: np.ascontiguousarray(v) for k, v in per_sample.items()}
    atomic_write_bytes(path, save(arrays, metadata={k: json.dumps(v) for k, v in meta.items()}))


def load_scores(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Inverse of :func:`save_scores`: (arrays, metadata)."""
    from safetensors import safe_open

    arrays = load_file(str(path))
    with safe_open(str(path), framework="numpy") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    return arrays, meta
