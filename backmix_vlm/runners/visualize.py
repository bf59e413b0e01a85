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
    """Mix ``num`` training images of a train run with the checkpoint's bank (None without a bank)."""
    from ..data import build_dataset, build_transform
    from .train import resolve_sources

    train_src, _, _ = resolve_sources(cfg)
    d = cfg.data
    ds = build_dataset(train_src, build_transform(d.image_size, False, d.mean, d.std, resize=train_src.resize))
    return mix_with_bank(ds, checkpoint, cfg.backmix, cfg.run.seed, num)


def mix_with_bank(ds: Any, checkpoint: Path, backmix_cfg: Any, seed: int, num: int) -> dict[str, torch.Tensor] | None:
    """BackMix ``num`` images of ``ds`` (the training set, eval transform) with a saved mask bank."""
    from ..augment import BackMix, MaskBank
    from ..engine.checkpoint import load_checkpoint

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
    mixer = BackMix(bank, cut_area=backmix_cfg.cut_area, mask_ratio=backmix_cfg.mask_ratio,
                    same_location=backmix_cfg.same_location, pairing=backmix_cfg.pairing, generator=g)
    res = mixer(images, labels, idx, return_masks=True)
    partner = res.extras["partner"]
    classes = ds.classes
    return {
        "indices": idx, "partner": partner, "targets": images, "backgrounds": images[partner], "soft_masks": bank.get(idx[partner]),
        "binary": bank.foreground(idx[partner], backmix_cfg.mask_ratio), "mixed": res.images,
        "titles": [f"{classes[int(labels[i])]} / {classes[int(labels[partner[i]])]}" for i in range(len(idx))],
    }


def _draw_grid(path: Path, s: dict[str, Any], mean: Any, std: Any) -> Path:
    import torch.nn.functional as F

    from ..report.plots import backmix_grid

    h, w = s["targets"].shape[-2:]
    binary = F.interpolate(s["binary"][:, None], size=(h, w), mode="nearest")[:, 0]
    return backmix_grid(path, s["targets"], s["backgrounds"], s["soft_masks"], s["mixed"], mean=mean, std=std,
                        binary_masks=binary, titles=s["titles"])


def fewshot_plots(run_dir: Path, num: int, out: Path | None) -> list[Path]:
    """Every seed of a ``fewshot`` run: BackMix grid (attention-map bank) and score histograms."""
    from ..data import IndexedSubset, build_dataset, build_transform, fewshot_indices
    from ..engine.checkpoint import LAST
    from .fewshot import build_backbone, load_fewshot_config, split_file

    cfg = load_fewshot_config(run_dir / "config.yaml")
    backbone = None
    written: list[Path] = []
    for seed in cfg.data.seeds:
        seed_dir = run_dir / f"seed{seed}"
        target = (out / seed_dir.name) if out else seed_dir / PLOTS
        ckpt = seed_dir / LAST
        if cfg.backmix.enabled and ckpt.is_file():
            if backbone is None:  # input size and normalisation of the backbone that was trained
                backbone = build_backbone(cfg, "cpu")
            tf = build_transform(backbone["image_size"], False, backbone["mean"], backbone["std"],
                                 resize=cfg.data.train.resize)
            ds = build_dataset(cfg.data.train, tf)
            k = cfg.data.shots_per_class
            if k is not None:
                ds = IndexedSubset(ds, fewshot_indices(ds.labels, k, seed, split_file(cfg, seed_dir, seed)))
            s = mix_with_bank(ds, ckpt, cfg.backmix, seed, num)
            if s is not None:
                written.append(_draw_grid(target / "backmix_grid.png", s, backbone["mean"], backbone["std"]))
        written += score_plots(seed_dir, target)
    return written


def write_plots(run_dir: str | Path, cfg: Any = None, *, checkpoint: str | Path | None = None, num: int = 8,
                out: str | Path | None = None) -> list[Path]:
    """Write ``backmix_grid.png`` and ``score_hist_<set>.png`` for one train run; returns the files."""
    from ..engine.checkpoint import LAST

    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / PLOTS
    cfg = cfg if cfg is not None else load_run_config(run_dir)
    written: list[Path] = []
    ckpt = Path(checkpoint) if checkpoint else run_dir / LAST
    if cfg is not None and ckpt.is_file():
        s = grid_samples(cfg, ckpt, num)
        if s is not None:
            written.append(_draw_grid(out / "backmix_grid.png", s, cfg.data.mean, cfg.data.std))
    return written + score_plots(run_dir, out)


def score_plots(run_dir: Path, out: Path) -> list[Path]:
    """Known-vs-unknown histograms from the per-sample scores saved at evaluation time."""
    from ..engine.evaluation import SCORES_FILE, load_scores
    from ..report.plots import score_histograms

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
            written.append(score_histograms(out / f"score_hist_{_slug(set_name)}.png", known, unknown,
                                            set_name=set_name, metrics=results.get(set_name)))
    return written


def _job(run_dir: Path) -> str:
    info = run_dir / "run_info.json"
    return json.loads(info.read_text()).get("job", "train") if info.is_file() else "train"


def main(args: Any) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory not found: {run_dir}")
    num, out_arg = getattr(args, "num", 8), getattr(args, "out", None)
    written: list[Path] = []
    if _job(run_dir) == "fewshot":
        written = fewshot_plots(run_dir, num, Path(out_arg) if out_arg else None)
    else:
        cfg = load_run_config(run_dir)
        targets = [run_dir]
        if cfg is not None and cfg.variants:
            targets = [run_dir / name for name in cfg.variants if (run_dir / name).is_dir()]
        for target in targets:
            out = Path(out_arg) / target.name if out_arg and target != run_dir else out_arg
            written += write_plots(target, num=num, out=out)
    if not written:
        raise ConfigError(f"{run_dir}: nothing to plot (no last.pt with a mask bank, no {PLOTS} scores); "
                          "has the run finished its first evaluation?")
    for path in written:
        print(path)
    return 0
