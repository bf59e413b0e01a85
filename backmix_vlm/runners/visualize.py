"""``backmix-vlm visualize <run-dir>``: BackMix grid and score histograms of a finished run.

Nothing is retrained or re-scored: the grid mixes real training images (eval transform, no
augmentation) with the run's saved mask bank (``last.pt``), and the histograms read the
per-sample scores the run saved at evaluation time (``scores.safetensors``).  A comparison
run (``variants``) is visualised variant by variant.  The figures are drawn by
:mod:`backmix_vlm.report.figures`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..jobs.train import grid_samples, load_run_config, run_job, write_plots
from ..report.figures import PLOTS, bank_grid, mix_with_bank, score_plots

__all__ = ["PLOTS", "load_run_config", "grid_samples", "mix_with_bank", "write_plots", "score_plots",
           "fewshot_plots", "main"]


def fewshot_plots(run_dir: Path, num: int, out: Path | None) -> list[Path]:
    """Every seed of a ``fewshot`` run: BackMix grid (attention-map bank) and score histograms."""
    from ..augment import build_mixer
    from ..data import build_dataset, build_transform
    from ..engine.checkpoint import LAST
    from ..jobs.fewshot import build_backbone, few_shot_subset, load_fewshot_config

    cfg = load_fewshot_config(run_dir / "config.yaml")
    backbone = None
    written: list[Path] = []
    for seed in cfg.data.seeds:
        seed_dir = run_dir / f"seed{seed}"
        target = (out / seed_dir.name) if out else seed_dir / PLOTS
        ckpt = seed_dir / LAST
        if build_mixer(cfg.augment, cfg.backmix).needs_bank and ckpt.is_file():
            if backbone is None:  # input size and normalisation of the backbone that was trained
                backbone = build_backbone(cfg, "cpu")
            tf = build_transform(backbone.image_size, False, backbone.mean, backbone.std,
                                 resize=cfg.data.train.resize)
            ds, _ = few_shot_subset(cfg, build_dataset(cfg.data.train, tf), seed, seed_dir)
            s = mix_with_bank(ds, ckpt, cfg.augment, cfg.backmix, seed, num)
            if s is not None:
                written.append(bank_grid(target / "backmix_grid.png", s, backbone.mean, backbone.std))
        written += score_plots(seed_dir, target)
    return written


def main(args: Any) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory not found: {run_dir}")
    num, out_arg = getattr(args, "num", 8), getattr(args, "out", None)
    written: list[Path] = []
    if run_job(run_dir) == "fewshot":
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
