#!/usr/bin/env python
"""CIFAR-10 6/4 open-set comparison at convergence (issue 8): Plain vs + BackMix, Table IV format.

Runs ``backmix-vlm train`` for every (recipe, split, seed, variant) asked for — same seed,
data order and schedule for every variant — and writes ``<out>/table.md`` / ``table.json``:
accuracy, AUROC (MSP, MaxLogit), OSCR and open-set macro-F1 on the CIFAR-10 unknown split,
AUROC against CIFAR-100 and Tiny-ImageNet (resize, crop), mean ± std over splits x seeds,
beside the paper's Plain / + BackMix rows (Table IV) and Vaze et al.'s MaxLogit baseline.

Recipes: ``fast`` = ``configs/cnn/cifar10_osr_airbench.yaml`` (airbench-class net, recipe v1, 10 epochs);
``fast_v3`` = ``configs/cnn/cifar10_osr_airbench_v3.yaml`` (recipe v3: + lookahead, max-pool head, ...);
``paper`` = ``configs/cnn/cifar10_osr_wrn40_4.yaml`` (WRN-40-4, SGD 0.1, cosine, 100 epochs) run
with the training set decoded once into memory and crop / flip on the device.

    python scripts/osr_cifar10.py --recipe fast --splits 0 1 2 3 4        # data from $BACKMIX_DATA or ./data
    python scripts/osr_cifar10.py --recipe fast --splits 0 --seeds 0 1 2 \\
        --variants plain backmix mixed_only official_box k0 random_mask cutout cutmix
    python scripts/osr_cifar10.py --smoke ...          # a tiny end-to-end pass (CPU, minutes)
    python scripts/osr_cifar10.py --cuda-check         # CUDA vs CPU agreement of the core pieces

Finished runs are reused (a run folder with results.json); an interrupted one resumes.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RECIPES = {"fast": REPO / "configs" / "cnn" / "cifar10_osr_airbench.yaml",        # recipe v1 (the committed table)
           "fast_v3": REPO / "configs" / "cnn" / "cifar10_osr_airbench_v3.yaml",  # v3: lookahead, max-pool head, ...
           "paper": REPO / "configs" / "cnn" / "cifar10_osr_wrn40_4.yaml"}
#: variant -> overrides (the ablations of issue 8; "official_box": the official code's 8 px box,
#: s = (8/32)^2, pasted from an independent source location)
VARIANTS = {
    "plain": ["backmix.enabled=false"],
    "backmix": [],
    "mixed_only": ["backmix.mode=mixed_only"],
    "official_box": ["backmix.cut_area=0.0625", "backmix.same_location=false"],
    "k0": ["backmix.mask_ratio=0.0"],
    "random_mask": ["backmix.mask_source=random"],
    "cutout": ["augment.name=cutout"],
    "cutmix": ["augment.name=cutmix"],
}
#: published CIFAR-10 (6/4) AUROC rows, for context (not re-run here)
PUBLISHED = [
    ("Plain* (BackMix paper, Table IV; WRN-40-4)", 67.7),
    ("+ BackMix (BackMix paper, Table IV)", 91.3),
    ("MaxLogit, well-trained plain classifier (Vaze et al. 2022)", 93.6),
]
UNKNOWN = "cifar10 unknown (split {split})"
EXTRA = ("CIFAR-100", "TIN-resize", "TIN-crop")


def data_overrides(root: str | None) -> list[str]:
    """Every set from one data root (``data_root``; default $BACKMIX_DATA, else ./data), the OOD sets
    with the JPEG q75 round trip of the JPEG-stored CIFAR-10."""
    ood = ("eval.ood=[{name: cifar100, split: test, label: CIFAR-100, jpeg_quality: 75}, "
           "{name: tinyimagenet, split: test, label: TIN-resize, resize: resize, jpeg_quality: 75}, "
           "{name: tinyimagenet, split: test, label: TIN-crop, resize: crop, jpeg_quality: 75}]")
    return ([f"data_root={root}"] if root else []) + [ood]


def recipe_overrides(recipe: str, device: str, epochs: int | None) -> list[str]:
    out = [f"run.device={device}", "run.precision=auto", "run.channels_last=true", "plots=false"]
    if recipe == "paper":  # the paper's model and schedule, with the fast data path
        out += ["data.cache=memory", "data.views.name=crop_flip", "eval.every=0", "data.num_workers=4"]
    if epochs is not None:
        out.append(f"optim.epochs={epochs}")
    return out


def run_variants(out: Path, recipe: str, split: int, seed: int, variants: list[str], extra: list[str]) -> list[Path]:
    """Run folders holding every asked-for variant of (recipe, split, seed).

    The first folder is ``<recipe>-split<S>-seed<K>``; variants missing from a finished one (e.g. the
    ablations asked for after Plain / + BackMix) run in ``<name>-<variant>+...`` with the same seed,
    data order and schedule, so finished runs are never redone or touched.
    """
    from backmix_vlm.cli import main as cli

    base = f"{recipe}-split{split}-seed{seed}"
    done: list[Path] = []
    have: set[str] = set()
    for run_dir in sorted(out.glob(base + "*")):
        if run_dir.name.startswith(base) and run_dir.name[len(base):][:1] in ("", "-") \
                and (run_dir / "results.json").is_file():
            names = set(json.loads((run_dir / "results.json").read_text())["variants"])
            if names & set(variants):
                done.append(run_dir)
                have |= names
    missing = [v for v in variants if v not in have]
    if not missing:
        return done
    # an unfinished base folder resumes; once it has finished, new variants get a folder of their own
    name = base if not (out / base / "results.json").is_file() else base + "-" + "+".join(missing)
    run_dir = out / name
    spec = {v: VARIANTS[v] for v in missing}
    args = ["train", str(RECIPES[recipe]), f"run.output_dir={out}", f"run.name={name}", f"run.seed={seed}",
            f"data.protocol_split={split}", "variants=" + json.dumps(spec), *extra]
    if run_dir.is_dir():
        args.append("--resume")
    print("$ backmix-vlm " + " ".join(args), flush=True)
    start = time.perf_counter()
    if cli(args) != 0:
        raise SystemExit(f"run {name} failed")
    (run_dir / "wall_time_s.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    return done + [run_dir]


def collect(run_dir: Path, split: int) -> dict[str, dict[str, float]]:
    res = json.loads((run_dir / "results.json").read_text())["variants"]
    out = {}
    for name, r in res.items():
        unk = r["results"][UNKNOWN.format(split=split)]
        row = {"acc": r["acc"], "auroc_msp": unk["msp"]["auroc"], "auroc_maxlogit": unk["maxlogit"]["auroc"],
               "oscr_msp": unk["msp"]["oscr"], "oscr_maxlogit": unk["maxlogit"]["oscr"],
               "f1_msp": unk["msp"].get("macro_f1"), "train_time_s": r.get("train_time_s")}
        for ood in EXTRA:
            if ood in r["results"]:
                row[f"auroc_maxlogit/{ood}"] = r["results"][ood]["maxlogit"]["auroc"]
        out[name] = row
    return out


def fmt(values: list[float | None], scale: float = 100) -> str:
    v = np.asarray([x for x in values if x is not None], dtype=float) * scale
    if len(v) == 0:
        return "–"
    return f"{v.mean():.1f}" if len(v) == 1 else f"{v.mean():.1f} ± {v.std(ddof=1):.1f}"


RUN_LABEL = re.compile(r"split(\d+)-seed(\d+)$")


def _split_seed(row: dict) -> tuple[int, int]:
    m = RUN_LABEL.search(row.get("run", ""))
    return (int(m[1]), int(m[2])) if m else (-1, -1)


def _ranges(values: list[int]) -> str:
    v = sorted(set(values))
    return f"{v[0]}–{v[-1]}" if len(v) > 2 and v == list(range(v[0], v[-1] + 1)) else ", ".join(map(str, v))


def table(report: dict[str, dict[str, list[dict]]]) -> str:
    """Table IV format: each method over the splits (seed 0), then over the seeds of split 0
    (where it has more than one), then each method's paired difference to Plain on the same runs."""
    cols = [("acc", "Acc"), ("auroc_msp", "AUROC MSP"), ("auroc_maxlogit", "AUROC MaxLogit"),
            ("oscr_msp", "OSCR MSP"), ("oscr_maxlogit", "OSCR MaxLogit"), ("f1_msp", "Macro-F1")]
    cols += [(f"auroc_maxlogit/{o}", f"AUROC MaxLogit {o}") for o in EXTRA]
    head = "| Recipe | Method | runs | n | " + " | ".join(c for _, c in cols) + " | train s / run |"
    rule = "|---|---|---|---:|" + "---:|" * (len(cols) + 1)
    lines = [head, rule]
    for label, auroc in PUBLISHED:
        lines.append(f"| published | {label} | – | – | – | {auroc if 'Vaze' not in label else '–'} | "
                     f"{auroc if 'Vaze' in label else '–'} |" + " – |" * (len(cols) - 3) + " – |")

    def row(recipe: str, name: str, runs: list[dict], where: str) -> str:
        cells = [fmt([r.get(k) for r in runs]) for k, _ in cols]
        secs = fmt([r.get("train_time_s") for r in runs], scale=1)
        return f"| {recipe} | {name} | {where} | {len(runs)} | " + " | ".join(cells) + f" | {secs} |"

    for recipe, per_variant in report.items():
        for name, runs in per_variant.items():
            seed0 = [r for r in runs if _split_seed(r)[1] == 0]
            if seed0:
                splits = [_split_seed(r)[0] for r in seed0]
                lines.append(row(recipe, name, seed0, f"split{'s' * (len(set(splits)) > 1)} {_ranges(splits)}, seed 0"))
            split0 = [r for r in runs if _split_seed(r)[0] == 0]
            if len(split0) > 1:
                lines.append(row(recipe, name, split0, f"split 0, seeds {_ranges([_split_seed(r)[1] for r in split0])}"))
    diff: list[str] = []
    for recipe, per_variant in report.items():
        plain = {r.get("run"): r for r in per_variant.get("plain", [])}
        for name, runs in per_variant.items():
            pairs = [(r, plain[r.get("run")]) for r in runs if name != "plain" and r.get("run") in plain]
            if not pairs:
                continue
            cells = [fmt([None if r.get(k) is None or p.get(k) is None else r[k] - p[k] for r, p in pairs])
                     for k, _ in cols]
            where = ", ".join(sorted(r.get("run", "").replace(f"{recipe}-", "") for r, _ in pairs))
            diff.append(f"| {recipe} | {name} − plain | {where} | {len(pairs)} | " + " | ".join(cells) + " |")
    md = "\n".join(lines) + "\n"
    if diff:
        md += ("\nPaired differences to Plain on the same runs (same split, seed, data order and schedule), "
               "mean ± std in points:\n\n" + "\n".join([head.replace(" train s / run |", ""), rule[:-5], *diff]) + "\n")
    return md


# ----------------------------------------------------------------------------- CUDA check
def cuda_check() -> None:
    """The core pieces on cuda agree with the CPU to float tolerance (first, well under a minute)."""
    import torch

    from backmix_vlm.augment import BackMix, MaskBank
    from backmix_vlm.augment.geometry import build_views
    from backmix_vlm.models.cnn import create_cnn
    from backmix_vlm.saliency.cam import cam_foreground

    assert torch.cuda.is_available(), "no CUDA device"
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    torch.manual_seed(0)
    images, labels, idx = torch.randn(16, 3, 32, 32), torch.arange(16) % 6, torch.arange(16)
    import copy

    model_cpu = create_cnn("airbench", 6, widths=[16, 32, 32]).eval()
    model_gpu = copy.deepcopy(model_cpu).to(gpu)
    results = {}
    # device views + frame-consistent bank update + mixing, from the same (CPU) generators
    for dev in (cpu, gpu):
        views = build_views("crop_flip", {"padding": 4}, [0.5] * 3, [0.25] * 3)
        x, g = views(images.to(dev), torch.Generator().manual_seed(1))
        bank = MaskBank(16, (8, 8), device=dev)
        bank.update(idx.to(dev), torch.rand(16, 8, 8, generator=torch.Generator().manual_seed(2)).to(dev), geometry=g)
        mix = BackMix(bank, generator=torch.Generator().manual_seed(3))(x, labels.to(dev), idx.to(dev), geometry=g)
        results[dev.type] = (x.cpu(), bank.bank.cpu(), mix.images.cpu())
    (xc, bc, mc), (xg, bg, mg) = results["cpu"], results["cuda"]
    assert torch.allclose(xc, xg, atol=1e-5), "device views differ"
    assert torch.allclose(bc, bg, atol=1e-6), "bank update differs"
    assert torch.allclose(mc, mg, atol=1e-5), "BackMix mixing differs"
    with torch.no_grad():
        oc, og = model_cpu(mc), model_gpu(mc.to(gpu))
    assert torch.allclose(oc.cam, og.cam.cpu(), atol=1e-3), "CAM differs"
    fc, fg = cam_foreground(oc.cam, labels), cam_foreground(og.cam, labels.to(gpu)).cpu()
    assert torch.allclose(fc, fg, atol=1e-3), "CAM foreground differs"
    print("cuda check: device views, bank update (frame-consistent), BackMix mixing, CAM and CAM foreground "
          "agree with the CPU", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=None, help="the data root (default: $BACKMIX_DATA, else ./data)")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "osr_cifar10")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="fast")
    p.add_argument("--splits", type=int, nargs="+", default=[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--variants", nargs="+", default=["plain", "backmix"], choices=sorted(VARIANTS))
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    p.add_argument("--device", default="auto")
    p.add_argument("--smoke", action="store_true", help="1 epoch on 600 images per class: a pipeline check")
    p.add_argument("--cuda-check", action="store_true", help="only run the CUDA vs CPU check")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra section.key=value override (repeatable)")
    a = p.parse_args()
    if a.cuda_check:
        cuda_check()
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    extra = data_overrides(a.data_root) + recipe_overrides(a.recipe, a.device, 1 if a.smoke else a.epochs)
    if a.smoke:
        extra += ["data.train.max_samples=600", "data.test.max_samples=600", "optim.batch_size=128"]
        extra = [e.replace("jpeg_quality: 75}", "jpeg_quality: 75, max_samples: 200}") for e in extra]
    extra += a.overrides
    report_path = a.out / "table.json"
    report: dict[str, dict[str, list[dict]]] = json.loads(report_path.read_text()) if report_path.is_file() else {}
    for split in a.splits:
        for seed in a.seeds:
            for run_dir in run_variants(a.out, a.recipe, split, seed, a.variants, extra):
                for name, row in collect(run_dir, split).items():
                    if name not in a.variants:
                        continue
                    row["run"] = f"{a.recipe}-split{split}-seed{seed}"
                    bucket = report.setdefault(a.recipe, {}).setdefault(name, [])
                    bucket[:] = [r for r in bucket if r.get("run") != row["run"]] + [row]
            report_path.write_text(json.dumps(report, indent=1))
            md = "# CIFAR-10 6/4 open-set comparison\n\nValues in %; mean ± std over runs.\n\n" + table(report)
            (a.out / "table.md").write_text(md)
            print(md, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
