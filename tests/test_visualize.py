"""``visualize``: the BackMix grid from the saved bank and score histograms, as PNG files."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from backmix_vlm.cli import main as cli
from backmix_vlm.engine.checkpoint import load_checkpoint
from backmix_vlm.ood.open_set import load_scores, save_scores
from backmix_vlm.report.plots import denormalize, score_histograms
from backmix_vlm.runners.visualize import grid_samples, load_run_config
from test_train import write_config

DPI = 110  # report.plots saves at this dpi; sizes below are figsize * dpi


def test_visualize_writes_grid_and_histograms(tmp_path, capsys):
    cfg_path = write_config(tmp_path, plots=False)
    assert cli(["train", str(cfg_path), "optim.epochs=1", "eval.every=0"]) == 0
    run = tmp_path / "runs" / "tiny"
    assert not (run / "plots").exists()
    assert cli(["visualize", str(run), "--num", "4"]) == 0

    grid = Image.open(run / "plots" / "backmix_grid.png")
    assert grid.size == (round(4 * 1.6 * DPI), round(4 * 1.6 * DPI))  # 4 columns x 4 rows of 1.6 in cells
    assert np.asarray(grid.convert("L")).std() > 10  # not a blank canvas
    hist = Image.open(run / "plots" / "score_hist_noise.png")
    assert hist.size == (round(2 * 3.6 * DPI), round(3.0 * DPI))  # one panel per score (msp, energy)

    # the grid's masks are the saved bank rows of each background image
    cfg = load_run_config(run)
    s = grid_samples(cfg, run / "last.pt", 4)
    bank = load_checkpoint(run / "last.pt")["bank"]["bank"]
    assert torch.equal(s["soft_masks"], bank[s["indices"][s["partner"]]])
    assert (s["partner"] != torch.arange(4)).all()  # every TI got another image as background
    # pixels outside the pasted box are the target's own
    changed = (s["mixed"] != s["targets"]).any(1)
    assert changed.any() and changed.float().mean() <= 0.25 + 1e-6  # at most the s = 0.25 box


def test_denormalize_inverts_normalize():
    x = torch.rand(2, 3, 5, 5)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    z = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    np.testing.assert_allclose(denormalize(z, mean, std), x.permute(0, 2, 3, 1).numpy(), atol=1e-6)


def test_scores_file_roundtrip_and_histogram(tmp_path):
    arrays = {"known::msp": np.linspace(0, 1, 7, dtype=np.float32), "unknown::A (crop)::msp": np.zeros(3, np.float32)}
    save_scores(tmp_path / "s.safetensors", arrays, {"scores": ["msp"], "unknown_sets": ["A (crop)"]})
    back, meta = load_scores(tmp_path / "s.safetensors")
    assert meta == {"scores": ["msp"], "unknown_sets": ["A (crop)"]}
    np.testing.assert_array_equal(back["known::msp"], arrays["known::msp"])
    out = score_histograms(tmp_path / "h.png", {"msp": back["known::msp"]}, {"msp": back["unknown::A (crop)::msp"]},
                           set_name="A (crop)", metrics={"msp": {"auroc": 0.9}})
    assert Image.open(out).size == (round(3.6 * DPI), round(3.0 * DPI))
