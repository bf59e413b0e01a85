#!/usr/bin/env python
"""Background-shift benchmark with known foregrounds (issue 7): one command, table + pictures.

For each planted correlation rho (and training seed), generates the ``bgshift`` dataset once
(``python -m backmix_vlm.data.bgshift``; reused when present), trains every variant of
``configs/bgshift/small_cnn.yaml`` (Plain, BackMix alongside / mixed-only / k = 0 / random
mask / true-mask oracle / v0.1 frame, Cutout, CutMix) with the same seed and schedule, and
writes into ``--out``:

* ``table.md`` / ``table.json``: accuracy on matched vs swapped backgrounds (the gap = how
  much the classifier relies on the background), AUROC / OSCR (MSP, MaxLogit) for unknowns
  on known and on unseen backgrounds, and the bank's final mask precision / IoU against the
  true foreground (with the random and centre-prior references); mean ± std over seeds;
* ``mask_precision.png``: bank mask precision per epoch (frame-consistent bank vs the v0.1
  frame vs mixed-only, with the references);
* ``grid.png``: image, true mask, bank mask (top-k) and a BackMix mixed image.

Runs finished earlier are reused (delete a run folder to redo it); an interrupted run
resumes.  Usage::

    python scripts/bench_bgshift.py --sources /path/with/unpacked/shared/data --out runs/bench_bgshift
    python scripts/bench_bgshift.py --smoke ...     # 1 epoch, 2 variants, tiny data: a pipeline check
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from backmix_vlm.runtime import machine_line  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "bgshift" / "small_cnn.yaml"          # train job; its variants are in the config
VPT_CONFIG = REPO / "configs" / "bgshift" / "vpt_vits14.yaml"     # fewshot job: one method per call
MODELS = ("small_cnn", "vpt_vits14")
#: the same variants as configs/bgshift/small_cnn.yaml, as overrides of the fewshot job's config
VPT_VARIANTS = {"plain": ["backmix.enabled=false"], "backmix": [], "backmix_mixed_only": ["backmix.mode=mixed_only"],
                "backmix_k0": ["backmix.mask_ratio=0.0"], "backmix_random_mask": ["backmix.mask_source=random"],
                "backmix_oracle_mask": ["backmix.mask_source=oracle"], "backmix_v01_frame": ["data.views.name=loader"],
                "cutout": ["augment.name=cutout"], "cutmix": ["augment.name=cutmix"]}
ROWS = ["plain", "backmix", "backmix_mixed_only", "backmix_k0", "backmix_random_mask", "backmix_oracle_mask",
        "backmix_v01_frame", "cutout", "cutmix"]
UNKNOWN = {"unknown-knownbg": "unknown on known bg", "unknown-unseenbg": "unknown on unseen bg"}


#: variants repeated on the extra seeds / correlations (the CPU budget of ~1.5 h does not fit all nine
#: variants five times): the method, its mask ablations and the baselines it must beat
CORE = ["plain", "backmix", "backmix_oracle_mask"]
CORRELATION = ["plain", "backmix"]


def plan(smoke: bool, full: bool, model: str = "small_cnn") -> list[tuple[float, int, list[str] | None]]:
    """(rho, seed, variants or None for all): every variant at rho 0.9 seed 0, the core ones on two
    more seeds (VPT: plain / BackMix; its oracle row is seed 0 only), plain / BackMix at rho 0.7 and 0.5
    (``--full``: everything everywhere)."""
    if smoke:
        return [(0.9, 0, ["plain", "backmix"])]
    if full:
        return [(0.9, 0, None), (0.9, 1, None), (0.9, 2, None), (0.7, 0, None), (0.5, 0, None)]
    core = CORE if model == "small_cnn" else CORRELATION
    return [(0.9, 0, None), (0.9, 1, core), (0.9, 2, core), (0.7, 0, CORRELATION), (0.5, 0, CORRELATION)]


def ensure_data(out: Path, sources: Path, rho: float, smoke: bool, data_dir: Path | None = None) -> Path:
    folder = (data_dir or out / "data") / f"rho{rho}"
    if (folder / "meta.json").is_file():
        return folder
    sizes = ["--train-per-class", "60", "--test-per-class", "30", "--unknown-per-set", "120"] if smoke else []
    cmd = [sys.executable, "-m", "backmix_vlm.data.bgshift", "--out", str(folder), "--rho", str(rho), "--seed", "0",
           "--fashion-mnist", str(sources / "fashion_mnist"), "--mnist", str(sources / "mnist"),
           "--dtd", str(sources / "dtd_partial"), "--tinyimagenet", str(sources / "tiny-imagenet-200"), *sizes]
    subprocess.run(cmd, check=True, cwd=REPO)
    return folder


def run_one_fewshot(out: Path, data: Path, rho: float, seed: int, smoke: bool, extra: list[str],
                    variants: list[str] | None = None) -> Path:
    """One fewshot run per variant into ``<out>/rho-seed/<variant>``, then a ``results.json`` holding
    every variant's results in the layout of the train job's comparison runs."""
    run_dir = out / f"rho{rho}-seed{seed}"
    results = {}
    for name in variants or list(VPT_VARIANTS):
        seed_dir = run_dir / name / f"seed{seed}"
        if not (seed_dir / "results.json").is_file():
            overrides = [f"data_root={data}", f"run.output_dir={run_dir}", f"run.name={name}", f"data.seeds=[{seed}]",
                         f"data.split_dir={out / 'splits'}", *VPT_VARIANTS[name], *extra]
            if smoke:
                overrides += ["optim.epochs=2", "optim.warmup_epochs=0", "eval.every=1", "data.shots=4"]
            run_job("fewshot", VPT_CONFIG, overrides, resume=(run_dir / name).is_dir())
        results[name] = json.loads((seed_dir / "results.json").read_text())
    (run_dir / "results.json").write_text(json.dumps({"variants": results}, indent=1))
    return run_dir


def variant_dir(run_dir: Path, name: str) -> Path:
    """Where a variant's log and checkpoint are: ``<name>/`` (train job) or ``<name>/seed<k>/`` (fewshot job)."""
    seeds = sorted((run_dir / name).glob("seed*/log.jsonl"))
    return seeds[0].parent if seeds else run_dir / name


def run_one(out: Path, data: Path, rho: float, seed: int, smoke: bool, extra: list[str],
            variants: list[str] | None = None) -> Path:
    name = f"rho{rho}-seed{seed}"
    run_dir = out / name
    if (run_dir / "results.json").is_file():
        return run_dir
    overrides = [f"data_root={data}", f"run.output_dir={out}", f"run.name={name}", f"run.seed={seed}", *extra]
    if smoke:
        overrides += ["optim.epochs=1", "eval.every=1"]
    if variants is not None:  # keep the config's definitions of the chosen variants
        import yaml

        defined = yaml.safe_load(CONFIG.read_text())["variants"]
        chosen = {v: defined[v] for v in variants}
        overrides.append("variants=" + json.dumps(chosen))
    run_job("train", CONFIG, overrides, resume=run_dir.is_dir())
    return run_dir


def run_job(job: str, config: Path, overrides: list[str], resume: bool) -> None:
    """``backmix-vlm <job> <config> <overrides>`` in a subprocess; ``--resume`` continues an interrupted run."""
    cmd = [sys.executable, "-m", "backmix_vlm.cli", job, str(config), *overrides, *(["--resume"] if resume else [])]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


# ----------------------------------------------------------------------------- table
def last_row(path: Path) -> dict:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[-1] if rows else {}


def collect(run_dir: Path) -> dict[str, dict]:
    res = json.loads((run_dir / "results.json").read_text())["variants"]
    out = {}
    for name, r in res.items():
        row = {"acc_matched": r["acc"], "acc_swapped": r["extra_known"]["swapped"]["acc"]}
        row["gap"] = row["acc_matched"] - row["acc_swapped"]
        for ood in UNKNOWN:
            for score in ("msp", "maxlogit"):
                m = r["results"][ood][score]
                row[f"auroc/{ood}/{score}"] = m["auroc"]
                row[f"oscr/{ood}/{score}"] = m["oscr"]
        log = last_row(variant_dir(run_dir, name) / "log.jsonl")
        for k in ("mask_precision", "mask_iou", "mask_random_precision", "mask_centre_precision"):
            if k in log:
                row[k] = log[k]
        out[name] = row
    return out


def fmt(values: list[float]) -> str:
    v = 100 * np.asarray(values, dtype=float)
    return f"{v.mean():.1f}" if len(v) == 1 else f"{v.mean():.1f} ± {v.std(ddof=1):.1f}"


def table(results: dict[str, list[dict]], title: str) -> str:
    cols = [("acc_matched", "Acc matched"), ("acc_swapped", "Acc swapped"), ("gap", "Gap ↓")]
    for ood, label in UNKNOWN.items():
        cols += [(f"auroc/{ood}/msp", f"AUROC MSP, {label}"), (f"auroc/{ood}/maxlogit", f"AUROC MaxLogit, {label}"),
                 (f"oscr/{ood}/msp", f"OSCR MSP, {label}")]
    cols += [("mask_precision", "Mask precision"), ("mask_iou", "Mask IoU")]
    lines = [f"### {title}", "", "| Variant | " + " | ".join(c[1] for c in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for name in [r for r in ROWS if r in results] + [r for r in results if r not in ROWS]:
        runs = results[name]
        cells = [fmt([r[k] for r in runs]) if all(k in r for r in runs) else "–" for k, _ in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    ref = next((r for runs in results.values() for r in runs if "mask_random_precision" in r), None)
    if ref:
        lines += ["", f"Mask-precision references (same images, k = 0.25): random top-k "
                      f"{100 * ref['mask_random_precision']:.1f}, centre prior {100 * ref['mask_centre_precision']:.1f}."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- pictures
def plot_mask_curves(run_dir: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ref = None
    finished = set(json.loads((run_dir / "results.json").read_text())["variants"])  # not a stray partial run
    for name, style in (("backmix", "-o"), ("backmix_mixed_only", "-s"), ("backmix_v01_frame", "--^"),
                        ("backmix_oracle_mask", ":x")):
        log = variant_dir(run_dir, name) / "log.jsonl"
        if name not in finished or not log.is_file():
            continue
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        ax.plot([r["epoch"] for r in rows], [100 * r["mask_precision"] for r in rows], style, label=name)
        ref = rows[-1]
    if ref:
        ax.axhline(100 * ref["mask_random_precision"], color="grey", lw=1, label="random top-k")
        ax.axhline(100 * ref["mask_centre_precision"], color="k", lw=1, ls="--", label="centre prior")
    ax.set_xlabel("epoch")
    ax.set_ylabel("bank mask precision vs true foreground (%)")
    ax.set_title(f"Mask bank quality, {run_dir.name}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_grid(run_dir: Path, data: Path, path: Path, n: int = 8) -> None:
    """Rows: image, true mask, bank top-k mask (frame-consistent bank), a BackMix mixed image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from backmix_vlm.augment import BackMix, MaskBank
    from backmix_vlm.augment.mask_bank import topk_foreground
    from backmix_vlm.data.bgshift import read_split
    from backmix_vlm.engine.checkpoint import load_checkpoint
    from backmix_vlm.saliency.mask_quality import upsample_nearest

    images, _, masks, _ = read_split(data, "train")
    state = load_checkpoint(variant_dir(run_dir, "backmix") / "last.pt")["bank"]
    bank = MaskBank(state["bank"].shape[0], tuple(state["bank"].shape[1:]))
    bank.load_state_dict(state)
    if len(bank.bank) != len(images):  # a few-shot run: bank rows follow its saved split's indices
        split = json.loads(next(run_dir.parent.glob(f"splits/*seed{run_dir.name.rsplit('seed', 1)[1]}.json")).read_text())
        images, masks = images[split["indices"]], masks[split["indices"]]
    idx = torch.arange(0, len(images), len(images) // n)[:n]
    x = torch.as_tensor(images[idx.numpy()]).permute(0, 3, 1, 2).float() / 255
    pred = upsample_nearest(topk_foreground(bank.get(idx), 0.25), tuple(masks.shape[1:])) > 0
    mixer = BackMix(bank, generator=torch.Generator().manual_seed(0))
    mixed = mixer(x, torch.zeros(n, dtype=torch.long), idx).images
    fig, axes = plt.subplots(4, n, figsize=(1.3 * n, 5.6))
    for j in range(n):
        panels = [x[j].permute(1, 2, 0), masks[idx[j]], pred[j], mixed[j].permute(1, 2, 0).clamp(0, 1)]
        for i, p in enumerate(panels):
            axes[i, j].imshow(np.asarray(p), cmap="gray" if i in (1, 2) else None, vmin=0, vmax=1)
            axes[i, j].axis("off")
    for i, t in enumerate(("image", "true mask", "bank top-k", "BackMix")):
        axes[i, 0].set_title(t, fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    print(machine_line(), flush=True)  # CPU model, kernel flags, native bf16 (each row names its precision)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sources", required=True, type=Path,
                   help="folder with fashion_mnist/, mnist/, dtd_partial/, tiny-imagenet-200/ (unpacked shared data)")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench_bgshift")
    p.add_argument("--smoke", action="store_true", help="1 epoch, 2 variants, tiny data")
    p.add_argument("--full", action="store_true", help="every variant on every seed and correlation")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="where the generated datasets are (default <out>/data; share one between models)")
    p.add_argument("--model", choices=MODELS, default="small_cnn",
                   help="small_cnn (train job, from scratch) or vpt_vits14 (fewshot job over the real ViT-S/14; "
                        "pass backbone.checkpoint=<weights file> as an override)")
    p.add_argument("overrides", nargs="*", help="extra section.key=value overrides for every run")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, dict[str, list[dict]]] = {}
    for rho, seed, variants in plan(a.smoke, a.full, a.model):
        data = ensure_data(a.out, a.sources, rho, a.smoke, a.data_dir)
        run = run_one if a.model == "small_cnn" else run_one_fewshot
        run_dir = run(a.out, data, rho, seed, a.smoke, a.overrides, variants)
        for name, row in collect(run_dir).items():
            report.setdefault(f"rho{rho}", {}).setdefault(name, []).append(row)
        if seed == 0:
            plot_mask_curves(run_dir, a.out / f"mask_precision_rho{rho}.png")
            plot_grid(run_dir, data, a.out / f"grid_rho{rho}.png")
        parts = [f"# Background-shift benchmark (bgshift), {a.model}", ""]
        for key, res in report.items():
            seeds = len(next(iter(res.values())))
            parts.append(table(res, f"{key}: {seeds} seed(s) (mean ± std)"))
        (a.out / "table.md").write_text("\n".join(parts))
        (a.out / "table.json").write_text(json.dumps(report, indent=1))
        print("\n".join(parts), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
