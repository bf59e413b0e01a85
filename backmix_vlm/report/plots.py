"""Pictures of a run: the BackMix grid (paper Fig. 3 / 6) and known-vs-unknown score histograms.

Pure functions from arrays to PNG files, on matplotlib's Agg backend (no display needed).
Images arrive normalised, as the model saw them, and are de-normalised for display.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

GRID_COLUMNS = ("target image (TI)", "background image (BI)", "BI foreground (mask bank)", "BackMix image")


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(B, 3, H, W) normalised tensors -> (B, H, W, 3) float arrays in [0, 1] for imshow."""
    m = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
    x = images.detach().float().cpu() * s + m
    return x.clamp(0, 1).permute(0, 2, 3, 1).numpy()


def backmix_grid(
    path: str | Path,
    targets: torch.Tensor,
    backgrounds: torch.Tensor,
    soft_masks: torch.Tensor,
    mixed: torch.Tensor,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    binary_masks: torch.Tensor | None = None,
    titles: Sequence[str] | None = None,
    cell_inches: float = 1.6,
) -> Path:
    """One row per sample: TI | BI | BI's bank map (heat map, top-k outline) | mixed image.

    The heat map is min-max scaled per image (the top-k mask depends only on the ranking).

    ``soft_masks`` (B, h, w) are bank maps in [0, 1] at CAM resolution (upsampled here);
    ``binary_masks`` (B, H, W) the sharpened foreground C_B actually blanked out.
    """
    n = targets.shape[0]
    h, w = targets.shape[-2:]
    ti, bi, mx = (denormalize(t, mean, std) for t in (targets, backgrounds, mixed))
    soft = F.interpolate(soft_masks[:, None].float().cpu(), size=(h, w), mode="nearest")[:, 0]
    # per-image min-max: only the ranking of cells matters for the top-k mask
    lo, hi = soft.amin(dim=(1, 2), keepdim=True), soft.amax(dim=(1, 2), keepdim=True)
    soft = ((soft - lo) / (hi - lo).clamp_min(1e-8)).numpy()
    fig, axes = plt.subplots(n, 4, figsize=(4 * cell_inches, n * cell_inches), squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(ti[i], interpolation="nearest")
        axes[i, 1].imshow(bi[i], interpolation="nearest")
        axes[i, 2].imshow(bi[i], interpolation="nearest")
        axes[i, 2].imshow(soft[i], cmap="inferno", vmin=0, vmax=1, alpha=0.6, interpolation="nearest")
        if binary_masks is not None:
            axes[i, 2].contour(binary_masks[i].float().cpu().numpy(), levels=[0.5], colors="cyan", linewidths=0.8)
        axes[i, 3].imshow(mx[i], interpolation="nearest")
        if titles is not None:
            axes[i, 0].set_ylabel(titles[i], fontsize=7)
    for j, name in enumerate(GRID_COLUMNS):
        axes[0, j].set_title(name, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return _save(fig, path)


def panel_grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    """(rows, columns) for ``n`` panels: one row up to ``max_cols``, then rows of ``max_cols`` (9 -> 3 x 4
    rather than one 9-panel strip no screen shows legibly)."""
    n = max(1, n)
    cols = min(n, max_cols)
    return -(-n // cols), cols


def score_histograms(
    path: str | Path,
    known: Mapping[str, np.ndarray],
    unknown: Mapping[str, np.ndarray],
    *,
    set_name: str,
    metrics: Mapping[str, Mapping[str, float]] | None = None,
    bins: int = 40,
) -> Path:
    """One panel per score: known vs ``set_name`` score distributions (higher = known).

    ``known`` / ``unknown`` map score name -> per-sample scores; ``metrics[score]`` (e.g.
    ``{"auroc": 0.91}``) is written into the panel title when given.
    """
    names = [s for s in known if s in unknown]
    rows, cols = panel_grid(len(names))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:  # the grid's empty cells
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        k, u = np.asarray(known[name], dtype=np.float64), np.asarray(unknown[name], dtype=np.float64)
        lo, hi = np.nanmin(np.r_[k, u]), np.nanmax(np.r_[k, u])
        edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, bins + 1)
        ax.hist(k, bins=edges, alpha=0.6, density=True, label=f"known (n={len(k)})")
        ax.hist(u, bins=edges, alpha=0.6, density=True, label=f"unknown (n={len(u)})")
        title = name
        if metrics and name in metrics and metrics[name].get("auroc") is not None:
            title += f"  AUROC {100 * metrics[name]['auroc']:.1f}"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("score (higher = known)", fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(f"known vs {set_name}", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: plt.Figure, path: str | Path) -> Path:
    import io

    from ..atomic import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
