"""The README demo (configs/demo.yaml), shortened to 1 epoch: plain vs BackMix in one command."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from backmix_vlm.cli import main as cli

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


@pytest.mark.slow
def test_demo_config_trains_both_variants_and_compares(tmp_path, capsys):
    assert cli(["train", str(DEMO), f"run.output_dir={tmp_path}", "optim.epochs=1", "eval.every=0",
                "data.num_workers=0"]) == 0
    run = tmp_path / "demo"
    results = json.loads((run / "results.json").read_text())["variants"]
    assert list(results) == ["plain", "backmix"]
    assert results["plain"]["augment"] == "none" and results["backmix"]["augment"] == "backmix"
    for res in results.values():
        assert set(res["results"]) == {"cifar10 unknown (split 0)", "CIFAR-100"}
        assert res["counts"] == {"known": 120, "cifar10 unknown (split 0)": 80, "CIFAR-100": 200}
    table = (run / "results.md").read_text()
    assert "| Model | Variant | Accuracy | cifar10 unknown (split 0) AUROC" in table
    assert "| small_cnn, 1 epochs | plain |" in table and "|  | backmix |" in table and "## Score: energy" in table
    assert Image.open(run / "backmix" / "plots" / "backmix_grid.png").size[0] > 0
    assert not (run / "plain" / "plots" / "backmix_grid.png").exists()  # plain training has no mask bank
    assert "Comparison: plain, backmix" in capsys.readouterr().out
