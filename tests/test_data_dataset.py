"""The sample contract, class filtering, max_samples, subsets, and the shipped demo set."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from backmix_vlm.config import DataSource, load_config
from backmix_vlm.data import DATASETS, ImageDataset, IndexedSubset, build_dataset, build_transform, class_names
from backmix_vlm.data.records import ArrayRecords
from backmix_vlm.errors import DataError


def array_dataset(n: int = 12, k: int = 4) -> ImageDataset:
    x = np.stack([np.full((8, 8, 3), i, np.uint8) for i in range(n)])  # pixel value = row id
    return ImageDataset(ArrayRecords(x, "mem"), [i % k for i in range(n)], [f"c{j}" for j in range(k)], "mem")


def test_sample_contract_and_dataloader_batches():
    ds = array_dataset()
    x, y, i = ds[5]
    assert x.dtype == torch.float32 and x.shape == (3, 8, 8) and (y, i) == (1, 5)
    assert ds[-1][2] == 11 and ds.targets is ds.labels
    xb, yb, ib = next(iter(DataLoader(ds, batch_size=12)))
    assert ib.tolist() == list(range(12)) and yb.tolist() == ds.labels
    assert torch.allclose(xb[:, 0, 0, 0] * 255, torch.arange(12.0))


def test_indexed_subset_reports_positions_in_the_subset():
    ds = array_dataset()
    sub = IndexedSubset(ds, [7, 2, 9])
    assert len(sub) == 3 and sub.labels == [3, 2, 1] and sub.classes == ds.classes and sub.name == "mem"
    x, y, i = sub[1]
    assert (y, i) == (2, 1) and round(float(x[0, 0, 0]) * 255) == 2
    nested = IndexedSubset(sub, [2])
    assert nested[0][1:] == (1, 0) and round(float(nested[0][0][0, 0, 0]) * 255) == 9
    with pytest.raises(DataError, match="out of range"):
        IndexedSubset(ds, [12])


def test_demo_dataset_real_images():
    counts = {"train": 500, "test": 200, "ood-cifar100": 200}
    for split, n in counts.items():
        ds = build_dataset(DataSource("demo", root="ignored", split=split))
        assert len(ds) == n
    train = build_dataset(DataSource("demo", split="train"))
    assert Counter(train.labels) == {c: 50 for c in range(10)} and train.classes == class_names("cifar10")
    ood = build_dataset(DataSource("demo", split="ood-cifar100"))
    assert Counter(ood.labels) == {c: 2 for c in range(100)} and ood.classes[1] == "aquarium fish"
    x, y, i = train[0]
    assert x.shape == (3, 32, 32) and 0.05 < float(x.std()) and (y, i) == (0, 0)


def test_demo_assets_are_small():
    from importlib import resources

    root = Path(str(resources.files("backmix_vlm").joinpath("assets", "demo")))
    assert sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) < 2_000_000


def test_class_filter_relabels_in_given_order():
    full = build_dataset(DataSource("demo", split="test"))
    ds = build_dataset(DataSource("demo", split="test", classes=[5, 3]))
    assert ds.classes == ["dog", "cat"] and Counter(ds.labels) == {0: 20, 1: 20}
    first_dog = full.labels.index(5)
    assert torch.equal(ds[ds.labels.index(0)][0], full[first_dog][0])  # same image, new label
    for bad in ([10], [3, 3], [-1]):
        with pytest.raises(DataError, match="distinct label ids in 0..9"):
            build_dataset(DataSource("demo", split="test", classes=bad))


def test_max_samples_is_evenly_spaced_after_filtering():
    full = build_dataset(DataSource("demo", split="train", classes=[9, 0]))  # 100 images, class-sorted
    ds = build_dataset(DataSource("demo", split="train", classes=[9, 0], max_samples=7))
    pos = [0, 14, 28, 42, 57, 71, 85]  # floor(i * 100 / 7)
    assert len(ds) == 7 and ds.labels == [full.labels[p] for p in pos]
    assert sorted(set(ds.labels)) == [0, 1]  # both classes kept, not just the first folder
    assert all(torch.equal(ds[i][0], full[p][0]) for i, p in enumerate(pos))


def test_empty_split_names_source_and_filter(tmp_path):
    for c in ("a", "b"):
        (tmp_path / "test" / c).mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "test" / "a" / "0.png")
    with pytest.raises(DataError, match=r"imagefolder split 'test'.*0 images after filtering \(classes: \[1\]"):
        build_dataset(DataSource("imagefolder", str(tmp_path), "test", classes=[1]))


def test_transform_and_display_name_are_used():
    tf = build_transform(16, False, (0.5,) * 3, (0.5,) * 3)
    ds = build_dataset(DataSource("demo", split="test", label="CIFAR-10 demo", max_samples=2), tf)
    assert ds.name == "CIFAR-10 demo" and ds[0][0].shape == (3, 16, 16) and float(ds[0][0].min()) >= -1


def test_datasource_from_yaml_builds(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: demo\nsplit: test\nclasses: [1, 2]\nmax_samples: 5\n")
    src = load_config(DataSource, cfg)
    ds = build_dataset(src)
    assert len(ds) == 5 and ds.classes == ["automobile", "bird"]


def test_registry_names():
    assert DATASETS.names() == sorted(["cifar10", "cifar100", "svhn", "tinyimagenet", "mnist", "fashionmnist",
                                       "imagefolder", "demo",
                                       "imagenet", "inaturalist", "sun", "places", "textures", "bgshift"])
