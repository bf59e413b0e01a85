"""Open-set evaluation of a model under training: known test set vs unknown sets.

:class:`OpenSetEvaluator` is the ``evaluate(model, epoch)`` callable the
:class:`~backmix_vlm.engine.trainer.Trainer` runs every ``eval.every`` epochs and at the end
(the trainer knows only that callback's signature, ``engine.trainer.Evaluator``; it never
imports this module).  ``eval`` re-runs it on a saved checkpoint, split over the processes of a
launch.  One :class:`~backmix_vlm.ood.pipeline.ScoringPipeline` pass gives the full result
(for ``results.json``) and the per-sample scores (``scores.safetensors``, so plots never re-run
the model).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from safetensors.numpy import load_file, save
from torch import nn
from torch.utils.data import Dataset

from ..config import EvalConfig
from ..errors import ConfigError
from ..models.heads import check_head, find_linear_head, head_tolerance
from ..atomic import atomic_write_bytes
from ..validation import check_choice
from .pipeline import ScoringPipeline, SetOutputs
from .scores import Score, ScoreSetup, build_scores as build_named_scores
from .shards import SINGLE, Processes

SCORES_FILE = "scores.safetensors"
LOG_METRICS = ("auroc", "fpr95", "oscr")   # per (unknown set, score) in log.csv
#: what a trained model's evaluation offers the scores' setup (ScoreSetup fields)
TRAINED_MODEL_OFFERS = ("train", "head", "forward")


def build_scores(cfg: EvalConfig, std: Sequence[float] | None = None, *, offers: Sequence[str] | None = None,
                 job: str = "this evaluation") -> list[Score]:
    """The configured scores with their ``eval.score_params`` (ODIN steps in pixel space via ``std``)."""
    return build_named_scores(cfg.scores, cfg.score_params, std=std, offers=offers, job=job)


class OpenSetEvaluator:
    """Closed-set accuracy + open-set metrics of a model, as a Trainer ``evaluate`` callback.

    ``known`` is the known-class test set (labels = training label ids), ``unknowns`` maps a
    display name to each unknown set, ``fit_set`` is the training set under the eval
    transform, or a function that builds it (built once, on the first evaluation that needs it:
    scores fit on training features, e.g. Mahalanobis).  ``processes``: split the evaluation
    over a launch's processes (every process calls the evaluator; only the main one gets results).
    """

    def __init__(self, known: Dataset, unknowns: Mapping[str, Dataset], cfg: EvalConfig, *,
                 device: torch.device | str, precision: str = "no", fit_set: Dataset | Callable[[], Dataset] | None = None,
                 std: Sequence[float] | None = None, extra_known: Mapping[str, Dataset] | None = None,
                 processes: Processes = SINGLE) -> None:
        check_choice(cfg.positive, ("known", "unknown"), "eval.positive")
        self.known, self.unknowns, self.cfg = known, dict(unknowns), cfg
        self.extra_known = dict(extra_known or {})  # known classes under a shift: closed-set accuracy
        self.device, self.precision = torch.device(device), precision
        offers = TRAINED_MODEL_OFFERS if fit_set is not None else tuple(o for o in TRAINED_MODEL_OFFERS if o != "train")
        self.scores = build_scores(cfg, std, offers=offers, job="this evaluation (no training set given)")
        self.fit_set: Callable[[], Dataset] | None = None
        if fit_set is not None:
            self.fit_set = functools.cache(fit_set if callable(fit_set) and not isinstance(fit_set, Dataset)
                                           else lambda: fit_set)
        self.pipeline = ScoringPipeline(self.scores, device=self.device, precision=precision,
                                        batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                        positive=cfg.positive, processes=processes, table=cfg.table())
        self.result: dict[str, Any] | None = None
        self.per_sample: dict[str, np.ndarray] = {}

    @property
    def unknown_names(self) -> list[str]:
        """The unknown sets' display names, in evaluation order."""
        return list(self.unknowns)

    @property
    def positive(self) -> str:
        return self.cfg.positive

    def _prepare(self, model: nn.Module) -> Callable[[SetOutputs], ScoreSetup]:
        def prepare(sets: SetOutputs) -> ScoreSetup:
            return ScoreSetup(train=sets.train, head=self._head(model, sets.known), forward=model)
        return prepare

    def _head(self, model: nn.Module, known: Mapping[str, torch.Tensor]) -> Any:
        """ViM / ReAct / ASH re-run the final layer: found in the model, checked against the known logits."""
        users = [s.name for s in self.scores if "head" in s.uses]
        if not users:
            return None
        while isinstance(getattr(model, "module", None), nn.Module):  # DDP / accelerate wrappers
            model = model.module  # type: ignore[assignment]
        head = find_linear_head(model)
        if head is None:
            raise ConfigError(f"eval.scores {', '.join(users)} re-run the model's final linear layer, and "
                              f"{type(model).__name__} has none")
        check_head(head, known, rtol=head_tolerance(self.precision))
        return head

    def __call__(self, model: nn.Module, epoch: int = 0) -> dict[str, float]:
        """Evaluate ``model`` (already in eval mode) and return the log summary (empty off the main process)."""
        done = self.pipeline.run(model, self.known, self.unknowns, train=self.fit_set, prepare=self._prepare(model),
                                 extra_known=self.extra_known)
        if done is None:
            self.result, self.per_sample = None, {}
            return {}
        self.result = done.scored.results()
        self.result["epoch"] = epoch
        if self.extra_known:
            self.result["extra_known"] = {name: {"acc": acc} for name, acc in done.extra_known.items()}
        self.per_sample = done.scored.per_sample()
        return summarize(self.result)


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
