"""What a new user runs into: missing known classes, data_root for eval, environment faults
(disk full, read-only folders, non-finite values, config loops) as one line each, a corrupt test
image found before training, and the small things (progress without a TTY, leftovers)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from backmix_vlm.cli import main as cli
from conftest import train_config

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def cifar10_folder(root: Path, per_class: int = 2) -> Path:
    """<root>/cifar10/{train,test}/<class>/*.png: CIFAR-10's class folders with a few tiny images."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in CIFAR10:
            d = root / "cifar10" / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def protocol_config(tmp: Path, data_root: Path, **extra) -> Path:
    cfg = {"run": {"output_dir": str(tmp / "runs"), "name": "osr", "device": "cpu"}, "data_root": str(data_root),
           "data": {"train": {"name": "cifar10"}, "test": {"name": "cifar10", "split": "test"}, "protocol": "cifar10",
                    "image_size": 16, "num_workers": 0, "views": {"name": "none"}},
           "model": {"name": "small_cnn", "options": {"width": 4}},
           "optim": {"epochs": 1, "batch_size": 4}, "eval": {"scores": ["msp"], "num_workers": 0}, "plots": False,
           **extra}
    path = tmp / "osr.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ----------------------------------------------------------------------------- known classes without images
@pytest.mark.parametrize("split", ["train", "test"])
def test_a_known_class_missing_from_the_data_is_an_error_naming_it(tmp_path, capsys, split):
    root = cifar10_folder(tmp_path / "data")
    shutil.rmtree(root / "cifar10" / split / "truck")  # truck is known in split 0
    (root / "cifar10" / split / "horse").mkdir(exist_ok=True)
    for f in (root / "cifar10" / split / "horse").iterdir():
        f.unlink()  # an empty folder counts as missing too
    assert cli(["train", str(protocol_config(tmp_path, root))]) == 2
    err = capsys.readouterr().err
    assert f"data.{split}:" in err and "truck (label 3)" in err and "horse (label 5)" in err
    assert str(root / "cifar10") in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "osr").exists()


def test_an_unknown_class_missing_is_not_a_known_class_error(tmp_path, capsys):
    root = cifar10_folder(tmp_path / "data")
    shutil.rmtree(root / "cifar10" / "train" / "bird")  # unknown in split 0: never trained on
    assert cli(["train", str(protocol_config(tmp_path, root))]) == 0


# ----------------------------------------------------------------------------- eval data_root=
def test_eval_reads_from_the_data_root_given_on_the_command_line(tmp_path, image_folder, capsys):
    cfg = train_config(tmp_path, image_folder, data_root=str(image_folder))
    data = yaml.safe_load(cfg.read_text())
    for key in ("train", "test"):
        data["data"][key].pop("root")
    data["eval"]["ood"][0].pop("root")
    cfg.write_text(yaml.safe_dump(data))
    assert cli(["train", str(cfg)]) == 0
    run = tmp_path / "runs" / "tiny"
    moved = tmp_path / "moved"
    image_folder.rename(moved)
    capsys.readouterr()
    assert cli(["eval", str(run), f"data_root={moved}"]) == 0
    (out,) = run.glob("eval-*")
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["data_root"] == str(moved)
    assert {saved["data"]["train"]["root"], saved["data"]["test"]["root"], saved["eval"]["ood"][0]["root"]} == {
        str(moved)}
    assert cli(["eval", str(run)]) == 2  # the old root is gone: an error naming it, not a traceback
    err = capsys.readouterr().err
    assert str(image_folder) in err and "Traceback" not in err
