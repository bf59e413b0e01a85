"""Figures of a run from what it saved, so nothing is retrained or re-scored.

* :func:`score_plots`: known-vs-unknown histograms from the per-sample scores saved at
  evaluation time (``scores.safetensors``) and the metrics in ``results.json``.
* :func:`mix_with_bank` + :func:`bank_grid`: the BackMix grid (TI, BI, BI's bank map, the mask
  the mixer used, mixed image) from real training images, the run's mixer and the mask bank
  saved in a checkpoint.

The drawing itself is :mod:`backmix_vlm.report.plots` (arrays -> PNG).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError

PLOTS = "plots"   # a run's figure folder


def slug(name: str) -> str:
    """A set name as a file-name part (``"TIN (crop)"`` -> ``"TIN_crop"``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "set"


def score_plots(run_dir: str | Path, out: str | Path) -> list[Path]:
    """``score_hist_<set>.png`` per unknown set from ``run_dir``'s saved per-sample scores."""
    from ..ood.open_set import SCORES_FILE, load_scores
    from .plots import score_histograms

    run_dir, out = Path(run_dir), Path(out)
    written: list[Path] = []
    scores_path = run_dir / SCORES_FILE
    if scores_path.is_file():
        arrays, meta = load_scores(scores_path)
        results_path = run_dir / "results.json"
        results = json.loads(results_path.read_text()).get("results", {}) if results_path.is_file() else {}
        names = meta.get("scores", [])
        known = {n: arrays[f"known::{n}"] for n in names}
        for set_name in meta.get("unknown_sets", []):
            unknown = {n: arrays[f"unknown::{set_name}::{n}"] for n in names}
            written.append(score_histograms(out / f"score_hist_{slug(set_name)}.png", known, unknown,
                                            set_name=set_name, metrics=results.get(set_name)))
    return written


def mix_with_bank(ds: Any, checkpoint: str | Path, augment_cfg: Any, backmix_cfg: Any, seed: int, num: int
                  ) -> dict[str, Any] | None:
    """Mix ``num`` images of ``ds`` (the training set, eval transform) with the run's own mixer
    (``augment.build_mixer``, as in training: ``mask_source`` and every option honoured) over the
    mask bank saved in ``checkpoint``.  None when the mixer uses no bank or the checkpoint has none."""
    from ..augment import MaskBank, MixerSetup, build_mixer
    from ..engine.checkpoint import load_checkpoint

    mixer = build_mixer(augment_cfg, backmix_cfg)
    if not mixer.needs_bank:
        return None
    state = load_checkpoint(checkpoint)
    if state.get("bank") is None:
        return None
    bank_tensor = state["bank"]["bank"]
    bank = MaskBank(bank_tensor.shape[0], tuple(bank_tensor.shape[1:]), momentum=backmix_cfg.momentum)
    bank.load_state_dict(state["bank"])
    if len(ds) != bank.num_samples:
        raise DataError(f"{checkpoint}: the mask bank has {bank.num_samples} rows but the training set now has "
                        f"{len(ds)} images; the data changed since training")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[: max(2, min(num, len(ds)))]
    images = torch.stack([ds[int(i)][0] for i in idx])
    labels = torch.tensor([ds.labels[int(i)] for i in idx])
    mixer.setup(MixerSetup(generator=g, bank=bank, true_masks=getattr(ds, "foreground_masks", None)))
    res = mixer(images, labels, idx, return_masks=True)
    partner = res.extras["partner"]
    classes = ds.classes
    return {
        "indices": idx, "partner": partner, "targets": images, "backgrounds": images[partner], "soft_masks": bank.get(idx[partner]),
        "binary": res.extras["fg_cells"].float(), "mixed": res.images, "mixer": mixer,
        "titles": [f"{classes[int(labels[i])]} / {classes[int(labels[partner[i]])]}" for i in range(len(idx))],
    }


def bank_grid(path: str | Path, samples: dict[str, Any], mean: Any, std: Any) -> Path:
    """Draw :func:`mix_with_bank`'s samples as ``path`` (the top-k mask upsampled to the image)."""
    import torch.nn.functional as F

    from .plots import backmix_grid

    h, w = samples["targets"].shape[-2:]
    binary = F.interpolate(samples["binary"][:, None], size=(h, w), mode="nearest")[:, 0]
    return backmix_grid(path, samples["targets"], samples["backgrounds"], samples["soft_masks"], samples["mixed"],
                        mean=mean, std=std, binary_masks=binary, titles=samples["titles"])
