"""scripts/training_methods.py: its records (intended score, OE's flagged sets out of the headline means),
its paired table, and a --smoke pass end to end on a synthetic CIFAR-10 folder."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("training_methods", REPO / "scripts" / "training_methods.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(method, backmix, seed, acc, near, far, **kw):
    return {"recipe": "fast_v3", "method": method, "backmix": backmix, "split": 0, "seed": seed, "score": "msp",
            "accuracy": acc, "auroc_protocol": near, "near": near, "far": far, "seen_in_training": [],
            "auroc": {"CIFAR-100": near, "TIN": near}, "train_seconds": 1.0, **kw}


def test_table_pairs_each_method_with_its_own_plain_variant_and_marks_flagged_sets():
    tm = _script()
    rows = [_row("oe", False, 0, 90, 80, 90, seen_in_training=["TIN"]), _row("oe", True, 0, 91, 82, 95),
            _row("oe", False, 1, 90, 84, 90), _row("oe", True, 1, 91, 90, 95),
            _row("plain", True, 0, 50, 50, 50)]                                # no Plain partner: not paired
    md = tm.table(rows)
    # Δ near: +2 and +6 -> 4.0 ± 2.8; Δ far: +5, +5
    assert "| fast_v3 | oe | 2 | 1.0 ± 0.0 | 4.0 ± 2.8 | 4.0 ± 2.8 | 5.0 ± 0.0 |" in md
    assert "| fast_v3 | plain |" not in md.split("Paired")[1].split("Published")[0]
    oe_plain = next(line for line in md.splitlines() if line.startswith("| fast_v3 | oe | plain |"))
    assert "82.0 ± 2.8 †" in oe_plain          # TIN shown with the flag
    assert "OpenOOD v1.5" in md and "89.8 → 91.0" in md


def test_records_keep_flagged_sets_out_of_near(tmp_path):
    from backmix_vlm.ood import save_scores

    tm = _script()
    run = tmp_path / "fast_v3-oe-cifar10_6_4-split0-seed0"
    known = np.linspace(1, 2, 20).astype(np.float32)
    arrays = {"known::msp": known, "unknown::CIFAR-100::msp": known - 0.5, "unknown::TIN::msp": known - 10.0,
              "unknown::MNIST::msp": known - 10.0}
    (run / "backmix").mkdir(parents=True)
    save_scores(run / "backmix" / "scores.safetensors", arrays,
                {"scores": ["msp"], "unknown_sets": ["CIFAR-100", "TIN", "MNIST"]})
    (run / "results.json").write_text(json.dumps({"variants": {"backmix": {
        "acc": 0.9, "intended_score": "msp", "seen_in_training": {"TIN": "outlier distribution seen in training"},
        "train_time_s": 3.0, "epochs": 1}}}))
    (rec,) = tm.records(run, "fast_v3", "oe", 0, 0, smoke=False)
    assert rec["seen_in_training"] == ["TIN"] and rec["backmix"] is True and rec["score"] == "msp"
    assert rec["auroc"]["TIN"] == pytest.approx(100.0) and rec["auroc"]["CIFAR-100"] < 100
    assert rec["near"] == pytest.approx(rec["auroc"]["CIFAR-100"])     # TIN (flagged) left out
    assert rec["far"] == pytest.approx(100.0)


@pytest.mark.slow
def test_smoke_pass_writes_one_record_per_model(tmp_path):
    from test_field_baseline import _cifar_folder

    tm = _script()
    data = tmp_path / "data"
    _cifar_folder(data)
    results = tmp_path / "runs.jsonl"
    outliers = "{name: imagefolder, root: %s, split: test, max_samples: 24}" % (data / "cifar10")
    common = ["--smoke", "--device", "cpu", "--data-root", str(data), "--out", str(tmp_path / "out"),
              "--results", str(results), "--sets", "--set", "model.options={widths: [8, 8, 8], tta: flip}",
              "--set", "optim.batch_size=12", "--set", "data.num_workers=0", "--set", "eval.num_workers=0"]
    tm.main([*common, "--methods", "logitnorm"])
    tm.main([*common, "--methods", "oe", "--set", f"method.outliers={outliers}",   # the synthetic test images
             "--set", "method.options={outlier_batch_ratio: 1.0}"])
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert sorted((r["method"], r["backmix"]) for r in rows) == [("logitnorm", False), ("logitnorm", True),
                                                                 ("oe", False), ("oe", True)]
    for r in rows:
        assert r["protocol"] == "cifar10_6_4" and r["split"] == 0 and r["seed"] == 0 and r["smoke"] is True
        assert r["score"] == "msp" and 0 <= r["accuracy"] <= 100
        assert set(r["auroc"]) == {"cifar10 unknown (split 0)"} and r["auroc_protocol"] == r["auroc"]["cifar10 unknown (split 0)"]
        assert isinstance(r["train_seconds"], float) and "--smoke" in r["command"]
    assert (tmp_path / "runs.md").is_file()


@pytest.mark.slow
def test_device_script_smoke_writes_records(tmp_path):
    import os
    import subprocess

    from test_field_baseline import _cifar_folder

    data = tmp_path / "data"
    _cifar_folder(data)
    env = dict(os.environ, DATA=str(data), OUT=str(tmp_path / "out"), METHODS="rotpred arpl")
    cmd = ["bash", str(REPO / "scripts" / "device" / "training_methods.sh"), "--smoke",
           "--set", "model.name=small_cnn", "--set", "model.options={width: 4}", "--set", "optim.batch_size=12"]
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, timeout=900, env=env)
    rows = [json.loads(line) for line in (tmp_path / "out" / "methods" / "runs.jsonl").read_text().splitlines()]
    assert sorted((r["method"], r["backmix"]) for r in rows) == [("arpl", False), ("arpl", True),
                                                                 ("rotpred", False), ("rotpred", True)]
    for r in rows:
        assert r["recipe"] == "resnet18" and r["smoke"] is True and r["epochs"] == 1
        assert r["score"] == {"arpl": "maxlogit", "rotpred": "rotpred"}[r["method"]]
        assert 0 <= r["auroc_protocol"] <= 100
