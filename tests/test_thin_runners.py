"""The pieces the runners share: the typed backbone factory, protocol -> sources in ``data/``,
and ``finish_evaluation`` (tables, per-sample scores, plots) in ``report/``."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from backmix_vlm.config import DataSource
from backmix_vlm.data import open_set_sources
from backmix_vlm.errors import ConfigError
from backmix_vlm.ood.open_set import SCORES_FILE, load_scores
from backmix_vlm.report.finish import finish_evaluation


# ----------------------------------------------------------------------------- data: protocol -> sources
def test_open_set_sources_cifar_plus_10_takes_its_unknowns_from_cifar100():
    train = DataSource(name="cifar10", root="/d", split="train")
    test = DataSource(name="cifar10", root="/d", split="test", jpeg_quality=90)
    ood = [DataSource(name="svhn", root="/d", label="SVHN")]
    s = open_set_sources(train, test, protocol="cifar+10", protocol_split=0, ood=ood)
    # split 0 of cifar+10 (ARPL's split.py): known CIFAR-10 classes [0, 1, 8, 9], 10 CIFAR-100 classes unknown
    assert s.train.classes == [0, 1, 8, 9] and s.test.classes == [0, 1, 8, 9] and s.train.split == "train"
    assert s.test.label == "cifar10 known (cifar+10 split 0)"
    first = s.unknowns[0]
    assert (first.name, first.split, first.root, first.jpeg_quality) == ("cifar100", "test", "/d", 90)
    assert first.classes == [30, 25, 1, 9, 8, 0, 46, 52, 49, 71] and first.label == "cifar+10 unknown (split 0)"
    assert s.unknowns[1:] == ood


def test_open_set_sources_without_protocol_and_its_errors():
    train, test = DataSource(name="demo", split="train"), DataSource(name="demo", split="test")
    ood = [DataSource(name="demo", split="ood-cifar100")]
    s = open_set_sources(train, test, ood=ood)
    assert (s.train, s.test, s.unknowns) == (train, test, ood)
    with pytest.raises(ConfigError, match="no unknown set to evaluate: set data.protocol and/or list"):
        open_set_sources(train, test)
    with pytest.raises(ConfigError, match="no unknown set to evaluate: list datasets in eval.ood$"):
        open_set_sources(train, test, protocol_key=None)
    with pytest.raises(ConfigError, match="repeated: demo"):
        open_set_sources(train, test, ood=ood * 2)
    with pytest.raises(ConfigError, match="data.train.classes is set, but data.protocol 'cifar10'"):
        open_set_sources(DataSource(name="cifar10", classes=[0]), test, protocol="cifar10")


# ----------------------------------------------------------------------------- models: the backbone factory
def test_create_backbone_is_typed_seeded_and_holds_the_frozen_dtype():
    from backmix_vlm.models.backbone import Backbone, BackboneConfig, create_backbone
    from backmix_vlm.models.clip import TINY_CLIP

    cfg = BackboneConfig(name=TINY_CLIP, pretrained=None)
    a = create_backbone(cfg, device="cpu", precision="no", seed=3)
    b = create_backbone(cfg, device="cpu", precision="bf16", seed=3)
    assert isinstance(a, Backbone) and a.family == "clip" and a.module is a.base.model
    assert a.identity == {"name": TINY_CLIP, "weights": None} and a.tokenizer is a.base.tokenizer
    assert (a.image_size, a.mean, a.std) == (a.base.image_size, list(a.base.mean), list(a.base.std))
    wa, wb = a.module.visual.conv1.weight, b.module.visual.conv1.weight
    assert wa.dtype == torch.float32 and wb.dtype == torch.bfloat16  # frozen_weights: compute
    assert torch.equal(wa.to(torch.bfloat16), wb)  # same seed, same random init
    with pytest.raises(ConfigError, match="backbone.image_size: .* takes 32 px"):
        create_backbone(BackboneConfig(name=TINY_CLIP, pretrained=None, image_size=64))


# ----------------------------------------------------------------------------- report: finish_evaluation
def test_finish_evaluation_writes_tables_scores_and_plots(tmp_path):
    per_sample = {"known::labels": np.array([0, 1, 1]), "known::msp": np.array([0.9, 0.8, 0.7], np.float32),
                  "unknown::far (crop)::msp": np.array([0.2, 0.4], np.float32)}
    ev = SimpleNamespace(per_sample=per_sample, scores=[SimpleNamespace(name="msp")],
                         unknown_names=["far (crop)"], positive="known")
    metrics = {"auroc": 1.0, "fpr95": 0.0}
    results = {"acc": 0.5, "results": {"far (crop)": {"msp": metrics}}, "extra_known": {"shifted": {"acc": 0.25}},
               "model": "m"}
    out = finish_evaluation(tmp_path / "run", results, title="T", evaluator=ev, epoch=4, summary=True, plots=True)
    run = tmp_path / "run"
    assert out == results and json.loads((run / "results.json").read_text())["extra_known"] == {"shifted": {"acc": 0.25}}
    md = (run / "results.md").read_text()
    assert md.startswith("# T") and "**Accuracy on shifted** (known classes under a shift): 25.00%" in md
    assert (run / "summary.md").read_text().startswith("# T\n\n")
    arrays, meta = load_scores(run / SCORES_FILE)
    assert meta == {"scores": ["msp"], "unknown_sets": ["far (crop)"], "positive": "known", "epoch": 4}
    assert np.array_equal(arrays["unknown::far (crop)::msp"], per_sample["unknown::far (crop)::msp"])
    assert (run / "plots" / "score_hist_far_crop.png").stat().st_size > 0

    finish_evaluation(tmp_path / "bare", results, title="T")  # tables only (zero-shot has no per-sample file)
    assert sorted(p.name for p in (tmp_path / "bare").iterdir()) == ["results.json", "results.md"]
