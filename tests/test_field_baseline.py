"""The field-baseline script: its records, its tables, and the GPU script's CPU smoke pass."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _script():
    spec = importlib.util.spec_from_file_location("field_baseline", REPO / "scripts" / "field_baseline.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_set_metrics_both_fpr95_conventions_by_hand():
    fb = _script()
    known = np.array([10.0, 9, 8, 7, 6, 5, 4, 3, 2, 1] * 2)      # 20 knowns, higher = more known
    unknown = np.array([5.5, 0.5, 0.4, 0.3])
    m = fb.set_metrics({"known::msp": known, "unknown::U::msp": unknown}, "U", "msp")
    # ID positive: the threshold keeping >= 95 % of knowns is 1 (all 20 kept): 1 of 4 unknowns above it
    assert m["fpr95_id_positive"] == pytest.approx(25.0)
    # OOD positive: flag >= 95 % of unknowns (all 4) needs threshold 5.5: knowns <= 5.5 flagged = 10 of 20
    assert m["fpr95_ood_positive"] == pytest.approx(50.0)
    pairs = [(k, u) for k in known for u in unknown]
    assert m["auroc"] == pytest.approx(100 * np.mean([(k > u) + 0.5 * (k == u) for k, u in pairs]))

    # a run's results.json entry (both conventions stored) is read as it is, not recomputed
    from backmix_vlm.ood.metrics import ood_metrics

    stored = ood_metrics(known, unknown)
    assert fb.set_metrics({}, "U", "msp", stored) == pytest.approx(m)
    assert fb.set_metrics({}, "U", "msp", dict(stored, fpr95_ood_positive=0.125))["fpr95_ood_positive"] == 12.5
    # an older entry without them: computed from the per-sample scores
    old = {k: v for k, v in stored.items() if k != "fpr95_ood_positive"}
    assert fb.set_metrics({"known::msp": known, "unknown::U::msp": unknown}, "U", "msp", old) == m


def test_table_pairs_backmix_with_plain_of_the_same_split_and_seed():
    fb = _script()
    rows = []
    for split, (p, b) in enumerate([(90.0, 91.0), (80.0, 84.0)]):
        for variant, auroc in (("plain", p), ("backmix", b)):
            rows.append({"recipe": "field", "protocol": "cifar10_6_4", "split": split, "seed": 0, "variant": variant,
                         "accuracy": 95.0, "auroc_msp": auroc, "auroc_maxlogit": auroc, "train_seconds": 10.0})
    rows.append(dict(rows[0], split=7, variant="backmix"))        # no Plain partner: not paired
    md = fb.table(rows)
    # differences +1 and +4: mean 2.5, sample std 2.1
    assert "| field | cifar10_6_4 | 2 | 0.0 ± 0.0 | 2.5 ± 2.1 | 2.5 ± 2.1 |" in md
    assert "| field | cifar10_6_4 | plain | 2 ([0, 1] / [0]) | 95.0 ± 0.0 | 85.0 ± 7.1 | 85.0 ± 7.1 | 10.0 ± 0.0 |" in md
    # every model also on a line of its own, unpaired ones included
    assert "| field | cifar10_6_4 | 1 | 0 | backmix | 95.0 | 84.0 | 84.0 | 10 | – |" in md
    assert "| field | cifar10_6_4 | 7 | 0 | backmix | 95.0 | 90.0 | 90.0 | 10 | – |" in md


def test_append_replaces_the_same_model_only(tmp_path):
    fb = _script()
    path = tmp_path / "runs.jsonl"
    a = {"recipe": "field", "protocol": "p", "split": 0, "seed": 0, "variant": "plain", "accuracy": 1}
    b = dict(a, variant="backmix")
    fb.append(path, [a, b])
    fb.append(path, [dict(a, accuracy=2)])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted((r["variant"], r["accuracy"]) for r in rows) == [("backmix", 1), ("plain", 2)]


def _cifar_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 3)):
        for c, name in enumerate(CIFAR10):
            d = root / "cifar10" / split / name
            d.mkdir(parents=True)
            for i in range(n):
                x = rng.integers(0, 90, (32, 32, 3), dtype=np.uint8)
                x[8:24, 8:24, c % 3] = 200 + 5 * c
                Image.fromarray(x).save(d / f"{i:04d}.png")


@pytest.mark.slow
def test_device_script_smoke_writes_records(tmp_path):
    _cifar_folder(tmp_path / "data")
    env = dict(os.environ, DATA=str(tmp_path / "data"), OUT=str(tmp_path / "out"))
    cmd = ["bash", str(REPO / "scripts" / "device" / "field_baseline.sh"), "--smoke",
           "--set", "eval.ood=[]", "--set", "model.options={widths: [8, 8, 8], tta: flip}",
           "--set", "optim.batch_size=12"]
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, timeout=600, env=env)
    rows = [json.loads(line) for line in (tmp_path / "out" / "field" / "runs.jsonl").read_text().splitlines()]
    assert sorted(r["variant"] for r in rows) == ["backmix", "plain"]
    for r in rows:
        assert r["protocol"] == "cifar10_6_4" and r["split"] == 0 and r["seed"] == 0 and r["recipe"] == "field"
        assert 0 <= r["accuracy"] <= 100 and 0 <= r["auroc_msp"] <= 100 and 0 <= r["auroc_maxlogit"] <= 100
        assert isinstance(r["train_seconds"], float) and r["smoke"] is True
        unk = r["sets"]["cifar10 unknown (split 0)"]["maxlogit"]
        assert unk["auroc"] == r["auroc_maxlogit"] and set(unk) >= {"fpr95_id_positive", "fpr95_ood_positive"}
