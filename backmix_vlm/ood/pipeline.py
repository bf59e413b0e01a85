"""One scoring pass: every set's outputs once, every score's setup once, every (set, score) once.

:meth:`ScoringPipeline.run` is the evaluation of every job (the train-run callback and ``eval``
through :class:`~backmix_vlm.ood.open_set.OpenSetEvaluator`, the ``ood`` job through
:class:`~backmix_vlm.ood.evaluator.Evaluator`, the ``zeroshot`` job directly):

1. **outputs**: one forward pass over each set (known, unknown sets, the training set when a
   score or the job needs it, extra known sets), cached on disk when the job names a file;
2. **setup** (main process): the job's ``prepare`` turns the outputs into a
   :class:`~backmix_vlm.ood.scores.ScoreSetup` (training outputs, head, model, text encoder),
   then each score's ``setup`` runs once;
3. **image scores**: scores that run the model (``forward`` in ``uses``: ODIN) run over each set;
4. **postprocess** (main process): each score once per set -> :class:`~backmix_vlm.ood.evaluate.Scored`,
   from which the metric tables, ``scores.safetensors`` and the plots derive.

Steps 1 and 3 split each set into blocks of whole batches over the processes of a launch
(:mod:`backmix_vlm.ood.shards`) and gather them on the main process in dataset order, so every
number equals the one-process run; the other processes get ``None``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from safetensors.torch import load_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from ..errors import BackmixError, ConfigError, DataError
from .evaluate import KNOWN, Scored, accuracy, score_outputs
from .features import extract_outputs, image_scores_loader, save_outputs
from .scores import Score, ScoreSetup
from .shards import SINGLE, Processes

Outputs = dict[str, Tensor]
TRAIN = "train"


@dataclass
class SetOutputs:
    """The outputs of one evaluation's sets (main process), as ``prepare`` sees them."""

    known: Outputs
    unknowns: dict[str, Outputs]
    train: Outputs | None = None


class ScoringPipeline:
    """Scores ``scores`` (built, not yet set up) on a model's sets; see the module docstring.

    ``keep``: the output fields to extract (default: logits, features and what the scores
    read); ``cache(name, dataset)``: a cache file per set (or None); ``processes``: this
    process among the launch's (default: one process); ``table``: the results' table settings
    (``EvalConfig.table()``).
    """

    def __init__(self, scores: Sequence[Score], *, device: torch.device | str, precision: str = "no",
                 batch_size: int = 128, num_workers: int = 0, keep: tuple[str, ...] | None = None,
                 positive: str = "known", cache: Callable[[str, Dataset], Path | None] | None = None,
                 processes: Processes = SINGLE, table: dict[str, Any] | None = None) -> None:
        self.scores = list(scores)
        self.device, self.precision = torch.device(device), precision
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.keep = keep or tuple(dict.fromkeys(("logits", "features", *(k for s in self.scores for k in s.requires
                                                                          if k not in ("labels", s.name)))))
        self.positive, self.cache, self.processes, self.table = positive, cache, processes, table

    @property
    def uses_train(self) -> bool:
        return any("train" in s.uses for s in self.scores)

    # ----------------------------------------------------------------- split forward passes
    def _loader(self, ds: Dataset) -> DataLoader:
        return DataLoader(ds, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          pin_memory=self.device.type == "cuda", persistent_workers=False)

    def _part(self, ds: Dataset) -> Dataset:
        n = len(ds)  # type: ignore[arg-type]
        if n == 0:
            raise DataError(f"{getattr(ds, 'name', type(ds).__name__)}: the evaluation set is empty")
        return ds if self.processes.world == 1 else Subset(ds, list(self.processes.span(n, self.batch_size)))

    def _join(self, part: Any) -> list[Any] | None:
        parts = self.processes.gather(part)
        return None if parts is None else [p for p in parts if p is not None]

    def outputs(self, forward: Callable[[Tensor], Any], name: str, ds: Dataset) -> Outputs | None:
        """``ds``'s outputs (full on the main process, None elsewhere); each process runs its batches."""
        path = self.cache(name, ds) if self.cache is not None else None
        procs = self.processes
        if procs.world == 1:
            return extract_outputs(forward, self._loader(ds), device=self.device, precision=self.precision,
                                   cache_path=path, desc=name, keep=self.keep)
        if procs.broadcast(path is not None and Path(path).is_file()):
            return load_file(str(path)) if procs.is_main else None
        part = self._part(ds)
        mine = extract_outputs(forward, self._loader(part), device=self.device, precision=self.precision,
                               desc=name, keep=self.keep) if len(part) else None  # type: ignore[arg-type]
        parts = self._join(mine)
        if parts is None:
            return None
        out = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        if path is not None:
            save_outputs(path, out, name)
        return out

    def image_scores(self, score: Score, name: str, ds: Dataset) -> Tensor | None:
        """A set-up image score over ``ds`` (main process: all samples in order; None elsewhere)."""
        part = self._part(ds)
        mine = image_scores_loader(score, self._loader(part), device=self.device, precision=self.precision,
                                   desc=f"{score.name} {name}") if len(part) else None  # type: ignore[arg-type]
        parts = self._join(mine)
        return None if parts is None else torch.cat(parts)

    # ----------------------------------------------------------------- the pass
    def run(self, forward: Callable[[Tensor], Any], known: Dataset, unknowns: Mapping[str, Dataset], *,
            train: Dataset | Callable[[], Dataset] | None = None,
            prepare: Callable[[SetOutputs], ScoreSetup] | None = None,
            need_train: Callable[[Outputs], bool] | None = None,
            image_forward: Callable[[Any], Callable[[Tensor], Any]] | None = None,
            extra_known: Mapping[str, Dataset] | None = None, closed_set: bool = True) -> "Evaluation | None":
        """Score every set once; returns the :class:`Evaluation` on the main process, else None.

        ``prepare(outputs) -> ScoreSetup``: the job's setup inputs (may replace logits, e.g. a
        linear probe's); default: the training outputs and ``forward``.  ``need_train(known)``:
        whether the job itself needs the training outputs (the ood job's probe).
        ``image_forward(head)``: the model image scores run, given ``ScoreSetup.head``
        (default: ``forward``).
        """
        procs = self.processes
        image = [s for s in self.scores if "forward" in s.uses]
        known_out = self.outputs(forward, KNOWN, known)
        unknown_out = {name: self.outputs(forward, name, ds) for name, ds in unknowns.items()}
        wants_train = self.uses_train or (need_train is not None and procs.broadcast(
            bool(need_train(known_out)) if procs.is_main else None))  # type: ignore[arg-type]
        train_out = None
        if wants_train:
            if train is None:
                raise ConfigError("the evaluation needs the ID training data (scores fit on training features, "
                                  "or a linear probe), which was not given; give train_data (config: train:)")
            train_ds = train() if callable(train) and not isinstance(train, Dataset) else train
            train_out = self.outputs(forward, TRAIN, train_ds)
        extra = {name: self.outputs(forward, name, ds) for name, ds in (extra_known or {}).items()}

        setup: ScoreSetup | None = None
        failed: str | None = None
        if procs.is_main:
            sets = SetOutputs(known_out, unknown_out, train_out)  # type: ignore[arg-type]
            try:
                setup = prepare(sets) if prepare is not None else ScoreSetup(train=train_out, forward=forward)
                if image_forward is not None:
                    setup = replace(setup, forward=image_forward(setup.head))
                for s in self.scores:
                    s.setup(setup)
            except BaseException as e:
                failed = f"{type(e).__name__}: {e}"
                procs.broadcast((None, failed))
                raise
        if procs.world > 1:
            head, failed = procs.broadcast((setup.head if setup is not None else None, failed))
            if failed is not None:
                raise BackmixError(f"the main process failed to set up the scores: {failed}")
            if not procs.is_main:
                fwd = image_forward(head) if image_forward is not None else forward
                for s in image:
                    s.setup(ScoreSetup(head=head, forward=fwd))
        for s in image:
            values = {KNOWN: self.image_scores(s, KNOWN, known),
                      **{name: self.image_scores(s, name, ds) for name, ds in unknowns.items()}}
            if procs.is_main:
                known_out[s.name] = values[KNOWN]  # type: ignore[index]
                for name in unknowns:
                    unknown_out[name][s.name] = values[name]  # type: ignore[index]
        if not procs.is_main:
            return None
        scored = score_outputs(known_out, unknown_out, self.scores, positive=self.positive,  # type: ignore[arg-type]
                               closed_set=closed_set, table=self.table)
        for s in image:  # the image scores' values are not model outputs
            for out in (known_out, *unknown_out.values()):
                out.pop(s.name, None)  # type: ignore[union-attr]
        return Evaluation(scored, known_out, unknown_out, train_out,  # type: ignore[arg-type]
                          {name: accuracy(out) for name, out in extra.items()})  # type: ignore[arg-type]


@dataclass
class Evaluation:
    """What one pass leaves on the main process: the per-sample scores and the outputs they came from."""

    scored: Scored
    known: Outputs
    unknowns: dict[str, Outputs]
    train: Outputs | None
    extra_known: dict[str, float | None]
