"""Evaluate any classifier for OOD detection in one call.

```python
from backmix_vlm.ood import Evaluator

ev = Evaluator(model, id_data=cifar10_test, ood_sets={"CIFAR-100": c100, "MNIST": mnist},
               train_data=cifar10_train_subset, cache_dir="runs/.cache/features")
results = ev.run(["msp", "energy", "knn", "vim", "react", "ash_s"])
```

``model`` is any ``nn.Module`` (wrapped in :class:`~backmix_vlm.models.classifier.FeatureClassifier`
unless it already returns :class:`ModelOutput` with features); datasets yield ``(image,
label[, index])``.  One forward pass per dataset serves every score: outputs are extracted
once (and cached on disk with ``cache_dir``), training statistics (Mahalanobis, KNN, ViM,
ReAct) are fit on ``train_data``'s outputs, head-based scores (ViM, ReAct, ASH) get the
model's final linear layer (checked against the logits), and a model without a head gets a
linear probe fit on ``train_data``.  ``run`` returns ``evaluate_open_set``'s dict (what
``report.tables.write_results`` renders); ``per_sample`` holds every score per sample.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..errors import ConfigError
from ..models.heads import LinearHead, check_head, find_linear_head, fit_linear_probe, head_info, head_tolerance
from ..models.output import ModelOutput
from .features import cache_file, model_fingerprint
from .pipeline import TRAIN, ScoringPipeline, SetOutputs
from .scores import Score, ScoreSetup, build_scores
from .shards import SINGLE, Processes

Outputs = dict[str, Tensor]
PROBE = "linear_probe"   # fit_linear_probe's head name


def dataset_identity(ds: Any) -> dict[str, Any]:
    """What identifies a dataset's samples for the feature cache (name, size, transform, files)."""
    ident: dict[str, Any] = {"type": type(ds).__name__, "repr": repr(ds), "n": len(ds)}
    for key in ("name", "jpeg_quality", "crop_size"):
        if hasattr(ds, key):
            ident[key] = getattr(ds, key)
    if hasattr(ds, "transform"):
        ident["transform"] = repr(ds.transform)
    records = getattr(ds, "records", None)
    if records is not None and len(ds) and hasattr(records, "where"):
        ident["first"], ident["last"] = records.where(0), records.where(len(records) - 1)
    return ident


class _ProbeForward(nn.Module):
    """``model``'s features through a fitted linear probe: what ODIN perturbs for a headless model."""

    def __init__(self, model: nn.Module, head: LinearHead) -> None:
        super().__init__()
        self.model, self.head = model, head

    def forward(self, x: Tensor) -> ModelOutput:
        out = self.model(x)
        return ModelOutput(logits=self.head(out.features.float()), features=out.features)


class Evaluator:
    """Known (ID) test set vs OOD sets for one model; see the module docstring.

    ``probe``: None = fit a linear probe only when the model has no logits (a headless
    backbone); True = always (replace the model's logits by the probe's); False = never.
    ``head``: the final layer for ViM / ReAct / ASH (default: found in the model, or the probe).
    ``data_ids``: cache identities per dataset name ("known", "train" and each OOD name),
    default :func:`dataset_identity`; ``model_id``: the model's (default: a weight fingerprint).
    ``processes``: split the forward passes over a launch's processes (only the main one gets results).
    ``table``: the results' table settings (``EvalConfig.table()``; None: the defaults).
    """

    def __init__(self, model: nn.Module, id_data: Dataset, ood_sets: Mapping[str, Dataset], *,
                 train_data: Dataset | None = None, device: str | torch.device = "auto", precision: str = "no",
                 batch_size: int = 128, num_workers: int = 0, cache_dir: str | Path | None = None,
                 model_id: Any = None, data_ids: Mapping[str, Any] | None = None, probe: bool | None = None,
                 probe_C: float = 1.0, probe_max_iter: int = 1000, head: LinearHead | None = None,
                 positive: str = "known", std: Sequence[float] | None = None, seed: int = 0,
                 processes: Processes = SINGLE, table: Mapping[str, Any] | None = None) -> None:
        from ..models.classifier import FeatureClassifier
        from ..runtime import resolve_device

        if not ood_sets:
            raise ConfigError("Evaluator: give at least one OOD set")
        self.device = resolve_device(device)
        self.model = model if _gives_features(model) else FeatureClassifier(model)
        self.model.to(self.device).eval()
        self.id_data, self.ood_sets, self.train_data = id_data, dict(ood_sets), train_data
        self.precision, self.batch_size, self.num_workers = precision, int(batch_size), int(num_workers)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._model_id = model_id
        self.data_ids = dict(data_ids or {})
        self.probe, self.probe_C, self.probe_max_iter = probe, float(probe_C), int(probe_max_iter)
        self.head = head
        self.positive, self.std, self.seed = positive, (list(std) if std is not None else None), seed
        self.processes, self.table = processes, (dict(table) if table is not None else None)
        self.result: dict[str, Any] | None = None
        self.per_sample: dict[str, Any] = {}
        self.scores: list[Score] = []

    @property
    def unknown_names(self) -> list[str]:
        """The OOD sets' display names, in evaluation order."""
        return list(self.ood_sets)

    # ----------------------------------------------------------------- outputs
    @property
    def model_id(self) -> Any:
        if self._model_id is None:
            self._model_id = {"type": type(self.model).__name__, "weights": model_fingerprint(self.model)}
        return self._model_id

    def _cache_path(self, name: str, ds: Dataset) -> Path | None:
        if self.cache_dir is None:
            return None
        data_id = self.data_ids.get(name) or dataset_identity(ds)
        return cache_file(self.cache_dir, name, model=self.model_id, data=data_id, precision=self.precision)

    # ----------------------------------------------------------------- scoring
    def build_scores(self, scores: Sequence[str | Score], params: Mapping[str, Mapping[str, Any]] | None = None
                     ) -> list[Score]:
        names = [s for s in scores if isinstance(s, str)]
        built = {s.name: s for s in scores if isinstance(s, Score)}
        params = dict(params or {})
        unknown = sorted(set(params) - set(names) - set(built))
        if unknown:
            raise ConfigError(f"score_params: {', '.join(unknown)} not among the scores "
                              f"({', '.join(s if isinstance(s, str) else s.name for s in scores)})")
        made = iter(build_scores(names, {k: v for k, v in params.items() if k in names}, std=self.std,
                                 where="eval")) if names else iter(())
        return [s if isinstance(s, Score) else next(made) for s in scores]

    def run(self, scores: Sequence[str | Score] = ("msp", "maxlogit", "energy"),
            score_params: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any] | None:
        """Every metric for every (OOD set, score); also fills ``per_sample``, ``head`` and ``scores``
        (on the main process; None elsewhere)."""
        torch.manual_seed(self.seed)
        self.scores = self.build_scores(scores, score_params)
        fitted = [s.name for s in self.scores if "train" in s.uses]
        if fitted and self.train_data is None:
            raise ConfigError(f"{', '.join(fitted)} (fit on training features) needs the ID training data; give "
                              f"train_data (config: train:)")
        state: dict[str, Any] = {}
        pipeline = ScoringPipeline(self.scores, device=self.device, precision=self.precision,
                                   batch_size=self.batch_size, num_workers=self.num_workers,
                                   keep=("logits", "features"), positive=self.positive, cache=self._cache_path,
                                   processes=self.processes, table=self.table)
        done = pipeline.run(self.model, self.id_data, self.ood_sets, train=self.train_data,
                            prepare=lambda sets: self._prepare(sets, state),
                            need_train=lambda known: self._use_probe(known),
                            image_forward=self._image_forward, closed_set=True)
        if done is None:
            self.result, self.per_sample = None, {}
            return None
        use_probe, need_head = state["use_probe"], any("head" in s.uses for s in self.scores)
        scored = done.scored
        scored.closed_set = state["closed_set"]
        self.result = scored.results()
        self.result["head"] = head_info(self.head) if need_head or use_probe else None
        self.result["probe"] = use_probe
        if done.train is not None:
            self.result["counts"][TRAIN] = int(done.train["features"].shape[0])
            if use_probe and done.train.get("labels") is not None:
                self.result["probe_train_acc"] = float((done.train["logits"].argmax(-1) == done.train["labels"])
                                                       .double().mean())
        self.per_sample = scored.per_sample()
        return self.result

    def _use_probe(self, known: Outputs) -> bool:
        return (known.get("logits") is None) if self.probe is None else bool(self.probe)

    def _image_forward(self, head: LinearHead | None) -> nn.Module:
        """What ODIN perturbs: the model, or its features through the linear probe."""
        return _ProbeForward(self.model, head) if head is not None and head.name == PROBE else self.model

    def _prepare(self, sets: SetOutputs, state: dict[str, Any]) -> ScoreSetup:
        """The head (the model's, or a linear probe fit on the training outputs) and the training outputs."""
        known, train = sets.known, sets.train
        use_probe = state["use_probe"] = self._use_probe(known)
        need_head = any("head" in s.uses for s in self.scores)
        if use_probe:
            if train is None:
                raise ConfigError("a linear probe (the model has no classifier head) needs the ID training data; "
                                  "give train_data (config: train:)")
            if train.get("labels") is None:
                raise ConfigError("the training data yields no labels; the linear probe needs them")
            self.head = fit_linear_probe(train["features"], train["labels"], C=self.probe_C,
                                         max_iter=self.probe_max_iter, seed=self.seed)
            for out in (known, train, *sets.unknowns.values()):
                out["logits"] = self.head(out["features"].float())
        elif known.get("logits") is None:
            raise ConfigError("the model gives no logits (no classifier head) and probe is off; enable the "
                              "linear probe (probe: true) or name the head layer (model.head_layer)")
        elif need_head and self.head is None:
            find = getattr(self.model, "linear_head", None)
            self.head = find() if callable(find) else None
            if self.head is None:
                self.head = find_linear_head(self.model)
            if self.head is None:
                raise ConfigError(", ".join(s.name for s in self.scores if "head" in s.uses) + " re-run the "
                                  "model's final linear layer; none was found: set model.head_layer (its name in "
                                  "model.named_modules()) or use probe: true")
        if train is not None and train.get("labels") is None and any(s.name == "mahalanobis" for s in self.scores):
            raise ConfigError("the training data yields no labels; the linear probe and mahalanobis need them")
        if need_head and self.head is not None:
            check_head(self.head, known, rtol=head_tolerance(self.precision))
        # accuracy only when the logits are over the ID classes (not e.g. ImageNet logits on CIFAR-10)
        labels = known.get("labels")
        classes = getattr(self.id_data, "classes", None)
        k = known["logits"].shape[-1]
        state["closed_set"] = not (labels is not None and ((classes is not None and len(classes) != k)
                                                           or int(labels.max()) >= k))
        head = self.head if (need_head or use_probe) else None
        return ScoreSetup(train=train, head=head, forward=self._image_forward(head))


def _gives_features(model: nn.Module) -> bool:
    """Toolkit models (CNNs with a CAM head, adapters) already return ModelOutput with features."""
    from ..models.classifier import FeatureClassifier
    from ..models.cnn import CamClassifier

    return isinstance(model, (FeatureClassifier, CamClassifier))
