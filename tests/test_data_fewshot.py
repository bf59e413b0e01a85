"""Few-shot splits: k per class, seeded, saved, reused, validated."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from backmix_vlm.data import fewshot_indices, sample_fewshot
from backmix_vlm.errors import DataError

LABELS = [i % 5 for i in range(100)] + [-1] * 7  # 20 per class, plus unlabelled rows


def test_k_per_class_sorted_and_labelled_only():
    idx = fewshot_indices(LABELS, shots=4, seed=0)
    assert idx == sorted(idx) and len(set(idx)) == 20
    assert Counter(LABELS[i] for i in idx) == {c: 4 for c in range(5)}


def test_matches_reference_numpy_draw():
    y = np.asarray(LABELS)
    rng = np.random.default_rng(7)
    ref = sorted(int(i) for c in range(5) for i in rng.choice(np.flatnonzero(y == c), 3, replace=False))
    assert fewshot_indices(LABELS, 3, 7) == ref


def test_seed_changes_the_draw_and_is_reproducible():
    assert fewshot_indices(LABELS, 4, 1) == fewshot_indices(LABELS, 4, 1)
    assert fewshot_indices(LABELS, 4, 1) != fewshot_indices(LABELS, 4, 2)


def test_split_file_written_then_reused(tmp_path):
    f = tmp_path / "splits" / "cifar10_k4_s0.json"
    first = fewshot_indices(LABELS, 4, 0, f, dataset="cifar10")
    rec = json.loads(f.read_text())
    assert rec == {"dataset": "cifar10", "shots": 4, "seed": 0, "num_samples": len(LABELS), "indices": first}
    # a hand-edited file is reused as is: proof that the file, not a re-draw, decides
    rec["indices"] = [0, 1, 2, 3]
    f.write_text(json.dumps(rec))
    assert fewshot_indices(LABELS, 4, 0, f, dataset="cifar10") == [0, 1, 2, 3]


@pytest.mark.parametrize("kw,needle", [({"shots": 8}, "shots: file has 4, this run wants 8"),
                                       ({"seed": 3}, "seed: file has 0, this run wants 3"),
                                       ({"labels": LABELS[:50]}, "num_samples: file has 107, this run wants 50"),
                                       ({"dataset": "svhn"}, "dataset: file has 'cifar10'")])
def test_mismatching_split_file_is_rejected(tmp_path, kw, needle):
    f = tmp_path / "s.json"
    fewshot_indices(LABELS, 4, 0, f, dataset="cifar10")
    args = {"labels": LABELS, "shots": 4, "seed": 0, "dataset": "cifar10", **kw}
    with pytest.raises(DataError, match=needle) as e:
        fewshot_indices(args["labels"], args["shots"], args["seed"], f, dataset=args["dataset"])
    assert str(f) in str(e.value)


def test_invalid_split_files(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text("{not json")
    with pytest.raises(DataError, match="bad.json.*not a valid split"):
        fewshot_indices(LABELS, 4, 0, f)
    f.write_text(json.dumps({"shots": 4, "seed": 0, "num_samples": len(LABELS), "indices": [0, 999]}))
    with pytest.raises(DataError, match="indices must be integers in 0..106"):
        fewshot_indices(LABELS, 4, 0, f)


def test_small_class_names_the_class_or_takes_all():
    labels = [0] * 10 + [1] * 2
    with pytest.raises(DataError, match=r"class 1 \('dog'\) has 2 image\(s\), fewer than shots=4"):
        sample_fewshot(labels, 4, 0, class_names=["cat", "dog"])
    idx = fewshot_indices(labels, 4, 0, allow_fewer=True)
    assert Counter(labels[i] for i in idx) == {0: 4, 1: 2}


def test_bad_shots():
    with pytest.raises(DataError, match="positive integer"):
        fewshot_indices(LABELS, 0, 0)
