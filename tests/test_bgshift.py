"""The background-shift benchmark dataset (issue 7): generation, reading, and the mask-quality measure."""
from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from backmix_vlm.config import DataSource
from backmix_vlm.data import build_dataset
from backmix_vlm.data.bgshift import BgShiftSpec, generate
from backmix_vlm.errors import DataError
from backmix_vlm.saliency.mask_quality import mask_quality


def _idx(path, array: np.ndarray) -> None:
    dims = array.shape
    header = bytes([0, 0, 0x08, len(dims)]) + b"".join(struct.pack(">i", d) for d in dims)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(0)
    for name in ("fmnist", "mnist"):
        (root / name).mkdir()
        items = np.zeros((200, 28, 28), np.uint8)
        items[:, 6:22, 8:20] = 255                                  # a solid block: the "object"
        _idx(root / name / "t10k-images-idx3-ubyte.gz", items)
        _idx(root / name / "t10k-labels-idx1-ubyte.gz", np.arange(200) % 10)
    for fam in range(8):
        d = root / "dtd" / "images" / f"tex{fam}"
        d.mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((40, 40, 3), 20 * fam + i, np.uint8)).save(d / f"{i}.jpg")
    t = root / "tiny" / "test" / "images"
    t.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(t / f"test_{i}.JPEG")
    return root


def _make(sources, out, rho=1.0, seed=0):
    spec = BgShiftSpec(rho=rho, seed=seed, train_per_class=5, test_per_class=3, unknown_per_set=12)
    return generate(out, fashion_mnist=sources / "fmnist", mnist=sources / "mnist", dtd=sources / "dtd",
                    tinyimagenet=sources / "tiny", spec=spec)


def test_generator_writes_splits_reads_back_and_plants_the_correlation(sources, tmp_path):
    out = _make(sources, tmp_path / "bg")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["counts"] == {"train": 30, "test_matched": 18, "test_swapped": 18, "unknown_known_bg": 12,
                              "unknown_unseen_bg": 12}
    train = build_dataset(DataSource(name="bgshift", root=str(out), split="train"))
    assert train.classes == ["t-shirt", "trouser", "dress", "sandal", "sneaker", "bag"]
    masks = train.foreground_masks
    assert masks.shape == (30, 32, 32) and masks.dtype == torch.bool
    for split, own in (("train", True), ("test_matched", True), ("test_swapped", False)):
        z = np.load(out / f"{split}.npz")
        assert ((z["background"] == z["labels"]) == own).all(), split   # rho = 1: always the class's family
    z = np.load(out / "unknown_unseen_bg.npz")
    assert ((z["background"] >= 6) | (z["background"] == -1)).all()     # never a known family
    # the mask is exactly where the object was pasted: masked pixels differ from the flat background
    z = np.load(out / "test_matched.npz")
    img, m = z["images"][0].astype(int), z["masks"][0]
    assert m.sum() > 20 and np.abs(img[m] - img[~m].mean(0)).sum(1).min() > 0
    with pytest.raises(DataError, match="already holds a dataset"):
        _make(sources, out)
    again = _make(sources, tmp_path / "bg2")                                # same seed: same dataset
    assert np.array_equal(np.load(again / "train.npz")["images"], np.load(out / "train.npz")["images"])


def test_mask_quality_hand_cases() -> None:
    true = torch.zeros(2, 8, 8, dtype=torch.bool)
    true[:, :4, :4] = True                                       # top-left quarter
    perfect = torch.zeros(2, 4, 4)
    perfect[:, :2, :2] = 1.0
    q = mask_quality(perfect, true, 0.25)
    assert q["precision"] == pytest.approx(1.0) and q["iou"] == pytest.approx(1.0)
    wrong = torch.zeros(2, 4, 4)
    wrong[:, 2:, 2:] = 1.0
    q = mask_quality(wrong, true, 0.25)
    assert q["precision"] == 0.0 and q["iou"] == 0.0
    assert q["random_precision"] == pytest.approx(0.25, abs=0.2)   # chance level = foreground share
    assert 0.0 <= q["centre_precision"] <= 1.0
