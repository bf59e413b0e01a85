"""Seeded k-shot splits, saved as JSON so every run (and resume) trains on the same images."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from ..atomic import atomic_write_text
from ..errors import DataError


def sample_fewshot(labels: Sequence[int], shots: int, seed: int, *, allow_fewer: bool = False,
                   class_names: Sequence[str] | None = None) -> list[int]:
    """``shots`` positions per class (labels < 0 ignored), drawn with ``numpy.random.default_rng(seed)``.

    Classes are visited in increasing label order, each drawing without replacement from its
    positions in dataset order; the result is sorted.  A class with fewer than ``shots``
    images raises :class:`DataError` naming it, unless ``allow_fewer`` (then it gives all it has).
    """
    if int(shots) < 1:
        raise DataError(f"few-shot: shots must be a positive integer, got {shots!r}")
    y = np.asarray(list(labels), dtype=np.int64)
    rng = np.random.default_rng(int(seed))
    chosen: list[int] = []
    for c in np.unique(y[y >= 0]):
        pos = np.flatnonzero(y == c)
        if len(pos) < shots and not allow_fewer:
            label = f"{int(c)} ('{class_names[int(c)]}')" if class_names is not None else str(int(c))
            raise DataError(f"few-shot: class {label} has {len(pos)} image(s), fewer than shots={shots}; "
                            "lower shots or allow fewer (takes every image of such classes)")
        chosen.extend(int(i) for i in rng.choice(pos, size=min(shots, len(pos)), replace=False))
    if not chosen:
        raise DataError("few-shot: no labelled samples to draw from")
    return sorted(chosen)


def fewshot_indices(labels: Sequence[int], shots: int, seed: int, split_file: str | Path | None = None, *,
                    dataset: str | None = None, allow_fewer: bool = False,
                    class_names: Sequence[str] | None = None) -> list[int]:
    """k-shot positions, reused from ``split_file`` when it exists, else drawn and saved there.

    The file is ``{"dataset", "shots", "seed", "num_samples", "indices"}``; an existing file
    whose shots / seed / num_samples (or dataset, when both are given) differ from this call is
    rejected with a :class:`DataError` rather than silently reused.
    """
    labels = list(labels)
    if split_file is not None and Path(split_file).is_file():
        return _load_split(Path(split_file), labels, shots, seed, dataset)
    indices = sample_fewshot(labels, shots, seed, allow_fewer=allow_fewer, class_names=class_names)
    if split_file is not None:
        record = {"dataset": dataset, "shots": int(shots), "seed": int(seed),
                  "num_samples": len(labels), "indices": indices}
        atomic_write_text(split_file, json.dumps(record) + "\n")
    return indices


def _load_split(path: Path, labels: list[int], shots: int, seed: int, dataset: str | None) -> list[int]:
    try:
        record = json.loads(path.read_text())
        stored = {k: record[k] for k in ("shots", "seed", "num_samples", "indices")}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"few-shot split file {path} is not a valid split "
                        f"(expected JSON with shots, seed, num_samples, indices): {e}") from None
    wanted = {"shots": int(shots), "seed": int(seed), "num_samples": len(labels)}
    if dataset is not None and record.get("dataset") is not None:
        stored["dataset"], wanted["dataset"] = record["dataset"], dataset
    diff = [f"{k}: file has {stored[k]!r}, this run wants {v!r}" for k, v in wanted.items() if stored[k] != v]
    if diff:
        raise DataError(f"few-shot split file {path} does not match this run ({'; '.join(diff)}); "
                        "delete it or point split_file elsewhere")
    idx = stored["indices"]
    if not isinstance(idx, list) or not all(isinstance(i, int) and 0 <= i < len(labels) for i in idx):
        raise DataError(f"few-shot split file {path}: indices must be integers in 0..{len(labels) - 1}")
    return list(idx)
