"""Decoding: odd image modes → RGB, corrupt files, JPEG round trips, transforms."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from backmix_vlm.config import DataSource
from backmix_vlm.data import (CIFAR10_MEAN, CIFAR10_STD, CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD,
                              build_dataset, build_transform, jpeg_roundtrip, to_rgb)
from backmix_vlm.data.images import center_crop
from backmix_vlm.errors import BackmixError, DataError

ODD = Path(__file__).parent / "fixtures" / "odd_images"
GOOD = ["gray.png", "rgba.png", "palette.gif", "palette_transparent.png", "cmyk.jpg", "gray16.png"]
BAD = ["truncated.jpg", "not_an_image.jpg"]


def rgb(name: str) -> np.ndarray:
    with Image.open(ODD / name) as img:
        img.load()
        out = to_rgb(img)
    assert out.mode == "RGB"
    return np.asarray(out).astype(int)


def test_grayscale_is_replicated():
    a = rgb("gray.png")
    assert a.shape == (8, 8, 3) and list(a[0, :, 0]) == list(range(0, 80, 10))
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()


def test_rgba_composites_on_white():
    a = rgb("rgba.png")
    assert (a[0, 0] == 255).all()                      # transparent red -> white, not red
    assert list(a[0, 7]) == [0, 0, 255]                # opaque blue stays
    assert np.abs(a[7, 7] - 255 * (1 - 128 / 255)).max() <= 1  # half-transparent black -> mid grey


def test_palette_with_and_without_transparency():
    a = rgb("palette.gif")
    assert list(a[0, 0]) == [10, 20, 30] and list(a[0, 7]) == [200, 100, 50]
    t = rgb("palette_transparent.png")
    assert list(t[0, 0]) == [255, 255, 255] and list(t[0, 7]) == [200, 100, 50]


def test_cmyk_jpeg_to_rgb():
    a = rgb("cmyk.jpg")
    assert np.abs(a[2, 2] - [0, 255, 255]).max() <= 3      # pure cyan
    assert np.abs(a[13, 13] - [255, 255, 255]).max() <= 3  # no ink


def test_16bit_png_is_rescaled_not_clipped():
    a = rgb("gray16.png")
    assert [int(a[r, 0, 0]) for r in range(3)] == [0, 100, 255]


def test_float_and_int32_modes():
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F")
    assert list(np.asarray(to_rgb(f))[0, :, 0]) == [0, 128, 255]
    i = Image.fromarray(np.array([[0, 257 * 7, 65535]], np.int32), "I")
    assert list(np.asarray(to_rgb(i))[0, :, 0]) == [0, 7, 255]


def make_tree(root: Path, names: list[str]) -> Path:
    d = root / "test" / "things"
    d.mkdir(parents=True)
    for n in names:
        shutil.copy(ODD / n, d / n)
    return root


def test_every_odd_mode_loads_as_three_channels(tmp_path):
    ds = build_dataset(DataSource("imagefolder", str(make_tree(tmp_path, GOOD)), "test"))
    assert len(ds) == len(GOOD)
    for i in range(len(ds)):
        x, y, idx = ds[i]
        assert x.shape[0] == 3 and x.dtype == torch.float32 and (y, idx) == (0, i)


@pytest.mark.parametrize("bad", BAD)
def test_corrupt_file_error_names_the_file(tmp_path, bad):
    ds = build_dataset(DataSource("imagefolder", str(make_tree(tmp_path, ["gray.png", bad])), "test"))
    i = [Path(ds.records.where(k)).name for k in range(len(ds))].index(bad)
    with pytest.raises(DataError, match=rf"{bad}.*on_corrupt: skip"):
        ds[i]


def test_corrupt_file_error_survives_dataloader_worker(tmp_path):
    ds = build_dataset(DataSource("imagefolder", str(make_tree(tmp_path, ["truncated.jpg"])), "test"))
    with pytest.raises(DataError, match="truncated.jpg"):
        next(iter(DataLoader(ds, batch_size=1, num_workers=1)))


def test_skip_mode_drops_bad_files_with_one_warning(tmp_path):
    root = make_tree(tmp_path, GOOD + BAD)
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image\(s\) of 8") as rec:
        ds = build_dataset(DataSource("imagefolder", str(root), "test", on_corrupt="skip"))
    assert len(rec) == 1 and len(ds) == len(GOOD)
    assert sorted(Path(ds.records.where(i)).name for i in range(len(ds))) == sorted(GOOD)
    assert [ds[i][2] for i in range(len(ds))] == list(range(len(GOOD)))  # positions re-indexed


def test_skip_mode_all_bad_is_an_error(tmp_path):
    with pytest.warns(UserWarning), pytest.raises(DataError, match="every image is unreadable"):
        build_dataset(DataSource("imagefolder", str(make_tree(tmp_path, BAD)), "test", on_corrupt="skip"))


def test_jpeg_roundtrip_matches_pil_encode_decode():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=75)
    expect = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    got = np.asarray(jpeg_roundtrip(img, 75))
    assert np.array_equal(got, expect) and not np.array_equal(got, np.asarray(img))


def test_dataset_applies_jpeg_quality(tmp_path):
    a = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    (tmp_path / "test" / "c").mkdir(parents=True)
    Image.fromarray(a).save(tmp_path / "test" / "c" / "0.png")
    plain = build_dataset(DataSource("imagefolder", str(tmp_path), "test"))
    jpg = build_dataset(DataSource("imagefolder", str(tmp_path), "test", jpeg_quality=75))
    assert np.array_equal(np.asarray(plain.load_image(0)), a)
    assert np.array_equal(np.asarray(jpg.load_image(0)), np.asarray(jpeg_roundtrip(Image.fromarray(a), 75)))


def test_center_crop_exact_window():
    a = np.arange(64 * 64, dtype=np.int32).reshape(64, 64) % 251
    img = Image.fromarray(a.astype(np.uint8))
    assert np.array_equal(np.asarray(center_crop(img, 32)), a[16:48, 16:48])
    assert center_crop(img.crop((0, 0, 20, 20)), 32).size == (20, 20)


# ----------------------------------------------------------------------------- transforms
def test_mean_std_constants_match_libraries():
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    assert CLIP_MEAN == tuple(OPENAI_DATASET_MEAN) and CLIP_STD == tuple(OPENAI_DATASET_STD)
    assert IMAGENET_MEAN == tuple(IMAGENET_DEFAULT_MEAN) and IMAGENET_STD == tuple(IMAGENET_DEFAULT_STD)
    assert len(CIFAR10_MEAN) == len(CIFAR10_STD) == 3


def test_eval_transform_normalises_exactly():
    a = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    x = build_transform(32, False, CIFAR10_MEAN, CIFAR10_STD)(Image.fromarray(a))
    ref = (torch.from_numpy(a).permute(2, 0, 1).float() / 255 - torch.tensor(CIFAR10_MEAN)[:, None, None]) \
        / torch.tensor(CIFAR10_STD)[:, None, None]
    assert torch.allclose(x, ref, atol=1e-6)
    assert build_transform(32, False, None, None)(Image.fromarray(a)).max() <= 1.0


@pytest.mark.parametrize("mode", ["resize", "center_crop", "crop"])
def test_eval_resize_modes_reach_model_size(mode):
    img = Image.fromarray(np.zeros((48, 64, 3), np.uint8))
    assert build_transform(224, False, CLIP_MEAN, CLIP_STD, resize=mode)(img).shape == (3, 224, 224)


def test_crop_mode_uses_center_32px_window():
    a = np.zeros((64, 64, 3), np.uint8)
    a[16:48, 16:48] = 200  # only the center crop is bright
    x = build_transform(32, False, None, None, resize="crop")(Image.fromarray(a))
    assert torch.allclose(x, torch.full_like(x, 200 / 255))


def test_train_transform_cifar_style_and_rrc():
    img = Image.fromarray(np.full((32, 32, 3), 255, np.uint8))
    small = build_transform(32, True, None, None)
    torch.manual_seed(0)
    outs = [small(img) for _ in range(20)]
    assert all(o.shape == (3, 32, 32) for o in outs)
    assert any((o == 0).any() for o in outs)  # zero padding shows up after random crops
    names = [type(t).__name__ for t in build_transform(224, True, CLIP_MEAN, CLIP_STD).transforms]
    assert names[0] == "RandomResizedCrop" and "RandomHorizontalFlip" in names
    padded = [type(t).__name__ for t in build_transform(224, True, None, None, crop_padding=16).transforms]
    assert "RandomCrop" in padded and "RandomResizedCrop" not in padded


def test_transform_bad_arguments():
    with pytest.raises(BackmixError, match="resize.*center_crop"):
        build_transform(32, False, None, None, resize="stretch")
    with pytest.raises(BackmixError, match="both mean and std"):
        build_transform(32, False, CIFAR10_MEAN, None)
