"""``backmix-vlm visualize <run-dir>``: BackMix grid and score histograms of a finished run.

Nothing is retrained or re-scored: the grid mixes real training images (eval transform, no
augmentation) with the run's saved mask bank (``last.pt``), and the histograms read the
per-sample scores the run saved at evaluation time (``scores.safetensors``).  A comparison
run (``variants``) is visualised variant by variant.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, DataError

PLOTS = "plots"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "set"


def load_run_config(run_dir: Path) -> Any:
    """The run's resolved ``config.yaml`` as a :class:`TrainConfig` (train runs only)."""
    from ..config import from_dict, load_yaml
    from .train import TrainConfig

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no config.yaml; is this a run directory written by backmix-vlm train?")
    info_path = run_dir / "run_info.json"
    job = json.loads(info_path.read_text()).get("job") if info_path.is_file() else "train"
    if job != "train":
        return None
    return from_dict(TrainConfig, load_yaml(path))


def grid_samples(cfg: Any, checkpoint: Path, num: int) -> dict[str, torch.Tensor] | None:
    """Mix ``num`` training images with the checkpoint's bank; None when the run has no bank."""
    from ..augment import BackMix, MaskBank
    from ..data import build_dataset, build_transform
    from ..engine.checkpoint import load_checkpoint
    from .train import resolve_sources

    state = load_checkpoint(checkpoint)
    if state.get("bank") is None:
        return None
    bank_tensor = state["bank"]["bank"]
    bank = MaskBank(bank_tensor.shape[0], tuple(bank_tensor.shape[1:]), momentum=cfg.backmix.momentum)
    bank.load_state_dict(state["bank"])
    train_src, _, _ = resolve_sources(cfg)
    d = cfg.data
    ds = build_dataset(train_src, build_transform(d.image_size, False, d.mean, d.std, resize=train_src.resize))
    if len(ds) != bank.num_samples:
        raise DataError(f"{checkpoint}: the mask bank has {bank.num_samples} rows but the training set now has "
                        f"{len(ds)} images; the data changed since training")
    g = torch.Generator().manual_seed(cfg.run.seed)
    idx = torch.randperm(len(ds), generator=g)[: max(2, min(num, len(ds)))]
    images = torch.stack([ds[int(i)][0] for i in idx])
    labels = torch.tensor([ds.labels[int(i)] for i in idx])
    mixer = BackMix(bank, cut_area=cfg.backmix.cut_area, mask_ratio=cfg.backmix.mask_ratio,
                    same_location=cfg.backmix.same_location, pairing=cfg.backmix.pairing, generator=g)
    res = mixer(images, labels, idx, return_masks=True)
    partner = res.extras["partner"]
    classes = ds.classes
    return {
        "indices": idx, "partner": partner, "targets": images, "backgrounds": images[partner], "soft_masks": bank.get(idx[partner]),
        "binary": bank.foreground(idx[partner], cfg.backmix.mask_ratio), "mixed": res.images,
        "titles": [f"{classes[int(labels[i])]} / {classes[int(labels[partner[i]])]}" for i in range(len(idx))],
    }


def write_plots(run_dir: str | Path, cfg: Any = None, *, checkpoint: str | Path | None = None, num: int = 8,
                out: str | Path | None = None) -> list[Path]:
    """Write ``backmix_grid.png`` and ``score_hist_<set>.png`` for one run; returns the files."""
    import torch.nn.functional as F

    from ..engine.checkpoint import LAST
    from ..engine.evaluation import SCORES_FILE, load_scores
    from ..report.plots import backmix_grid, score_histograms

    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / PLOTS
    cfg = cfg if cfg is not None else load_run_config(run_dir)
    written: list[Path] = []
    ckpt = Path(checkpoint) if checkpoint else run_dir / LAST
    if cfg is not None and ckpt.is_file():
        s = grid_samples(cfg, ckpt, num)
        if s is not None:
            h, w = s["targets"].shape[-2:]
            binary = F.interpolate(s["binary"][:, None], size=(h, w), mode="nearest")[:, 0]
            written.append(backmix_grid(out / "backmix_grid.png", s["targets"], s["backgrounds"], s["soft_masks"],
                                        s["mixed"], mean=cfg.data.mean, std=cfg.data.std, binary_masks=binary,
                                        titles=s["titles"]))
    scores_path = run_dir / SCORES_FILE
    if scores_path.is_file():
        arrays, meta = load_scores(scores_path)
        results_path = run_dir / "results.json"
        results = json.loads(results_path.read_text()).get("results", {}) if results_path.is_file() else {}
        names = meta.get("scores", [])
        known = {n: arrays[f"known::{n}"] for n in names}
        for set_name in meta.get("unknown_sets", []):
            unknown = {n: arrays[f"unknown::{set_name}::{n}"] for n in names}
            written.append(score_histograms(out / f"score_hist_{_slug(set_name)}.png", known, unknown,
                                            set_name=set_name, metrics=results.get(set_name)))
    return written


def main(args: Any) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory not found: {run_dir}")
    cfg = load_run_config(run_dir)
    targets = [run_dir]
    if cfg is not None and cfg.variants:
        targets = [run_dir / name for name in cfg.variants if (run_dir / name).is_dir()]
    written = []
    for target in targets:
        out = Path(args.out) / target.name if getattr(args, "out", None) and target != run_dir else getattr(args, "out", None)
        written += write_plots(target, num=getattr(args, "num", 8), out=out)
    if not written:
        raise ConfigError(f"{run_dir}: nothing to plot (no last.pt with a mask bank, no {PLOTS} scores); "
                          "has the run finished its first evaluation?")
    for path in written:
        print(path)
    return 0
