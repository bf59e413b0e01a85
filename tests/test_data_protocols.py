"""Open-set protocols (ARPL / Neal et al. splits) and OOD benchmark tables."""
from __future__ import annotations

import pytest

from backmix_vlm.config import DataSource
from backmix_vlm.data import (OOD_BENCHMARKS, build_dataset, class_names, get_protocol, list_protocols, ood_sources,
                              protocol_info)
from backmix_vlm.errors import DataError

SIZES = {"cifar10": (6, 4, 10, 10), "svhn": (6, 4, 10, 10), "mnist": (6, 4, 10, 10),
         "cifar+10": (4, 10, 10, 100), "cifar+50": (4, 50, 10, 100), "tinyimagenet": (20, 180, 200, 200)}


def test_list_protocols():
    assert list_protocols() == sorted(SIZES)


@pytest.mark.parametrize("name", sorted(SIZES))
def test_every_split_has_the_right_sizes(name):
    n_known, n_unknown, k_classes, u_classes = SIZES[name]
    assert len(protocol_info(name)["splits"]) == 5
    for s in range(5):
        p = get_protocol(name, s)
        assert (len(p.known), len(p.unknown), p.split) == (n_known, n_unknown, s)
        assert len(set(p.known)) == n_known and len(set(p.unknown)) == n_unknown
        assert all(0 <= c < k_classes for c in p.known) and all(0 <= c < u_classes for c in p.unknown)
        if p.known_dataset == p.unknown_dataset:  # closed label space: a partition
            assert set(p.known) | set(p.unknown) == set(range(k_classes)) and not set(p.known) & set(p.unknown)


def test_exact_arpl_lists():
    # spot checks against ARPL split.py (splits_2020), first and last split of each
    assert get_protocol("cifar10", 0).known == [0, 6, 4, 9, 1, 7]
    assert get_protocol("cifar10", 4).known == [2, 4, 1, 7, 9, 6]
    assert get_protocol("svhn", 0).known == [5, 3, 7, 2, 8, 6]
    assert get_protocol("svhn", 0).unknown == [0, 1, 4, 9]
    assert get_protocol("cifar+10", 0).unknown == [30, 25, 1, 9, 8, 0, 46, 52, 49, 71]
    assert get_protocol("cifar+50", 4).unknown[:5] == [47, 6, 19, 0, 62]
    assert get_protocol("tinyimagenet", 0).known[:5] == [108, 147, 17, 58, 193]
    assert get_protocol("tinyimagenet", 4).known[-3:] == [177, 108, 169]


def test_cifar_plus_known_are_the_vehicle_classes():
    names = class_names("cifar10")
    for n in ("cifar+10", "cifar+50"):
        for s in range(5):
            p = get_protocol(n, s)
            assert [names[c] for c in p.known] == ["airplane", "automobile", "ship", "truck"]
            assert (p.known_dataset, p.unknown_dataset) == ("cifar10", "cifar100")


def test_aliases_and_errors():
    assert get_protocol("CIFAR_PLUS_10").name == "cifar+10"
    assert get_protocol("tiny-imagenet", 1).name == "tinyimagenet"
    with pytest.raises(DataError, match="available: cifar\\+10, cifar\\+50, cifar10"):
        get_protocol("imagenet")
    with pytest.raises(DataError, match="splits 0..4, not 5"):
        get_protocol("cifar10", 5)


def test_protocol_sources_filter_and_relabel_in_known_order():
    p = get_protocol("cifar10", 0)
    src = p.known_source(root="unused", split="train")
    assert isinstance(src, DataSource) and src.classes == [0, 6, 4, 9, 1, 7]
    # run it on the shipped CIFAR-10 sample (root is ignored by the demo set)
    demo = build_dataset(DataSource("demo", split="test", classes=src.classes))
    assert demo.classes == ["airplane", "frog", "deer", "truck", "automobile", "horse"]
    assert len(demo) == 6 * 20 and sorted(set(demo.labels)) == list(range(6))
    assert p.unknown_source().classes == [2, 3, 5, 8] and p.unknown_source().split == "test"


def test_ood_sources_copies_with_root_and_jpeg():
    srcs = ood_sources("cifar10", root="/data", jpeg_quality=75)
    assert [s.display_name for s in srcs] == ["CIFAR-100", "SVHN", "TIN (resize)", "TIN (crop)", "MNIST",
                                              "Fashion-MNIST"]
    assert all(s.root == "/data" and s.jpeg_quality == 75 for s in srcs)
    assert [s.resize for s in srcs if s.name == "tinyimagenet"] == ["resize", "crop"]
    assert all(s.root is None and s.jpeg_quality is None for s in OOD_BENCHMARKS["cifar10"])  # untouched (None: data_root)
    with pytest.raises(DataError, match="available: cifar10, cifar100, demo"):
        ood_sources("svhn")


def test_ood_sources_skip_missing(tmp_path):
    assert ood_sources("cifar10", root=str(tmp_path), skip_missing=True) == []
    demo = ood_sources("demo", skip_missing=True)
    assert len(demo) == 1 and len(build_dataset(demo[0])) == 200
