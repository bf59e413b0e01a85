"""Every on-disk layout of every named dataset, built tiny in tmp_path, read back exactly."""
from __future__ import annotations

import gzip
import pickle
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backmix_vlm.config import DataSource
from backmix_vlm.data import DATASETS, build_dataset, class_names
from backmix_vlm.data.layouts import read_idx
from backmix_vlm.errors import BackmixError, DataError

RNG = np.random.default_rng(0)


def pixels(n: int, h: int = 32, w: int = 32, c: int | None = 3) -> np.ndarray:
    shape = (n, h, w) if c is None else (n, h, w, c)
    return RNG.integers(0, 256, size=shape, dtype=np.uint8)


def as_uint8(x: torch.Tensor) -> np.ndarray:
    """ToTensor output back to HWC uint8 (exact for 8-bit inputs)."""
    return (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


# ----------------------------------------------------------------------------- writers
def write_cifar(root: Path, folder: str, files: dict[str, tuple[np.ndarray, list[int]]], label_key: str) -> None:
    d = root / folder
    d.mkdir(parents=True)
    for name, (x, y) in files.items():
        entry = {"data": x.transpose(0, 3, 1, 2).reshape(len(x), -1), label_key: y}
        with open(d / name, "wb") as f:
            pickle.dump(entry, f)


def write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def write_tree(d: Path, images: dict[str, list[np.ndarray]], ext: str = ".png") -> None:
    for cls, arrs in images.items():
        (d / cls).mkdir(parents=True, exist_ok=True)
        for i, a in enumerate(arrs):
            Image.fromarray(a).save(d / cls / f"{i:04d}{ext}")


# ----------------------------------------------------------------------------- torchvision layouts
def test_cifar10_pickles_exact_pixels_and_labels(tmp_path):
    train = {f"data_batch_{i}": (pixels(2), [i, (i + 3) % 10]) for i in range(1, 6)}
    test_x = pixels(3)
    write_cifar(tmp_path, "cifar-10-batches-py", {**train, "test_batch": (test_x, [7, 0, 9])}, "labels")
    ds = build_dataset(DataSource("cifar10", str(tmp_path), "test"))
    assert len(ds) == 3 and ds.labels == [7, 0, 9] and ds.classes == class_names("cifar10")
    for i in range(3):
        x, y, idx = ds[i]
        assert x.dtype == torch.float32 and x.shape == (3, 32, 32)
        assert np.array_equal(as_uint8(x), test_x[i]) and (y, idx) == (ds.labels[i], i)
    tr = build_dataset(DataSource("cifar10", str(tmp_path), "train", layout="torchvision"))
    assert tr.labels == [v for i in range(1, 6) for v in (i, (i + 3) % 10)]
    assert np.array_equal(as_uint8(tr[2][0]), train["data_batch_2"][0][0])


def test_cifar100_pickles_use_fine_labels(tmp_path):
    x = pixels(2)
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    with open(d / "test", "wb") as f:
        pickle.dump({"data": x.transpose(0, 3, 1, 2).reshape(2, -1), "fine_labels": [55, 99],
                     "coarse_labels": [1, 2]}, f)
    ds = build_dataset(DataSource("cifar100", str(tmp_path), "test"))
    assert ds.labels == [55, 99] and ds.classes[55] == "otter" and ds.classes[99] == "worm"
    assert np.array_equal(as_uint8(ds[1][0]), x[1])


@pytest.mark.parametrize("where,gz", [("MNIST/raw", True), ("", False), ("raw", True)])
def test_mnist_idx_locations(tmp_path, where, gz):
    x = pixels(4, 28, 28, None)
    base = tmp_path / where
    base.mkdir(parents=True, exist_ok=True)
    sfx = ".gz" if gz else ""
    write_idx(base / f"t10k-images-idx3-ubyte{sfx}", x)
    write_idx(base / f"t10k-labels-idx1-ubyte{sfx}", np.array([3, 1, 4, 1]))
    ds = build_dataset(DataSource("mnist", str(tmp_path), "test"))
    assert ds.labels == [3, 1, 4, 1] and ds.classes == [str(i) for i in range(10)]
    img = as_uint8(ds[2][0])
    assert img.shape == (28, 28, 3) and all(np.array_equal(img[..., c], x[2]) for c in range(3))


def test_read_idx_roundtrip_and_bad_magic(tmp_path):
    a = pixels(2, 3, 5, None)
    write_idx(tmp_path / "a.idx", a)
    assert np.array_equal(read_idx(tmp_path / "a.idx"), a)
    (tmp_path / "bad.idx").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(DataError, match="bad.idx"):
        read_idx(tmp_path / "bad.idx")


def test_fashionmnist_idx_under_its_folder(tmp_path):
    base = tmp_path / "FashionMNIST" / "raw"
    base.mkdir(parents=True)
    write_idx(base / "train-images-idx3-ubyte.gz", pixels(2, 28, 28, None))
    write_idx(base / "train-labels-idx1-ubyte.gz", np.array([9, 0]))
    ds = build_dataset(DataSource("fashionmnist", str(tmp_path), "train"))
    assert ds.labels == [9, 0] and ds.classes[9] == "ankle boot" and ds.classes[0] == "t-shirt"


def test_svhn_mat_maps_label_10_to_0(tmp_path):
    import scipy.io as scipy_io  # scikit-learn (a dependency) brings scipy; the no-scipy path is tested below
    x = pixels(3)
    scipy_io.savemat(tmp_path / "test_32x32.mat", {"X": x.transpose(1, 2, 3, 0), "y": np.array([[10], [1], [9]])})
    ds = build_dataset(DataSource("svhn", str(tmp_path), "test"))
    assert ds.labels == [0, 1, 9] and ds.classes[0] == "zero"
    assert np.array_equal(as_uint8(ds[1][0]), x[1])


def test_svhn_without_scipy_says_pip_install(tmp_path, monkeypatch):
    import builtins

    (tmp_path / "test_32x32.mat").write_bytes(b"x")
    real_import = builtins.__import__

    def no_scipy(name, *a, **kw):
        if name.startswith("scipy"):
            raise ImportError("no scipy")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_scipy)
    with pytest.raises(DataError, match="pip install scipy"):
        build_dataset(DataSource("svhn", str(tmp_path), "test"))


def make_tiny_imagenet(root: Path) -> tuple[list[str], np.ndarray]:
    base = root / "tiny-imagenet-200"
    wnids = ["n04067472", "n01443537", "n02124075"]  # wnids.txt is not sorted; labels use sorted order
    (base / "val" / "images").mkdir(parents=True)
    (base / "test" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    x = pixels(3, 64, 64)
    rows = []
    for i, w in enumerate(wnids):
        Image.fromarray(x[i]).save(base / "val" / "images" / f"val_{i}.JPEG", quality=100)
        rows.append(f"val_{i}.JPEG\t{w}\t0\t0\t10\t10")
        (base / "train" / w / "images").mkdir(parents=True)
        Image.fromarray(x[i]).save(base / "train" / w / "images" / f"{w}_0.JPEG")
    (base / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")
    for i in range(2):
        Image.fromarray(x[i]).save(base / "test" / "images" / f"test_{i}.JPEG")
    return wnids, x


def test_tinyimagenet_native_layout(tmp_path):
    wnids, _ = make_tiny_imagenet(tmp_path)
    all_ids = sorted(line.split("\t")[0] for line in _classnames_lines("tinyimagenet"))
    expect = [all_ids.index(w) for w in wnids]
    val = build_dataset(DataSource("tinyimagenet", str(tmp_path), "val"))
    assert val.labels == expect and len(val.classes) == 200
    assert val.classes[all_ids.index("n01443537")] == "goldfish"
    train = build_dataset(DataSource("tinyimagenet", str(tmp_path / "tiny-imagenet-200"), "train"))
    assert sorted(train.labels) == sorted(expect)
    test = build_dataset(DataSource("tinyimagenet", str(tmp_path), "test"))
    assert test.labels == [-1, -1] and test[0][0].shape == (3, 64, 64)
    crop = build_dataset(DataSource("tinyimagenet", str(tmp_path), "test", resize="crop"))
    assert crop[0][0].shape == (3, 32, 32)  # the 32 px center crop is taken by the dataset


def _classnames_lines(name):
    from importlib import resources

    return resources.files("backmix_vlm.data").joinpath("classnames", f"{name}.txt").read_text().splitlines()


# ----------------------------------------------------------------------------- folder layouts
def test_cifar10_folder_tree_jpeg_layout(tmp_path):
    imgs = {c: [pixels(1)[0]] for c in ["truck", "airplane", "cat"]}
    write_tree(tmp_path / "train", imgs, ".jpg")
    ds = build_dataset(DataSource("cifar10", str(tmp_path), "train"))
    assert ds.labels == [0, 3, 9]  # airplane, cat, truck in CIFAR-10's label ids
    assert ds.classes == class_names("cifar10")


def test_cifar100_png_layout_under_subfolder_is_lossless(tmp_path):
    a, b = pixels(2)
    write_tree(tmp_path / "cifar100" / "test", {"aquarium_fish": [a], "maple_tree": [b]})
    ds = build_dataset(DataSource("cifar100", str(tmp_path), "test"))
    assert ds.labels == [1, 47] and ds.classes[1] == "aquarium fish" and ds.classes[47] == "maple tree"
    assert np.array_equal(as_uint8(ds[0][0]), a) and np.array_equal(as_uint8(ds[1][0]), b)


def test_named_folder_with_foreign_classes_is_rejected(tmp_path):
    write_tree(tmp_path / "test", {"airplane": [pixels(1)[0]], "spaceship": [pixels(1)[0]]})
    with pytest.raises(DataError, match="spaceship.*imagefolder"):
        build_dataset(DataSource("cifar10", str(tmp_path), "test"))


def test_mnist_digit_folders_map_to_digit_labels(tmp_path):
    write_tree(tmp_path / "test", {"7": [pixels(1, 28, 28, None)[0]], "2": [pixels(1, 28, 28, None)[0]]})
    ds = build_dataset(DataSource("mnist", str(tmp_path), "test", layout="folder"))
    assert ds.labels == [2, 7]


def test_imagefolder_split_or_flat_sorted_classes(tmp_path):
    write_tree(tmp_path / "flat", {"b_class": [pixels(1)[0]] * 2, "a_class": [pixels(1)[0]]})
    flat = build_dataset(DataSource("imagefolder", str(tmp_path / "flat"), "anything"))
    assert flat.classes == ["a class", "b class"] and flat.labels == [0, 1, 1]
    write_tree(tmp_path / "split" / "val", {"x": [pixels(1)[0]]})
    write_tree(tmp_path / "split" / "train", {"y": [pixels(1)[0]], "z": [pixels(1)[0]]})
    val = build_dataset(DataSource("imagefolder", str(tmp_path / "split"), "validation"))
    assert val.classes == ["x"] and len(val) == 1
    train = build_dataset(DataSource("imagefolder", str(tmp_path / "split"), "train"))
    assert train.classes == ["y", "z"]


def test_folder_ignores_non_image_files_and_hidden(tmp_path):
    write_tree(tmp_path / "test", {"cat": [pixels(1)[0]]})
    (tmp_path / "test" / "cat" / "README.txt").write_text("notes")
    (tmp_path / "test" / ".hidden").mkdir()
    ds = build_dataset(DataSource("cifar10", str(tmp_path), "test"))
    assert len(ds) == 1 and ds.labels == [3]


# ----------------------------------------------------------------------------- Hugging Face
def _hf_dataset(n: int, names: list[str] | None, image_col="img", label_col="label"):
    import datasets

    x = pixels(n)
    feats = {image_col: datasets.Image(),
             label_col: datasets.ClassLabel(names=names) if names else datasets.Value("int64")}
    ds = datasets.Dataset.from_dict({image_col: [Image.fromarray(a) for a in x],
                                     label_col: [i % 2 for i in range(n)]}, features=datasets.Features(feats))
    return ds, x


def test_hf_save_to_disk_datasetdict_maps_classlabel_names(tmp_path):
    import datasets

    # ClassLabel order differs from CIFAR-10's: names decide the canonical label
    ds, x = _hf_dataset(4, ["truck", "bird"])
    datasets.DatasetDict({"train": ds, "test": ds.select([0, 1])}).save_to_disk(str(tmp_path / "hf"))
    out = build_dataset(DataSource("cifar10", str(tmp_path / "hf"), "train"))
    assert out.labels == [9, 2, 9, 2] and out.classes == class_names("cifar10")
    assert np.array_equal(as_uint8(out[3][0]), x[3])
    assert len(build_dataset(DataSource("cifar10", str(tmp_path / "hf"), "test", layout="hf"))) == 2


def test_hf_parquet_hub_layout_and_column_detection(tmp_path):
    ds, x = _hf_dataset(3, None, image_col="image", label_col="fine_label")
    (tmp_path / "data").mkdir()
    ds.to_parquet(str(tmp_path / "data" / "test-00000-of-00001.parquet"))
    ds.select([0]).to_parquet(str(tmp_path / "data" / "train-00000-of-00001.parquet"))
    out = build_dataset(DataSource("cifar100", str(tmp_path), "test"))
    assert out.labels == [0, 1, 0] and len(out.classes) == 100
    assert np.array_equal(as_uint8(out[1][0]), x[1])
    assert len(build_dataset(DataSource("cifar100", str(tmp_path), "train", layout="hf"))) == 1


def test_hf_imagefolder_names_from_classlabel_and_no_image_column_error(tmp_path):
    import datasets

    ds, _ = _hf_dataset(2, ["sea_lion", "tree"])
    ds.save_to_disk(str(tmp_path / "one"))
    out = build_dataset(DataSource("imagefolder", str(tmp_path / "one"), "train", layout="hf"))
    assert out.classes == ["sea lion", "tree"] and out.labels == [0, 1]
    bad = datasets.Dataset.from_dict({"text": ["a"], "label": [0]})
    bad.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match="no image column.*image, img"):
        build_dataset(DataSource("imagefolder", str(tmp_path / "bad"), "train", layout="hf"))


# ----------------------------------------------------------------------------- errors
def test_missing_data_lists_paths_and_layouts_fast(tmp_path):
    t = time.perf_counter()
    with pytest.raises(DataError) as e:
        build_dataset(DataSource("cifar10", str(tmp_path / "nowhere"), "test"))
    msg = str(e.value)
    assert time.perf_counter() - t < 2
    for needle in ("nowhere/cifar-10-batches-py/{test_batch}", "nowhere/test/<class>/<image>",
                   "nowhere/cifar10/test/<class>/<image>", "dataset_dict.json", "Accepted layouts",
                   "torchvision:", "folder:", "hf:", "download: true"):
        assert needle in msg, needle


def test_forced_layout_only_looks_there(tmp_path):
    write_tree(tmp_path / "test", {"cat": [pixels(1)[0]]})
    with pytest.raises(DataError) as e:
        build_dataset(DataSource("cifar10", str(tmp_path), "test", layout="hf"))
    assert "hf:" in str(e.value) and "folder:" not in str(e.value).split("Accepted")[0]


def test_unknown_name_lists_registered_names():
    with pytest.raises(BackmixError) as e:
        build_dataset(DataSource("cifar11"))
    for name in ("cifar10", "cifar100", "svhn", "tinyimagenet", "mnist", "fashionmnist", "imagefolder", "demo"):
        assert name in str(e.value) and name in DATASETS


@pytest.mark.parametrize("field,value,needle", [("split", "val", "train, test"), ("layout", "zip", "auto"),
                                                ("resize", "stretch", "center_crop"), ("on_corrupt", "ignore", "skip")])
def test_bad_choices_name_the_accepted_values(field, value, needle):
    src = DataSource("cifar10", "x")
    setattr(src, field, value)
    with pytest.raises(BackmixError, match=needle):
        build_dataset(src)


def test_download_offline_fails_fast_with_clear_message(tmp_path, monkeypatch):
    def offline(*a, **kw):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", offline)
    t = time.perf_counter()
    with pytest.raises(DataError, match="cannot be reached.*offline.*download: false"):
        build_dataset(DataSource("cifar10", str(tmp_path), "test", download=True))
    assert time.perf_counter() - t < 5
    assert not any(tmp_path.iterdir())  # nothing half-downloaded
