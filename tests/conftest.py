"""Shared test fixtures: the map of what tests build, built once.

* ``tiny_clip`` / ``tiny_clip_batch_first``: the randomly initialised ``backmix-tiny-clip``
  (seed 0) in open_clip's default block layout / batch-first ``(N, L, D)`` layout.  Built once
  per session; each test module that asks for one gets the global torch RNG exactly as right
  after building it, as when every module built its own copy.  Treat it as read-only
  (``copy.deepcopy`` it before changing weights or layouts).
* ``image_folder``: a tiny generated ``<root>/{train,test}/<class>/*.png`` + ``ood/noise`` tree.
* ``tiny_train_config``: a YAML for ``backmix-vlm train`` on ``image_folder`` (small CNN, 1 epoch,
  no plots), fast enough for end-to-end run-directory tests.

Markers: ``@pytest.mark.slow`` for tests over ~10 s (multi-process, ViT-B/16-sized models, the
demo).  ``pytest`` runs everything (CI); ``pytest -m "not slow"`` is the quick inner loop.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

COLORS = {"red": 0, "green": 1, "blue": 2}


@functools.lru_cache(maxsize=None)
def _tiny_clip(layout: str):
    from backmix_vlm.models.clip import TINY_CLIP, load_clip

    torch.manual_seed(0)
    bundle = load_clip(TINY_CLIP, pretrained=None, layout=layout)
    return bundle, torch.get_rng_state()


def _tiny(layout: str):
    bundle, rng = _tiny_clip(layout)
    torch.set_rng_state(rng)
    return bundle


@pytest.fixture(scope="module")
def tiny_clip():
    """``backmix-tiny-clip`` (seed 0, default layout: seq-first on CPU), shared by the session."""
    return _tiny("auto")


@pytest.fixture(scope="module")
def tiny_clip_batch_first():
    """``backmix-tiny-clip`` (seed 0) fed batch-first: tests count rows in (N, L, D)."""
    return _tiny("batch_first")


def make_image_folder(root: Path, per_class: int = 8, size: int = 16, seed: int = 0) -> Path:
    """<root>/{train,test}/<class>/*.png (a coloured square per class) and <root>/ood/noise/*.png."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("test", per_class // 2)):
        for name, ch in COLORS.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                x = rng.integers(0, 100, (size, size, 3), dtype=np.uint8)
                x[4:12, 4:12, ch] = 255
                Image.fromarray(x).save(root / split / name / f"{i:03d}.png")
    (root / "ood" / "noise").mkdir(parents=True, exist_ok=True)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / "ood" / "noise" / f"{i}.png")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "data")


def train_config(tmp: Path, data_dir: Path, **extra) -> Path:
    """A fast ``train`` YAML (small CNN, 1 epoch, BackMix on, no plots) into ``tmp/runs/tiny``."""
    cfg = {
        "run": {"output_dir": str(tmp / "runs"), "name": "tiny", "device": "cpu"},
        "data": {"train": {"name": "imagefolder", "root": str(data_dir), "split": "train"},
                 "test": {"name": "imagefolder", "root": str(data_dir), "split": "test"},
                 "image_size": 16, "num_workers": 0, "mean": [0.5] * 3, "std": [0.25] * 3},
        "model": {"name": "small_cnn", "options": {"width": 4}},
        "optim": {"epochs": 1, "batch_size": 8, "lr": 0.05},
        "eval": {"ood": [{"name": "imagefolder", "root": str(data_dir), "split": "ood", "label": "noise"}],
                 "scores": ["msp"], "num_workers": 0},
        "plots": False,
    }
    for key, value in extra.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def tiny_train_config(tmp_path, image_folder) -> Path:
    return train_config(tmp_path, image_folder)
