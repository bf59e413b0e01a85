"""A seconds-long pass of the issue-8 comparison script (scripts/osr_cifar10.py, the GPU script's driver)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.mark.slow
def test_osr_script_smoke_writes_the_table(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 3)):
        for c, name in enumerate(CIFAR10):
            d = tmp_path / "data" / "cifar10" / split / name
            d.mkdir(parents=True)
            for i in range(n):
                x = rng.integers(0, 90, (32, 32, 3), dtype=np.uint8)
                x[8:24, 8:24, c % 3] = 200 + 5 * c
                Image.fromarray(x).save(d / f"{i:04d}.png")
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "scripts" / "osr_cifar10.py"), "--smoke", "--device", "cpu",
           "--data-root", str(tmp_path / "data"), "--out", str(out), "--recipe", "fast",
           "--set", "eval.ood=[]", "--set", "model.options={widths: [8, 8, 8], tta: flip}",
           "--set", "optim.batch_size=12", "--set", "data.num_workers=0", "--set", "eval.num_workers=0"]
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, timeout=300)
    report = json.loads((out / "table.json").read_text())
    assert set(report["fast"]) == {"plain", "backmix"}
    row = report["fast"]["backmix"][0]
    assert 0.0 <= row["acc"] <= 1.0 and 0.0 <= row["auroc_maxlogit"] <= 1.0 and row["run"] == "fast-split0-seed0"
    md = (out / "table.md").read_text()
    assert "| published | + BackMix (BackMix paper, Table IV) |" in md and "| fast | plain | split 0, seed 0 | 1 |" in md
    assert "| fast | backmix − plain | split0-seed0 | 1 |" in md  # the paired difference on the same run
    # asking for an ablation later runs only that variant, in a folder of its own; the finished run is untouched
    before = (out / "fast-split0-seed0" / "results.json").read_bytes()
    subprocess.run(cmd + ["--variants", "plain", "cutout"], check=True, cwd=REPO, capture_output=True, timeout=300)
    assert (out / "fast-split0-seed0" / "results.json").read_bytes() == before
    extra = json.loads((out / "fast-split0-seed0-cutout" / "results.json").read_text())["variants"]
    assert set(extra) == {"cutout"}
    report = json.loads((out / "table.json").read_text())
    assert set(report["fast"]) == {"plain", "backmix", "cutout"}
    assert [r["run"] for r in report["fast"]["plain"]] == ["fast-split0-seed0"]
