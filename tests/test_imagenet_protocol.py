"""ImageNet-1k protocol: dataset names and layouts on a fake tree, fast clear errors without the data,
the shipped class names, and the configs' error on a machine without ImageNet."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backmix_vlm import cli
from backmix_vlm.config import DataSource
from backmix_vlm.data import build_dataset
from backmix_vlm.data.classnames import class_keys, class_names
from backmix_vlm.errors import DataError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _img(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(path)


def test_imagenet_class_names_are_clip_names_in_wnid_order():
    keys, names = class_keys("imagenet"), class_names("imagenet")
    assert len(keys) == len(names) == 1000 and keys == sorted(keys)
    assert (keys[0], names[0]) == ("n01440764", "tench") and names[-1] == "toilet paper"


def test_layouts_on_a_fake_tree(tmp_path):
    for wnid in ("n01440764", "n15075141"):
        for i in range(2):
            _img(tmp_path / "imagenet" / "val" / wnid / f"{i}.JPEG")
    for i in range(3):
        _img(tmp_path / "iNaturalist" / "images" / f"{i}.jpg")
        _img(tmp_path / "dtd" / "images" / "banded" / f"{i}.jpg")
    ds = build_dataset(DataSource(name="imagenet", root=str(tmp_path), split="val"))
    assert ds.labels == [0, 0, 999, 999] and ds.classes[0] == "tench" and len(ds.classes) == 1000
    inat = build_dataset(DataSource(name="inaturalist", root=str(tmp_path), split="test"))
    assert len(inat) == 3 and set(inat.labels) == {-1}
    tex = build_dataset(DataSource(name="textures", root=str(tmp_path), split="test"))
    assert len(tex) == 3
    # a root that holds other data is not swallowed as an OOD set
    with pytest.raises(DataError, match="'sun' is an OOD set of the ImageNet-1k protocol"):
        build_dataset(DataSource(name="sun", root=str(tmp_path), split="test"))


def test_missing_imagenet_fails_fast_naming_layout_and_source(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(DataError) as e:
        build_dataset(DataSource(name="imagenet", root=str(tmp_path), split="val"))
    assert time.perf_counter() - t0 < 5
    msg = str(e.value)
    assert "<root>/imagenet/{train,val}/<wnid>/*.JPEG" in msg and "image-net.org" in msg
    with pytest.raises(DataError, match="MOS .*large_scale_ood"):
        build_dataset(DataSource(name="places", root=str(tmp_path), split="test"))


@pytest.mark.parametrize("config", sorted(str(p.relative_to(CONFIGS / "imagenet")) for p in (CONFIGS / "imagenet").rglob("*.yaml")))
def test_imagenet_configs_fail_fast_without_the_data(config, tmp_path, capsys):
    job = "zeroshot" if config.startswith("zeroshot") else "fewshot"
    t0 = time.perf_counter()
    rc = cli.main([job, str(CONFIGS / "imagenet" / config), f"run.output_dir={tmp_path}"] + _root_overrides(job))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "imagenet" in err and "image-net.org" in err
    assert time.perf_counter() - t0 < 20
    assert not any(tmp_path.iterdir())  # nothing ran: no run directory


def _root_overrides(job: str) -> list[str]:
    if job == "zeroshot":
        return ["data.root=/nonexistent/imagenet_root"]
    return ["data.train.root=/nonexistent/imagenet_root", "data.test.root=/nonexistent/imagenet_root"]


def test_imagenet_configs_parse():
    from backmix_vlm.config import load_config
    from backmix_vlm.runners.fewshot import FewShotConfig, adapter_config
    from backmix_vlm.runners.zeroshot import ZeroShotConfig

    zs = load_config(ZeroShotConfig, CONFIGS / "imagenet" / "zeroshot" / "clip_vitb16.yaml")
    assert [s.name for s in zs.eval.ood] == ["inaturalist", "sun", "places", "textures"]
    assert "neglabel" in zs.eval.scores
    for path in sorted((CONFIGS / "imagenet" / "fewshot").glob("16shot_*.yaml")):
        cfg = load_config(FewShotConfig, path)
        opts = adapter_config(cfg)
        assert cfg.data.shots == 16 and cfg.data.train.name == "imagenet"
        assert cfg.backmix.enabled == path.stem.endswith("_backmix")
        assert getattr(opts, "sct", False) == ("_sct" in path.stem)
